import math

import pytest
import torch

from openrlaif.algorithms import grpo_advantages


def test_grpo_matches_hand_computed_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    valid = torch.ones(6, dtype=torch.bool)
    adv = grpo_advantages(rewards, groups, valid, eps=0.0)
    std = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)   # unbiased std of 1,2,3,4 = 1.29099
    expected = torch.tensor([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0.0, 0.0])
    # group 1 has equal rewards: zero advantage, not NaN (0/0 with eps=0)
    assert torch.allclose(adv, expected, atol=1e-6)


def test_grpo_equal_rewards_give_zero_not_nan():
    adv = grpo_advantages(torch.tensor([3.0, 3.0, 3.0]), torch.zeros(3, dtype=torch.long),
                          torch.ones(3, dtype=torch.bool))
    assert torch.equal(adv, torch.zeros(3))


def test_invalid_samples_are_left_out_of_group_statistics():
    rewards = torch.tensor([1.0, 3.0, 100.0])     # the 100 is a failed judgement: must not move the baseline
    valid = torch.tensor([True, True, False])
    adv = grpo_advantages(rewards, torch.zeros(3, dtype=torch.long), valid, eps=0.0)
    assert torch.allclose(adv, torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]), atol=1e-6)


def test_single_valid_sample_gets_zero_advantage():
    adv = grpo_advantages(torch.tensor([5.0, 1.0]), torch.tensor([0, 0]), torch.tensor([True, False]))
    assert torch.equal(adv, torch.zeros(2))


def test_dr_grpo_numerator_does_not_divide_by_std():
    adv = grpo_advantages(torch.tensor([0.0, 4.0]), torch.tensor([0, 0]), torch.ones(2, dtype=torch.bool),
                          normalize_std=False)
    assert torch.allclose(adv, torch.tensor([-2.0, 2.0]))


@pytest.mark.parametrize("scale", [0.01, 1.0, 1000.0])
def test_grpo_is_scale_invariant(scale):
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.7])
    groups, valid = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool)
    assert torch.allclose(grpo_advantages(rewards * scale, groups, valid, eps=0.0),
                          grpo_advantages(rewards, groups, valid, eps=0.0), atol=1e-5)


from openrlaif.algorithms import (dr_grpo_advantages, gae_advantages, reinforce_pp_advantages,  # noqa: E402
                                  remax_advantages, rloo_advantages)


def test_rloo_baseline_excludes_the_sample_itself():
    rewards = torch.tensor([1.0, 2.0, 6.0])
    adv = rloo_advantages(rewards, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    assert torch.allclose(adv, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    # RLOO = k/(k-1) · (r - mean): the same direction as the group-mean baseline, scaled
    assert torch.allclose(adv, 3 / 2 * (rewards - rewards.mean()))


def test_rloo_skips_failed_samples_and_lonely_groups():
    adv = rloo_advantages(torch.tensor([1.0, 3.0, 50.0, 7.0]), torch.tensor([0, 0, 0, 1]),
                          torch.tensor([True, True, False, True]))
    assert adv.tolist() == [-2.0, 2.0, 0.0, 0.0]


def test_dr_grpo_is_group_mean_centred():
    adv = dr_grpo_advantages(torch.tensor([1.0, 3.0]), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool))
    assert adv.tolist() == [-1.0, 1.0]


def test_remax_subtracts_the_greedy_reward():
    adv = remax_advantages(torch.tensor([0.9, 0.2]), torch.tensor([0.5, 0.5]), torch.tensor([True, False]))
    assert torch.allclose(adv, torch.tensor([0.4, 0.0]))
    # with a zero greedy reward ReMax is plain REINFORCE
    assert torch.equal(remax_advantages(torch.tensor([0.3]), torch.zeros(1), torch.ones(1, dtype=torch.bool)),
                       torch.tensor([0.3]))


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.ones(2, 5)
    gamma = 0.9
    adv, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=1.0)
    discounted = torch.zeros(2, 5)
    for t in range(5):
        discounted[:, t] = sum(gamma ** (k - t) * rewards[:, k] for k in range(t, 5))
    assert torch.allclose(adv, discounted - values, atol=1e-5)
    assert torch.allclose(returns, discounted, atol=1e-5)


def test_gae_with_lambda_zero_is_one_step_td_error_and_respects_mask():
    rewards = torch.tensor([[1.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.25, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.0)
    assert torch.allclose(adv, torch.tensor([[1.0 + 0.25 - 0.5, 2.0 + 0.0 - 0.25, 0.0]]))


def test_reinforce_pp_returns_are_whitened_and_carry_the_kl_penalty():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl = torch.full((2, 3), 0.5)
    adv = reinforce_pp_advantages(rewards, mask, kl=kl, kl_coef=0.2)
    # returns: row0 = [1 - 0.2, 1 - 0.1] ; row1 = [-0.3, -0.2, -0.1]
    raw = torch.tensor([0.8, 0.9, -0.3, -0.2, -0.1])
    expected = (raw - raw.mean()) / raw.std(unbiased=False)
    assert torch.allclose(adv[mask.bool()], expected, atol=1e-4)
    assert float(adv[0, 2]) == 0.0


def test_reinforce_pp_baseline_subtracts_the_group_mean_first():
    mask = torch.ones(4, 1)
    adv = reinforce_pp_advantages(torch.tensor([1.0, 3.0, 10.0, 10.0]), mask, group_ids=torch.tensor([0, 0, 1, 1]),
                                  baseline=True)
    # centred rewards [-1, 1, 0, 0], then whitened: std over the 4 tokens = sqrt(0.5)
    assert torch.allclose(adv.squeeze(-1), torch.tensor([-1.0, 1.0, 0.0, 0.0]) / 0.5 ** 0.5, atol=1e-4)


def test_distillation_adds_the_negative_per_token_reverse_kl_to_the_advantages():
    """A_t = A + coef·(log π_teacher(y_t) − log π_student(y_t)) on response tokens, 0 elsewhere; sequence-level
    advantages are broadcast over their tokens first."""
    from openrlaif.algorithms.advantages import distillation_advantages
    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    teacher = torch.tensor([[-0.5, -4.0, -0.5], [-0.2, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = distillation_advantages(torch.tensor([1.0, -1.0]), student, teacher, mask, coef=0.5)
    expected = torch.tensor([[1.0 + 0.25, 1.0 - 1.0, 1.0 + 0.0], [-1.0 - 0.05, -1.0 + 1.0, 0.0]])
    assert torch.allclose(out, expected)
    token_level = torch.tensor([[0.3, 0.2, 0.1], [0.0, 0.5, 0.0]])
    assert torch.allclose(distillation_advantages(token_level, student, teacher, mask, coef=1.0),
                          token_level + torch.tensor([[0.5, -2.0, 0.0], [-0.1, 2.0, 0.0]]))
    # distillation alone (no feedback: zero advantages): a token the teacher likes more than the student is pushed up
    alone = distillation_advantages(torch.zeros(2), student, teacher, mask, coef=1.0)
    assert alone[0, 0] > 0 > alone[0, 1] and alone[1, 2] == 0
