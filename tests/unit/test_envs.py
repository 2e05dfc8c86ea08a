"""Environments: the sandbox's limits, tool-call parsing and the calculator, the tool environment's turns,
errors and exact-answer reward, the chat template's framing of observations, and the env.* checks."""
import pytest

from openrlaif.config import ConfigError, validate
from openrlaif.envs import ToolUse, env_class, make_env
from openrlaif.envs.sandbox import run_python
from openrlaif.envs.tools import calculate, parse_call

from tests.unit.test_config import composed


def test_sandbox_runs_code_in_an_empty_temp_dir_with_a_scrubbed_environment():
    result = run_python("import os; print(6 * 7); print(os.listdir('.'), sorted(os.environ))")
    assert result.error is None and result.output.startswith("42\n[]")
    assert "OPENRLAIF" not in result.output and "'HOME'" in result.output


def test_sandbox_sees_a_read_only_world_without_the_users_files(tmp_path):
    """The code writes only its own working folder; the system's files are read-only, the users' folders (/tmp with
    the trainer's files in it, the home folder, the trainer's working directory) are empty covers, and the
    interpreter keeps working; isolate_fs=False leaves the file system as it is."""
    import os
    secret = tmp_path / "checkpoint.bin"
    secret.write_text("weights")
    code = (f"import os, sys\nopen('mine.txt', 'w').write('ok'); print(open('mine.txt').read())\n"
            f"print(os.path.exists({str(secret)!r}), os.path.exists({os.getcwd()!r} + '/README.md'))\n"
            "for path in ('/usr/openrlaif-probe', sys.base_prefix + '/openrlaif-probe', '/tmp/openrlaif-probe'):\n"
            "    try:\n        open(path, 'w')\n        print('wrote', path)\n"
            "    except OSError as err:\n        print(err.errno)\n"
            "import json, math; print(json.dumps(math.floor(2.5)))")
    result = run_python(code)
    if result.isolation != "netns+fs":
        pytest.skip(f"no mount namespace here ({result.isolation}): the tool counts env/sandbox_without_fs")
    assert result.error is None and result.output.split("\n")[:6] == ["ok", "False False", "30", "30", "30", "2"]
    assert secret.read_text() == "weights" and not os.path.exists("/usr/openrlaif-probe")
    open_world = run_python(f"print(open({str(secret)!r}).read())", isolate_fs=False)
    assert open_world.output.strip() == "weights" and open_world.isolation == "netns"


def test_sandbox_has_no_network():
    result = run_python("import socket\ns = socket.socket(); s.settimeout(2); s.connect(('1.1.1.1', 80))")
    assert result.error == "error"
    assert result.isolation in ("netns+fs", "netns", "python_guard")
    assert "unreachable" in result.output.lower() or "disabled" in result.output


@pytest.mark.parametrize("code, kind, needle, kwargs", [
    ("import time; time.sleep(30)", "timeout", "timed out after 1 s", {"timeout_s": 1.0}),
    ("while True: pass", "cpu", "CPU time limit (1 s)", {"cpu_s": 1, "timeout_s": 20.0}),
    ("x = bytearray(1 << 31)", "memory", "memory limit (256 MiB)", {"memory_mb": 256}),
    ("raise ValueError('bad input')", "error", "ValueError: bad input", {}),
])
def test_sandbox_limits_end_the_call_with_a_kind(code, kind, needle, kwargs):
    result = run_python(code, **kwargs)
    assert result.error == kind and needle in result.output, result


def test_sandbox_kills_the_codes_children_on_timeout(tmp_path):
    marker = tmp_path / "child-alive"
    run_python(f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3); "
               f"open({str(marker)!r}, \"w\")'])\nimport time; time.sleep(30)", timeout_s=1.0,
               isolate_fs=False)   # the marker's folder is hidden from the code otherwise
    import time
    time.sleep(4)
    assert not marker.exists()   # the grandchild was killed with its process group


def test_calculator_evaluates_arithmetic_only():
    assert calculate("(80 + 24) * 7") == 728 and calculate("7 / 2") == 3.5 and calculate("-2 ** 3") == -8
    for bad in ("__import__('os')", "x + 1", "2 ** 1000", "1 / 0", "(1, 2)", "True + 1"):
        with pytest.raises(ValueError):
            calculate(bad)


def test_tool_calls_in_both_formats_and_malformed_ones():
    assert parse_call('sure <tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>') == \
        ("python", "print(1)")
    assert parse_call('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2+2\\"}"}</tool_call>') \
        == ("calculator", "2+2")
    assert parse_call("Let me compute <calculator>53*31</calculator>.") == ("calculator", "53*31")
    assert parse_call("The answer is 42.") is None
    assert parse_call("<tool_call>{not json}</tool_call>")[0] is None
    assert parse_call('<tool_call>{"name": "python", "arguments": {}}</tool_call>')[0] is None
    assert parse_call("<python>print(1)")[0] is None   # opened, never closed


def test_tool_use_turns_errors_and_exact_answer_reward():
    env = ToolUse()
    messages = env.reset({"messages": [{"role": "user", "content": "What is 53 * 31?"}], "answer": 1643})
    assert messages[0]["role"] == "system" and "<calculator>" in messages[0]["content"]
    step = env.step(messages, "I will compute <calculator>53*31</calculator>")
    assert step.observation == [{"role": "tool", "content": "1643"}] and step.reward is None
    assert step.counts == {"tool_calls": 1}
    step = env.step(messages, "<python>print(53*31)</python>")
    assert step.observation[0]["content"] == "1643"
    for turn, kind in (("<calculator>53*x</calculator>", "error"), ("<search>cats</search> <tool_call>{\"name\": "
                       "\"search\", \"arguments\": {\"code\": \"x\"}}</tool_call>", "unknown_tool"),
                       ("<tool_call>oops</tool_call>", "malformed"), ("<python>1/0</python>", "error")):
        step = env.step(messages, turn)
        assert step.observation[0]["content"].startswith("Error") and step.counts[f"tool_errors/{kind}"] == 1, turn
    assert env.step(messages, "So it is 1,643.").reward == 1.0
    done = env.step(messages, "It is 1642.")
    assert done.observation is None and done.reward == 0.0
    assert ToolUse().reset({"messages": [{"role": "user", "content": "hi"}]}) and ToolUse().reward("1") is None


# A Qwen2.5-like template that renders `tools=` into its system message (the tiny model's own takes none).
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n"
    "{% endif %}# Tools\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}Call one as <tool_call>{\"name\": "
    "..., \"arguments\": {...}}</tool_call><|im_end|>\n{% endif %}"
    "{%- for message in messages %}{% if not (tools and loop.first and message['role'] == 'system') %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tool_schemas_go_to_a_template_that_takes_tools(tiny_model, tiny_tokenizer):
    """tool_format=template: the prompt is rendered with the tools' schemas (the template's own words), the system
    prompt no longer describes the tags, a Hermes-style call runs; a template without `tools` is refused at
    start-up, naming the key; an unknown tool too."""
    from transformers import AutoTokenizer

    from openrlaif.data import load_prompts
    from openrlaif.envs.tools import TEMPLATE_SYSTEM
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = TOOLS_TEMPLATE
    env = lambda: ToolUse(tool_format="template", tools=["calculator"])   # noqa: E731
    prompts = load_prompts("calculator", tokenizer, 512, env=env)
    text = tokenizer.decode(prompts[0].token_ids)
    assert '"name": "calculator"' in text and '"expression"' in text and '"python"' not in text
    assert TEMPLATE_SYSTEM in text and "<calculator>" not in text
    assert prompts[0].messages[0] == {"role": "system", "content": TEMPLATE_SYSTEM}
    step = env().step(prompts[0].messages, '<tool_call>{"name": "calculator", "arguments": {"expression": "53*31"}}'
                                           '</tool_call>')
    assert step.observation == [{"role": "tool", "content": "1643"}]
    tags = load_prompts("calculator", tokenizer, 512, env=ToolUse)   # the default: tags, described in the prompt
    assert "<calculator>expression</calculator>" in tokenizer.decode(tags[0].token_ids)
    assert '"name": "calculator"' not in tokenizer.decode(tags[0].token_ids)
    with pytest.raises(ConfigError, match="tool_format=template.*takes no `tools`"):
        load_prompts("calculator", tiny_tokenizer, 512, env=env)
    with pytest.raises(ConfigError, match="env.kwargs.tools: \\['shell'\\]"):
        ToolUse(tools=["calculator", "shell"])
    with pytest.raises(ConfigError, match="env.kwargs.tool_format='json'"):
        ToolUse(tool_format="json")


def test_observations_are_framed_by_the_chat_template(tiny_tokenizer):
    from openrlaif.rollout.multi_turn import TurnTemplate
    template = TurnTemplate(tiny_tokenizer)
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    observation = [{"role": "tool", "content": "1643"}]
    ended = template.observation_ids(observation, [5, 6, end])      # the turn ended with the template's end token
    assert tiny_tokenizer.decode(ended) == "\n<|im_start|>tool\n1643<|im_end|>\n<|im_start|>assistant\n"
    cut = template.observation_ids(observation, [5, 6, 7])           # cut at max_new_tokens: the turn is closed
    assert cut == [end] + ended


def test_the_gae_of_an_episode_skips_its_observation_tokens():
    """GAE over policy tokens only: a row with observation tokens inside equals the same row with them removed."""
    import torch

    from openrlaif.algorithms import gae_advantages
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0]], dtype=torch.float32)           # turn, observation, turn, padding
    values = torch.tensor([[0.3, 0.5, 9.0, 9.0, 0.2, 0.7, 9.0]])
    rewards = torch.tensor([[0.0, 0.1, 0.0, 0.0, 0.0, 1.0, 0.0]])
    adv, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    keep = mask[0] > 0
    compact_adv, compact_returns = gae_advantages(rewards[:, keep], values[:, keep], mask[:, keep], gamma=0.9, lam=0.8)
    assert torch.allclose(adv[:, keep], compact_adv) and torch.allclose(returns[:, keep], compact_returns)
    assert torch.equal(adv[:, ~keep], torch.zeros(1, 3)) and float(compact_adv[0, 0]) != 0.0


def test_env_settings_are_checked_at_start_up():
    validate(composed("env=tool_use", "feedback=env", "data.prompts=calculator"))
    for overrides, needle in (
            (["feedback=env"], "env.name is unset"),
            (["env=tool_use", "pipeline=online_dpo"], "multi-turn episodes run in pipeline=online_rl"),
            (["env=tool_use", "env.max_turns=0"], "env.max_turns"),
            (["env.name=no_such_env"], "env.name='no_such_env' is not one of"),
            (["env.name=json:JSONDecoder"], "has no reset"),
            (["env=tool_use", "+env.kwargs.colour=red"], "env.kwargs"),
            (["env=simulated_user"], "needs env.kwargs.base_url"),
            (["env=simulated_user", "env.kwargs.base_url=http://127.0.0.1:1/v1", "env.user_sim.model=tiny"],
             "both name the user's model"),
            (["env=tool_use", "env.user_sim.model=tiny"], "plays the user of env=simulated_user"),
            (["env=simulated_user", "env.user_sim.model=tiny", "env.user_sim.engine=tgi"], "env.user_sim.engine"),
            (["env=simulated_user", "env.user_sim.model=tiny", "env.user_sim.resources.num_cpus=0"],
             "env.user_sim.resources reserves neither"),
            (["env=agent"], "env.name=agent needs env.agent='package.module:function'"),
            (["env=agent", "env.agent=tests.integration.agents:nope"], "env.agent=.*has no callable"),
            (["env=agent", "env.agent=tests.integration.agents:openai_agent", "algorithm=remax"], "no greedy"),
            (["env=tool_use", "env.agent=tests.integration.agents:openai_agent"], "only with env.name=agent"),
    ):
        with pytest.raises(ConfigError, match=needle):
            validate(composed(*overrides))
    assert env_class("tool_use") is ToolUse and isinstance(make_env("single_turn", {}).reset(
        {"messages": [{"role": "user", "content": "x"}]}), list)


def test_remax_over_episodes_takes_the_greedy_episodes_env_rewards_as_baselines():
    import torch

    from openrlaif.batch import Batch
    from openrlaif.envs import EnvReward
    from openrlaif.pipelines.online_rl import score
    from types import SimpleNamespace
    batch = Batch({"group_ids": torch.tensor([0, 0, 1, 1])},
                  {"prompt": ["p0"] * 2 + ["p1"] * 2, "response": ["a", "b", "c", "d"],
                   "env_reward": [1.0, 0.0, None, 1.0], "baseline_response": ["g0", "g0", "g1", "g1"],
                   "baseline_env_reward": [0.5, 0.5, 1.0, 1.0]})
    result = score(SimpleNamespace(feedback=EnvReward()), batch)
    assert batch["baseline_rewards"].tolist() == [0.5, 0.5, 1.0, 1.0]
    assert result.rewards.tolist() == [1.0, 0.0, 0.0, 1.0] and result.valid.tolist() == [True, True, False, True]
    assert result.failures == {"no_env_reward": 1}


class Boom:
    """Answers the first turn, raises on the second."""

    def reset(self, row):
        return list(row["messages"])

    def step(self, messages, turn):
        from openrlaif.envs import EnvStep
        if len(messages) > 2:
            raise RuntimeError("the agent's tool crashed")
        return EnvStep([{"role": "tool", "content": "ok"}])


def scripted_episodes(tiny_tokenizer, env_name: str, max_total_tokens: int = 200, turns: int = 4):
    """Episodes from a scripted sampler (every turn: three tokens and the end-of-turn token), no engine."""
    from openrlaif.config import Config, EnvConfig, RolloutConfig
    from openrlaif.data import load_prompts
    from openrlaif.envs import env_factory
    from openrlaif.rollout.multi_turn import run_episodes
    from openrlaif.rollout.types import Completion
    cfg = Config(rollout=RolloutConfig(max_new_tokens=4),
                 env=EnvConfig(name=env_name, max_turns=turns, max_total_tokens=max_total_tokens))
    prompts = load_prompts("demo", tiny_tokenizer, 256, env=env_factory(cfg.env))[:2]
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")

    def turn(index: int) -> Completion:
        return Completion(index, [40, 41, 42, end], [-0.5, -0.25, -0.125, -1.0], True)
    sent = []

    def sample(contexts, spec):
        sent.append(contexts)
        return [turn(i) for i in range(len(contexts))]
    return run_episodes(sample, prompts, [turn(0), turn(1)], cfg, tiny_tokenizer, seed=0), sent


def test_an_environment_that_raises_masks_its_episode_and_the_run_goes_on(tiny_tokenizer):
    import torch

    from openrlaif.envs import EnvReward
    from openrlaif.feedback.rules import FunctionFeedback
    from openrlaif.pipelines.online_rl import score
    from types import SimpleNamespace
    batch, _ = scripted_episodes(tiny_tokenizer, "tests.unit.test_envs:Boom")
    assert batch.meta["env_turns"] == [2, 2]
    assert all("env.step raised RuntimeError: the agent's tool crashed" in e for e in batch.meta["env_error"])
    assert [c["env_errors/RuntimeError"] for c in batch.meta["env_counts"]] == [1, 1]
    for feedback in (EnvReward(), FunctionFeedback("openrlaif.feedback.rules:brevity", {})):
        result = score(SimpleNamespace(feedback=feedback), batch)   # a judge's or rule's score is masked too
        assert result.valid.tolist() == [False, False] and result.failures["env_error"] == 2
        assert "tool crashed" in result.details["env_error"]
    assert torch.equal(batch["response_mask"].sum(-1), torch.tensor([8.0, 8.0]))   # the two turns, 4 tokens each


def test_a_budget_cuts_the_episode_and_each_turn_continues_the_exact_ids(tiny_tokenizer):
    batch, sent = scripted_episodes(tiny_tokenizer, "tests.unit.test_envs:Boom", max_total_tokens=10, turns=4)
    assert batch.meta["env_truncated"] == [True, True] and batch.meta["env_turns"] == [1, 1]
    assert int(batch["attention_mask"][0, -batch["response_mask"].shape[1]:].sum()) <= 10
    batch, sent = scripted_episodes(tiny_tokenizer, "single_turn")
    assert sent == [] and batch.meta["env_turns"] == [1, 1]
    batch, sent = scripted_episodes(tiny_tokenizer, "tests.unit.test_envs:Boom", turns=2)
    row = batch["input_ids"][0][batch["attention_mask"][0] > 0].tolist()
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(sent) == 1 and row == sent[0][0] + [40, 41, 42, end]   # the row: what turn 2 continued, then turn 2


def test_concurrent_requests_to_a_local_user_model_go_out_as_one_batch():
    """Coalesced: eight episodes' threads each ask for one reply; the backend is called once with all eight and
    each thread gets its own reply; an error in that call is every caller's."""
    import threading

    from openrlaif.feedback.backends import Coalesced, JudgeRequest, Reply

    class Echo:
        def __init__(self):
            self.batches = []

        def complete(self, requests):
            self.batches.append(len(requests))
            if any(r.messages[0]["content"] == "boom" for r in requests):
                raise RuntimeError("engine died")
            return [Reply(text=r.messages[0]["content"].upper()) for r in requests]

    echo = Echo()
    backend, out = Coalesced(echo, window_s=0.3), {}

    def ask(i, text=None):
        try:
            out[i] = backend.complete([JudgeRequest([{"role": "user", "content": text or f"turn {i}"}])])[0].text
        except RuntimeError as err:
            out[i] = str(err)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert echo.batches == [8] and out == {i: f"TURN {i}" for i in range(8)} and backend.calls == 1
    threads = [threading.Thread(target=ask, args=(i, "boom" if i == 0 else None)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert echo.batches == [8, 3] and set(out[i] for i in range(3)) == {"engine died"}


def test_the_agent_endpoint_takes_tool_schemas_and_streams(tiny_model):
    """The black-box agents' endpoint on a scripted sampler: a first request with `tools` is rendered with them by a
    template that takes tools (the session's prompt ids hold the schema); `stream: true` answers server-sent events
    whose deltas add up to the message, ended by [DONE]."""
    import json
    import threading
    import urllib.request

    from transformers import AutoTokenizer

    from openrlaif.config import Config, EnvConfig, RolloutConfig
    from openrlaif.rollout.agents import AgentServer
    from openrlaif.rollout.types import Completion
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = TOOLS_TEMPLATE
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    words = tokenizer("forty two", add_special_tokens=False)["input_ids"]

    def sample(contexts, spec):
        return [Completion(0, words + [end], [-0.1] * (len(words) + 1), True) for _ in contexts]
    cfg = Config(rollout=RolloutConfig(max_new_tokens=8), env=EnvConfig(name="agent", max_total_tokens=64))
    server = AgentServer(sample, tokenizer, cfg, seed=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    schema = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    try:
        def post(key, body):
            request = urllib.request.Request(server.base_url + "/chat/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.headers.get("Content-Type"), response.read().decode()
        key, session = server.open_session(0)
        kind, text = post(key, {"messages": [{"role": "user", "content": "hi"}], "tools": [schema]})
        assert kind == "application/json" and json.loads(text)["choices"][0]["message"]["content"] == "forty two"
        assert '"name": "lookup"' in tokenizer.decode(session.episode.prompt_ids)
        key, session = server.open_session(0)
        kind, text = post(key, {"messages": [{"role": "user", "content": "hi"}], "stream": True})
        events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
        assert kind == "text/event-stream" and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "forty two"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[0]["object"] == "chat.completion.chunk"
        assert "lookup" not in tokenizer.decode(session.episode.prompt_ids)
    finally:
        server.shutdown()
        server.server_close()


def test_the_agent_endpoint_serves_tool_calls_and_takes_them_back(tiny_model):
    """With `tools` offered, a completion holding `<tool_call>{json}</tool_call>` is served as OpenAI tool_calls
    (finish_reason tool_calls); the client sends the assistant message back with tool_calls and no content, then the
    tool's result; arguments re-serialised with other whitespace still match, changed arguments get HTTP 400; the
    trajectory keeps the text as the model wrote it."""
    import json
    import threading
    import urllib.error
    import urllib.request

    from transformers import AutoTokenizer

    from openrlaif.config import Config, EnvConfig, RolloutConfig
    from openrlaif.rollout.agents import AgentServer
    from openrlaif.rollout.types import Completion
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = TOOLS_TEMPLATE
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = iter(['<tool_call>{"name": "lookup", "arguments": {"q": "cats", "n": 2}}</tool_call>', "Cats."])

    def sample(contexts, spec):
        ids = tokenizer(next(replies), add_special_tokens=False)["input_ids"] + [end]
        return [Completion(0, ids, [-0.1] * len(ids), True) for _ in contexts]
    cfg = Config(rollout=RolloutConfig(max_new_tokens=64), env=EnvConfig(name="agent", max_total_tokens=256))
    server = AgentServer(sample, tokenizer, cfg, seed=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    schema = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    try:
        key, session = server.open_session(0)

        def post(messages):
            request = urllib.request.Request(server.base_url + "/chat/completions", json.dumps(
                {"messages": messages, "tools": [schema]}).encode(), {"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["choices"][0]
        messages = [{"role": "user", "content": "Find cats."}]
        first = post(messages)
        assert first["finish_reason"] == "tool_calls" and first["message"]["content"] is None
        (call,) = first["message"]["tool_calls"]
        assert call["function"]["name"] == "lookup" and json.loads(call["function"]["arguments"]) == {"q": "cats", "n": 2}
        tool = {"role": "tool", "tool_call_id": call["id"], "content": "3 cats"}
        changed = {**first["message"], "tool_calls": [{**call, "function": {"name": "lookup",
                                                                            "arguments": '{"q": "dogs", "n": 2}'}}]}
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(messages + [changed, tool])
        assert refused.value.code == 400 and "message 1 differs" in refused.value.read().decode()
        echoed = {**first["message"], "tool_calls": [{**call, "function": {"name": "lookup",
                                                                           "arguments": '{"n":2,"q":"cats"}'}}]}
        second = post(messages + [echoed, tool])
        assert second["finish_reason"] == "stop" and second["message"] == {"role": "assistant", "content": "Cats."}
        assert "<|im_start|>tool\n3 cats<|im_end|>" in tokenizer.decode(session.episode.ids)
        assert session.episode.messages[1]["content"].startswith("<tool_call>")   # what the judge reads
        assert session.episode.counts["tool_calls"] == 1
    finally:
        server.shutdown()
        server.server_close()
