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


def test_short_name_is_materialised_once(tiny_model, model_cache):
    assert os.path.isfile(os.path.join(tiny_model, "config.json"))
    assert resolve_model_path("tiny-random-llama", model_cache) == tiny_model
    assert resolve_model_path(tiny_model, "/unused") == tiny_model


def test_rule_rewards():
    assert brevity([""] * 3, ["a b", "w " * 30, "w " * 50], target_words=20) == [1.0, 0.5, 0.0]
    assert keyword([""], ["Thanks, please."]) == [1.0]


def test_function_feedback_masks_none_and_checks_length():
    feedback = FunctionFeedback("tests.unit.test_models_and_rules:half_known", {})
    result = feedback.score(["p"] * 4, ["a", "b", "c", "d"])
    assert result.valid.tolist() == [True, False, True, False] and result.failures == {"no_score": 2}
    with pytest.raises(ValueError, match="one per response"):
        FunctionFeedback("tests.unit.test_models_and_rules:wrong_length", {}).score(["p"], ["a"])
    with pytest.raises(ConfigError, match="cannot import"):
        FunctionFeedback("no_such_module:fn", {})


def half_known(prompts, responses):
    return [1.0 if i % 2 == 0 else None for i in range(len(responses))]


def wrong_length(prompts, responses):
    return []
