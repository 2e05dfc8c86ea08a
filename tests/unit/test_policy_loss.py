import math

import torch

import pytest

from openrlaif.algorithms import kl_k1, kl_k2, kl_k3, masked_mean, ppo_clip_loss
from openrlaif.algorithms.policy_loss import aggregate


def test_ppo_clip_hand_computed():
    # three tokens of one sequence: ratios 1.5, 0.5, 1.5; advantages +1, +1, -1; eps 0.2
    old = torch.zeros(3, 3)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.5]] * 3))
    advantages = torch.tensor([[1.0, 1.0, -1.0]] * 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = ppo_clip_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    # token 1: min(1.5, 1.2)=1.2 -> -1.2 ; token 2: min(0.5, 0.8)=0.5 -> -0.5 ; token 3: min(-1.5, -1.2) -> +1.5
    assert math.isclose(float(out.loss), (-1.2 - 0.5 + 1.5) / 3, rel_tol=1e-6)
    assert math.isclose(float(out.clip_fraction), 1 / 3, rel_tol=1e-6)   # only token 1 is clipped


def test_on_policy_gradient_is_advantage_weighted_logprob_gradient():
    logits = torch.randn(2, 4, requires_grad=True)
    logprobs = logits.log_softmax(-1)[:, :3]
    advantages = torch.tensor([0.7, -0.3])
    mask = torch.ones(2, 3)
    out = ppo_clip_loss(logprobs, logprobs.detach(), advantages, mask)
    (grad,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
    reference = -(advantages.unsqueeze(-1) * logprobs).sum() / mask.sum()
    (expected,) = torch.autograd.grad(reference, logits)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert math.isclose(float(out.ratio_mean), 1.0)


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert math.isclose(float(kl_k1(logp, ref)), 1.0)
    assert math.isclose(float(kl_k2(logp, ref)), 0.5)
    assert math.isclose(float(kl_k3(logp, ref)), math.exp(-1.0) + 1.0 - 1.0, rel_tol=1e-6)
    assert float(kl_k3(ref, ref)) == 0.0


def test_k3_is_unbiased_estimate_of_true_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = float(kl_k3(p.log()[samples], q.log()[samples]).mean())
    assert abs(estimate - true_kl) < 0.01


def test_kl_term_enters_loss_with_its_coefficient():
    logp = torch.full((1, 2), -1.0)
    ref = torch.full((1, 2), -2.0)
    out = ppo_clip_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.1)
    assert math.isclose(float(out.loss), 0.1 * math.exp(-1.0), rel_tol=1e-6)


def test_micro_batches_with_global_token_count_equal_the_full_batch():
    """Gradient accumulation invariant: two micro-batches normalised by the global count = one big batch."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7, requires_grad=True)
    actions = torch.randint(0, 7, (4, 5))
    logprobs = logits.log_softmax(-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    old = logprobs.detach() + 0.1 * torch.randn(4, 5)
    ref = logprobs.detach() - 0.2
    advantages = torch.randn(4)
    mask = (torch.rand(4, 5) > 0.3).float()
    full = ppo_clip_loss(logprobs, old, advantages, mask, ref_logprobs=ref, kl_coef=0.05).loss
    (full_grad,) = torch.autograd.grad(full, logits, retain_graph=True)
    total = float(mask.sum())
    parts = [ppo_clip_loss(logprobs[i:i + 2], old[i:i + 2], advantages[i:i + 2], mask[i:i + 2],
                           ref_logprobs=ref[i:i + 2], kl_coef=0.05, num_tokens=total).loss for i in (0, 2)]
    (split_grad,) = torch.autograd.grad(sum(parts), logits)
    assert torch.allclose(sum(parts), full, atol=1e-6)
    assert torch.allclose(split_grad, full_grad, atol=1e-6)


def test_masked_mean_ignores_masked_values_and_empty_mask_is_zero():
    values = torch.tensor([1.0, 100.0, 3.0])
    assert float(masked_mean(values, torch.tensor([1.0, 0.0, 1.0]))) == 2.0
    assert float(masked_mean(values, torch.zeros(3))) == 0.0


def one_token(ratio: float, advantage: float, **kwargs):
    return ppo_clip_loss(torch.log(torch.tensor([[ratio]])), torch.zeros(1, 1), torch.tensor([advantage]),
                         torch.ones(1, 1), **kwargs)


def test_clip_higher_uses_its_own_upper_bound():
    assert float(one_token(1.5, 1.0, clip_eps=0.2).loss) == pytest.approx(-1.2)
    assert float(one_token(1.5, 1.0, clip_eps=0.2, clip_eps_high=0.28).loss) == pytest.approx(-1.28)
    assert float(one_token(0.5, -1.0, clip_eps=0.2, clip_eps_high=0.28).loss) == pytest.approx(0.8)  # lower ε unchanged


def test_dual_clip_caps_negative_advantage_losses():
    assert float(one_token(5.0, -1.0).loss) == pytest.approx(5.0)
    assert float(one_token(5.0, -1.0, dual_clip=3.0).loss) == pytest.approx(3.0)
    assert float(one_token(5.0, 1.0, dual_clip=3.0).loss) == pytest.approx(-1.2)   # positive A: untouched


def test_entropy_bonus_lowers_the_loss():
    out = one_token(1.0, 0.0, entropy=torch.tensor([[2.0]]), entropy_coef=0.01)
    assert float(out.loss) == pytest.approx(-0.02) and float(out.entropy) == pytest.approx(2.0)


def test_sequence_mean_aggregation_weighs_sequences_equally():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(aggregate(values, mask, "token_mean")) == pytest.approx(8 / 5)
    assert float(aggregate(values, mask, "seq_mean_token_mean")) == pytest.approx((1.0 + 4.0) / 2)
    with pytest.raises(ValueError):
        aggregate(values, mask, "sum")


def test_sequence_mean_micro_batches_with_global_sequence_count_equal_the_full_batch():
    torch.manual_seed(1)
    logprobs = torch.randn(4, 6, requires_grad=True)
    old, advantages = logprobs.detach() + 0.05, torch.randn(4)
    mask = torch.tensor([[1.0] * 6, [1.0] * 2 + [0.0] * 4, [1.0] * 5 + [0.0], [1.0] + [0.0] * 5])
    full = ppo_clip_loss(logprobs, old, advantages, mask, loss_agg="seq_mean_token_mean").loss
    parts = sum(ppo_clip_loss(logprobs[i:i + 2], old[i:i + 2], advantages[i:i + 2], mask[i:i + 2],
                              loss_agg="seq_mean_token_mean", num_tokens=4.0).loss for i in (0, 2))
    assert torch.allclose(parts, full, atol=1e-6)


def test_importance_weights_scale_each_tokens_loss_and_carry_no_gradient():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = logprobs.detach().clone()
    mask = torch.ones(1, 3)
    weights = torch.tensor([[1.0, 0.5, 2.0]], requires_grad=True)
    plain = ppo_clip_loss(logprobs, old, torch.tensor([1.0]), mask)
    weighted = ppo_clip_loss(logprobs, old, torch.tensor([1.0]), mask, is_weights=weights)
    # at ratio 1 each token's surrogate is -A; the weights make it -(1 + 0.5 + 2) / 3
    assert plain.policy_loss.item() == pytest.approx(-1.0)
    assert weighted.policy_loss.item() == pytest.approx(-3.5 / 3)
    weighted.loss.backward()
    assert weights.grad is None                              # detached inside the loss
    assert logprobs.grad[0].tolist() == pytest.approx([-1 / 3, -0.5 / 3, -2 / 3])
