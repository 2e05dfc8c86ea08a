import os

import pytest

from openrlaif.config import ConfigError
from openrlaif.feedback.rules import FunctionFeedback, brevity, keyword
from openrlaif.models import resolve_model_path


def test_missing_model_path_names_key_and_fix(tmp_path):
    with pytest.raises(ConfigError, match="model.path='/no/such/model'.*Fix"):
        resolve_model_path("/no/such/model", str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        resolve_model_path(str(tmp_path / "empty"), str(tmp_path))


def test_short_name_is_materialised_once(tiny_model, model_cache, monkeypatch):
    from openrlaif.models import registry
    assert os.path.isfile(os.path.join(tiny_model, "config.json"))
    stamp = os.stat(os.path.join(tiny_model, "model.safetensors"))
    monkeypatch.setitem(registry.SHORT_NAMES, "tiny-random-llama", lambda out: pytest.fail("built a second time"))
    assert resolve_model_path("tiny-random-llama", model_cache) == tiny_model
    assert resolve_model_path(tiny_model, "/unused") == tiny_model
    after = os.stat(os.path.join(tiny_model, "model.safetensors"))
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)


def test_rule_rewards():
    assert brevity([""] * 3, ["a b", "w " * 30, "w " * 50], target_words=20) == [1.0, 0.5, 0.0]
    assert keyword([""], ["Thanks, please."]) == [1.0]


def test_function_feedback_masks_none_and_checks_length():
    feedback = FunctionFeedback("tests.unit.test_models_and_rules:half_known", {})
    result = feedback.score(["p"] * 4, ["a", "b", "c", "d"])
    assert result.valid.tolist() == [True, False, True, False] and result.failures == {"no_score": 2}
    wrong = FunctionFeedback("tests.unit.test_models_and_rules:wrong_length", {}).score(["p"], ["a"])
    assert wrong.failures == {"function_error": 1} and "returned 0 scores for 1 responses" in wrong.details[
        "function_error"]
    with pytest.raises(ConfigError, match="cannot import"):
        FunctionFeedback("no_such_module:fn", {})


@pytest.mark.parametrize("name,kind,needle", [
    ("strings", "bad_score", "returned '0.5' (str) for sample 0"),
    ("bools", "bad_score", "returned True (bool) for sample 0"),
    ("generator", "function_error", "returned a generator, not a list of scores"),
    ("raises", "function_error", "ZeroDivisionError"),
])
def test_a_user_function_returning_no_numbers_is_a_typed_failure_naming_it(name, kind, needle):
    result = FunctionFeedback(f"tests.unit.test_models_and_rules:{name}", {}).score(["p", "q"], ["a", "b"])
    assert not bool(result.valid.any()) and result.failures == {kind: 2}
    assert f"tests.unit.test_models_and_rules:{name}" in result.details[kind] and needle in result.details[kind]


def test_numpy_and_torch_scalars_are_numbers():
    result = FunctionFeedback("tests.unit.test_models_and_rules:array_scores", {}).score(["p", "q"], ["a", "b"])
    assert bool(result.valid.all()) and result.rewards.tolist() == [0.25, 1.0]


def test_a_function_is_checked_against_its_kwargs_at_start_up():
    """The README's `def score(prompts, responses)` with a kwarg it does not take fails before any model loads."""
    from openrlaif.feedback.rules import load_function
    with pytest.raises(ConfigError, match=r"cannot be called as half_known\(prompts, responses, target_words=...\)"):
        load_function("tests.unit.test_models_and_rules:half_known", {"target_words": 20})
    load_function("openrlaif.feedback.rules:brevity", {"target_words": 20})
    load_function("tests.unit.test_models_and_rules:half_known")


def strings(prompts, responses):
    return ["0.5" for _ in responses]


def bools(prompts, responses):
    return [True for _ in responses]


def generator(prompts, responses):
    return (0.5 for _ in responses)


def raises(prompts, responses):
    return [1 / 0 for _ in responses]


def array_scores(prompts, responses):
    import numpy as np
    import torch
    return [np.float32(0.25), torch.tensor(1.0)]


def half_known(prompts, responses):
    return [1.0 if i % 2 == 0 else None for i in range(len(responses))]


def wrong_length(prompts, responses):
    return []


def test_the_context_check_names_the_keys_and_the_model_limit(tiny_model):
    from openrlaif.models.registry import check_context, context_length
    assert context_length(tiny_model) == 1024
    check_context(tiny_model, 1024, "model.path", "a + b")
    with pytest.raises(ConfigError, match=r"a \+ b = 100048 tokens, more than the 1024 positions of model.path="):
        check_context(tiny_model, 100048, "model.path", "a + b")


def test_a_start_up_error_is_the_exception_not_a_trailing_url():
    from openrlaif.roles import startup_error
    traceback = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    g()\n"
                 "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                 "  Value error, max_model_len 100048 > max_position_embeddings 1024\n"
                 "    For further information visit https://errors.pydantic.dev/2.12/v/value_error")
    message = startup_error(RuntimeError(traceback))
    assert message.startswith("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig")
    assert "max_model_len 100048 > max_position_embeddings 1024" in message
    assert startup_error(RuntimeError("plain words")) == "plain words"


def test_a_rendezvous_port_is_never_one_the_os_hands_to_outgoing_connections():
    """The DeepSpeed rendezvous port is chosen by the driver and bound seconds later by rank 0: a port from the
    ephemeral range could meanwhile be taken as the local port of an outgoing connection (CI: EADDRINUSE)."""
    import socket

    from openrlaif.roles import RAY_WORKER_PORTS_END, rendezvous_port
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_start = int(f.read().split()[0])
    ports = {rendezvous_port() for _ in range(50)}
    assert len(ports) > 40   # drawn at random, not one fixed port two runs would share
    assert all(RAY_WORKER_PORTS_END <= port < ephemeral_start for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", rendezvous_port()))   # free when handed out
