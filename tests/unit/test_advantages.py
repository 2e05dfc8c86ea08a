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
