"""PPO's advantages and value loss, the LSC reward transform and combined objectives."""
import math

import pytest
import torch
import torch.nn.functional as F

from openrlaif.algorithms.advantages import ADVANTAGE_ESTIMATORS, gae_advantages, ppo_advantages, whiten
from openrlaif.algorithms.rewards import lsc_transform, reference_reward
from openrlaif.feedback.combine import CombinedFeedback
from openrlaif.feedback.rules import FunctionFeedback
from openrlaif.workers.critic import value_loss


def test_ppo_puts_the_reward_on_the_last_token_and_the_kl_on_every_token():
    rewards = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    values = torch.zeros(2, 3)
    kl = torch.full((2, 3), 0.5)
    adv, returns = ppo_advantages(rewards, mask, values, torch.tensor([True, True]), kl=kl, kl_coef=0.1,
                                  gamma=1.0, lam=1.0)
    # zero values, λ = γ = 1: returns are reward-to-go of r_t = −0.05 per token plus the reward at the end
    torch.testing.assert_close(returns, torch.tensor([[0.85, 0.9, 0.95], [-1.1, -1.05, 0.0]]))
    torch.testing.assert_close(adv, whiten(returns, mask))
    assert float((adv * mask).sum()) == pytest.approx(0.0, abs=1e-5)   # whitened over the valid tokens


def test_ppo_returns_are_gae_plus_values_and_invalid_samples_are_zero():
    torch.manual_seed(0)
    rewards, values = torch.randn(3), torch.randn(3, 4)
    mask = torch.ones(3, 4)
    adv, returns = ppo_advantages(rewards, mask, values, torch.tensor([True, False, True]), gamma=0.9, lam=0.8)
    masked = mask * torch.tensor([[1.0], [0.0], [1.0]])
    token_rewards = torch.zeros(3, 4)
    token_rewards[:, -1] = rewards
    raw, _ = gae_advantages(token_rewards * masked, values, masked, gamma=0.9, lam=0.8)
    torch.testing.assert_close(returns, raw + values * masked)
    assert adv[1].abs().sum() == 0 and returns[1].abs().sum() == 0
    assert ADVANTAGE_ESTIMATORS["gae"] is ppo_advantages


def test_value_loss_clips_towards_the_old_values():
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[0.5, 2.0]])
    mask = torch.ones(1, 2)
    unclipped, fraction = value_loss(values, old, returns, mask, clip=None, num_tokens=2.0)
    assert float(unclipped) == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    clipped, fraction = value_loss(values, old, returns, mask, clip=0.2, num_tokens=2.0)
    # token 1: clip(0.5) = 0.2 -> (0.8)² > 0.25 wins; token 2: clip(2.0) = 0.2 -> 0.64 < 1.0, unclipped wins
    assert float(clipped) == pytest.approx(0.5 * (0.64 + 1.0) / 2)
    assert float(fraction) == pytest.approx(0.5)


def test_lsc_is_log_sigmoid_of_the_centred_reward_and_bounded_by_zero():
    rewards, reference = torch.tensor([0.0, 2.0, 100.0]), torch.tensor([0.0, 1.0, 0.0])
    out = lsc_transform(rewards, reference)
    assert out[0] == pytest.approx(math.log(0.5))
    assert out[1] == pytest.approx(float(F.logsigmoid(torch.tensor(1.0))))
    assert -1e-6 < float(out[2]) <= 0.0
    assert reference_reward(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0.5) == pytest.approx(1.5)


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def flaky_reward(prompts, responses):
    return [None if r == "bad" else 1.0 for r in responses]


def test_combined_feedback_transforms_each_objective_against_its_reference_then_sums():
    objectives = {"length": FunctionFeedback(f"{__name__}:length_reward", {}),
                  "flaky": FunctionFeedback(f"{__name__}:flaky_reward", {})}
    combined = CombinedFeedback(objectives, [2.0, 1.0], transform="lsc", quantile=0.5)
    metrics = combined.calibrate(["p", "p", "q", "q"], ["ab", "abcd", "a", "bad"])
    assert metrics["reference/length_mean"] == pytest.approx((3.0 + 2.0) / 2)   # medians: p -> 3, q -> 2
    result = combined.score(["p", "q", "q", "unseen"], ["abc", "abcdef", "bad", "x"])
    u_length = F.logsigmoid(torch.tensor([0.0, 4.0]))
    expected0 = 2.0 * float(u_length[0]) + math.log(0.5)
    expected1 = 2.0 * float(u_length[1]) + math.log(0.5)
    assert result.valid.tolist() == [True, True, False, False]
    assert result.rewards[:2].tolist() == pytest.approx([expected0, expected1], abs=1e-6)
    assert result.failures["flaky/no_score"] == 1          # "bad" had no verdict
    assert result.failures["length/no_reference"] == 1     # "unseen" was never calibrated
    assert result.metrics["objective/length_raw_mean"] == pytest.approx((3 + 6 + 3) / 3)


def test_combined_feedback_without_transform_is_a_weighted_sum():
    objectives = {"length": FunctionFeedback(f"{__name__}:length_reward", {}),
                  "flaky": FunctionFeedback(f"{__name__}:flaky_reward", {})}
    result = CombinedFeedback(objectives, [0.5, 3.0]).score(["p", "p"], ["abcd", "xy"])
    assert result.rewards.tolist() == pytest.approx([0.5 * 4 + 3.0, 0.5 * 2 + 3.0])


def test_dapo_overlong_penalty_ramps_over_the_buffer_hand_computed():
    """DAPO eq. 13 with L_max = 20, L_cache = 8: 0 up to 12 tokens, then (12 − |y|) / 8, −1 at 20."""
    from openrlaif.algorithms.rewards import overlong_penalty
    lengths = torch.tensor([5, 12, 13, 16, 20])
    assert overlong_penalty(lengths, 20, 8).tolist() == pytest.approx([0.0, 0.0, -0.125, -0.5, -1.0])
    assert overlong_penalty(lengths, 20, 8, factor=0.5).tolist() == pytest.approx([0.0, 0.0, -0.0625, -0.25, -0.5])


def test_shaped_rewards_add_the_penalty_and_mask_truncated_samples(capsys):
    from openrlaif.batch import Batch
    from openrlaif.config import AlgorithmConfig, Config, RolloutConfig
    from openrlaif.feedback import FeedbackResult
    from openrlaif.pipelines.online_rl import shaped_rewards
    mask = torch.zeros(3, 10)
    for row, length in enumerate((4, 9, 10)):
        mask[row, :length] = 1
    batch = Batch({"response_mask": mask, "finished": torch.tensor([True, True, False])})
    feedback = FeedbackResult(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([True, True, True]))
    cfg = Config(rollout=RolloutConfig(max_new_tokens=10),
                 algorithm=AlgorithmConfig(overlong_buffer=4, mask_truncated=True))
    metrics = {}
    rewards, sample_mask = shaped_rewards(batch, feedback, cfg, metrics)
    assert rewards.tolist() == pytest.approx([1.0, 0.25, 0.0])       # 9 tokens: (6 − 9) / 4 = −0.75
    assert sample_mask.tolist() == [1.0, 1.0, 0.0]                    # the one cut off at 10 tokens: no loss
    assert metrics["reward/truncated_masked"] == 1.0
    all_cut = Batch({"response_mask": mask, "finished": torch.tensor([False, False, False])})
    shaped_rewards(all_cut, feedback, cfg, {})
    assert "masks them all: this step learns nothing" in capsys.readouterr().out
    off = shaped_rewards(batch, feedback, Config(), {})
    assert off[0].tolist() == [1.0, 1.0, 1.0] and off[1].tolist() == [1.0, 1.0, 1.0]
