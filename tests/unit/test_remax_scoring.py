"""ReMax's scoring step: greedy baselines ride in the same feedback call and map back to their groups."""
from types import SimpleNamespace

import torch

from openrlaif.batch import Batch
from openrlaif.config import AlgorithmConfig
from openrlaif.feedback.rules import FunctionFeedback
from openrlaif.pipelines.online_rl import compute_advantages, score


def length_or_none(prompts, responses):
    """Reward = number of words; no verdict for a response that says 'fail'."""
    return [None if r == "fail" else float(len(r.split())) for r in responses]


def test_baselines_are_scored_once_per_prompt_and_broadcast():
    batch = Batch({"group_ids": torch.tensor([0, 0, 1, 1])},
                  {"prompt": ["p0", "p0", "p1", "p1"], "response": ["a b c", "a", "a b", "fail"],
                   "baseline_response": ["a b", "a b", "fail", "fail"]})
    roles = SimpleNamespace(feedback=FunctionFeedback("tests.unit.test_remax_scoring:length_or_none", {}))
    result = score(roles, batch)
    assert batch["baseline_rewards"][:2].tolist() == [2.0, 2.0]
    assert result.rewards[:2].tolist() == [3.0, 1.0]
    # group 1's baseline has no verdict: both of its samples are masked, whatever their own verdict
    assert result.valid.tolist() == [True, True, False, False]
    assert sum(result.failures.values()) == 2          # the failed sample and the failed baseline

    cfg = SimpleNamespace(algorithm=AlgorithmConfig(advantage="remax", kl_coef=0.0))
    batch["rewards"], batch["response_mask"] = result.rewards, torch.ones(4, 3)
    advantages = compute_advantages(batch, result.valid, cfg)
    assert advantages.tolist() == [1.0, -1.0, 0.0, 0.0]
