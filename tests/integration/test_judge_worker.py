"""The pointwise judge as a Ray worker on the tiny model: every verdict is a score in [0, 1] or a typed failure."""
import pytest

from openrlaif.config import JudgeConfig, RoleResources
from openrlaif.feedback.judge import JudgeFeedback, JudgeWorker
from openrlaif.workers.group import WorkerGroup

PROMPTS = ["what is the sun", "say hello", "name a color", "count to three"]
RESPONSES = ["the sun is a star", "hello", "blue", "one two three"]


def judge_group(tiny_model, name, **overrides):
    cfg = JudgeConfig(micro_batch_size=3, resources=RoleResources(num_workers=2, num_cpus=1), **overrides)
    return WorkerGroup(name, JudgeWorker, cfg.resources, lambda rank: dict(
        model_path=tiny_model, cfg=cfg, dtype="float32", threads=1, seed=0))


@pytest.mark.parametrize("overrides,expect_all_fail", [
    ({"min_label_mass": 0.0}, False),
    ({"min_label_mass": 0.99}, True),     # a random model never puts 99% on digits: all unparseable
    ({"mode": "generate", "max_new_tokens": 4}, None),
])
def test_judge_scores_or_fails_typed(ray_cluster, tiny_model, overrides, expect_all_fail):
    group = judge_group(tiny_model, f"judge-{len(overrides)}-{expect_all_fail}", **overrides)
    try:
        result = JudgeFeedback(group).score(PROMPTS, RESPONSES)
    finally:
        group.shutdown()
    assert len(result.rewards) == 4
    assert sum(result.failures.values()) == int((~result.valid).sum())
    valid_rewards = result.rewards[result.valid]
    assert ((valid_rewards >= 0) & (valid_rewards <= 1)).all()
    assert result.metrics["judge_prompt_tokens"] > 0
    if expect_all_fail is True:
        assert result.failures == {"unparseable": 4}
    if expect_all_fail is False:
        assert bool(result.valid.all())
        assert len(set(result.rewards.tolist())) > 1     # different responses, different expected scores
