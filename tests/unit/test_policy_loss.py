import math
import os

import torch

import pytest

from openrlaif.algorithms import kl_k1, kl_k2, kl_k3, masked_mean, ppo_clip_loss
from openrlaif.algorithms.policy_loss import aggregate

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "algorithm")


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


def test_gspo_clips_a_length_normalised_sequence_ratio_hand_computed():
    """GSPO (Zheng et al. 2025): s_i = exp(mean_t(log π_θ − log π_old)), one clip decision per sequence."""
    from openrlaif.algorithms.policy_loss import gspo_loss
    old = torch.zeros(3, 2)
    logprobs = torch.tensor([[0.1, -0.3], [0.5, 9.0], [0.4, 0.4]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])      # sequence 1 has one token
    advantages = torch.tensor([1.0, -1.0, 1.0])
    out = gspo_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    s0, s1 = math.exp(-0.1), math.exp(0.5)   # sequence 2's ratio e^0.4 = 1.49 is past 1.2
    # seq 0 inside the band: −s0; seq 1 (A < 0): min(−s1, −1.2) = −s1, loss +s1; seq 2 (A > 0) clipped at 1.2
    expected = (-s0 + s1 - 1.2) / 3
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    grad = logprobs.grad
    # d/d log π_t of −A·s_i / 3 sequences: −A · s_i / |y_i| / 3, the same for every token of the sequence
    assert grad[0].tolist() == pytest.approx([-s0 / 2 / 3] * 2, rel=1e-5)
    assert grad[1].tolist() == pytest.approx([s1 / 3, 0.0], rel=1e-5)
    assert grad[2].tolist() == [0.0, 0.0]                            # the whole clipped sequence gets none
    assert float(out.clip_fraction) == pytest.approx(2 / 5)          # its two tokens of the five valid ones


def test_gspo_equals_the_token_ratio_on_one_token_sequences_and_ppo_differs_on_long_ones():
    """On one-token responses the sequence ratio is the token ratio: GSPO's loss is PPO-clip's (seq mean)."""
    from openrlaif.algorithms.policy_loss import gspo_loss
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(6, 1, generator=generator)
    logprobs = old + 0.3 * torch.randn(6, 1, generator=generator)
    advantages, mask = torch.randn(6, generator=generator), torch.ones(6, 1)
    gspo = gspo_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    ppo = ppo_clip_loss(logprobs, old, advantages, mask, clip_eps=0.2, loss_agg="seq_mean_token_mean")
    assert float(gspo.loss) == pytest.approx(float(ppo.loss), rel=1e-6)
    old, logprobs = torch.zeros(1, 2), torch.tensor([[0.5, -0.5]])   # token ratios e^±0.5, sequence ratio 1
    gspo = gspo_loss(logprobs, old, torch.ones(1), torch.ones(1, 2), clip_eps=0.2)
    assert float(gspo.loss) == pytest.approx(-1.0) and float(gspo.clip_fraction) == 0.0


def test_cispo_weights_every_tokens_log_prob_by_its_clipped_stop_gradient_ratio():
    """CISPO (MiniMax-M1): −sg(clip(ρ_t, 1−ε_low, 1+ε_high)) · A · log π_θ: a token past the cap keeps a gradient
    (PPO-clip gives it none), weighted by the cap."""
    from openrlaif.algorithms.policy_loss import cispo_loss
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[0.1, 2.0]], requires_grad=True)
    out = cispo_loss(logprobs, old, torch.ones(1), torch.ones(1, 2), clip_eps=1.0, clip_eps_high=0.5)
    w0, w1 = math.exp(0.1), 1.5                                      # the second ratio, e^2, capped at 1.5
    assert float(out.loss.detach()) == pytest.approx(-(w0 * 0.1 + w1 * 2.0) / 2, rel=1e-6)
    out.loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([-w0 / 2, -w1 / 2], rel=1e-6)
    assert float(out.clip_fraction) == pytest.approx(0.5)
    ppo_lp = torch.tensor([[0.1, 2.0]], requires_grad=True)
    ppo_clip_loss(ppo_lp, old, torch.ones(1), torch.ones(1, 2), clip_eps=0.2).loss.backward()
    assert ppo_lp.grad[0, 1] == 0.0                                  # PPO drops the clipped token's gradient
    # on-policy (ρ = 1) the gradient is REINFORCE's: −A · ∇log π / #tokens
    on = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    cispo_loss(on, on.detach(), torch.tensor([2.0]), torch.ones(1, 2)).loss.backward()
    assert on.grad[0].tolist() == pytest.approx([-1.0, -1.0])


def test_the_new_policy_losses_have_configs():
    import yaml

    from openrlaif.algorithms import POLICY_LOSSES
    for name in ("gspo", "cispo"):
        config = yaml.safe_load(open(os.path.join(CONFIGS, f"{name}.yaml")))
        assert config["policy_loss"] == name and name in POLICY_LOSSES


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "cispo"])
def test_every_policy_loss_takes_the_actors_arguments(name):
    """The actor calls each registered loss with the same keywords (workers/actor.py): all of them take them,
    give a finite loss with a gradient, and add β·KL and the entropy bonus the same way."""
    from openrlaif.algorithms import POLICY_LOSSES
    generator = torch.Generator().manual_seed(1)
    logprobs = (-torch.rand(4, 5, generator=generator)).requires_grad_()
    old, ref = logprobs.detach() - 0.01, logprobs.detach() - 0.2
    mask = torch.ones(4, 5)
    mask[0, 3:] = 0
    kwargs = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=None, ref_logprobs=ref, kl_coef=0.0, kl_estimator="k3",
                  entropy=torch.rand(4, 5, generator=generator), entropy_coef=0.0, loss_agg="token_mean",
                  num_tokens=18.0, is_weights=torch.ones(4, 5))
    out = POLICY_LOSSES[name](logprobs, old, torch.randn(4, generator=generator), mask, **kwargs)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and logprobs.grad.abs().sum() > 0
    assert logprobs.grad[0, 3:].abs().sum() == 0                     # masked tokens get no gradient
    with_terms = POLICY_LOSSES[name](logprobs, old, torch.zeros(4), mask, **kwargs | dict(kl_coef=0.5, entropy_coef=0.1))
    assert float(with_terms.loss.detach()) == pytest.approx(
        float(with_terms.policy_loss) + 0.5 * float(with_terms.kl) - 0.1 * float(with_terms.entropy), rel=1e-6)


def test_mismatch_weights_tis_truncates_and_mis_drops_sequences_outside_the_band():
    from openrlaif.algorithms.policy_loss import mismatch_weights
    old = torch.zeros(3, 2)
    # ratios π_old / π_engine: seq 0 (e^0.1, e^-0.1), seq 1 (e^1.5, e^1.5), seq 2 (e^-1, padding)
    behaviour = torch.tensor([[-0.1, 0.1], [-1.5, -1.5], [1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    weights, stats = mismatch_weights(old, behaviour, mask, "tis", is_cap=2.0)
    expected = [[math.exp(0.1), math.exp(-0.1)], [2.0, 2.0], [math.exp(-1.0), 0.0]]   # e^1.5 = 4.48 > 2: capped
    assert (weights * mask).tolist() == [pytest.approx(row, rel=1e-6) for row in expected]
    assert stats["is_truncated"] == 2.0 and stats["mis_dropped"] == 0.0
    weights, stats = mismatch_weights(old, behaviour, mask, "mis", mis_low=0.5, mis_high=2.0)
    # geometric means: 1, e^1.5 (out), e^-1 = 0.37 (out)
    assert weights.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert stats["mis_dropped"] == 2.0 and stats["behaviour_sequences"] == 3.0 and stats["is_weight"] == 0.0
    assert mismatch_weights(old, behaviour, mask, "none")[0] is None
    weights, _ = mismatch_weights(old, behaviour, mask, "none", off_policy=True, is_cap=2.0)   # one-step-off
    assert weights[1].tolist() == [2.0, 2.0]                       # is always importance-weighted
    _, stats = mismatch_weights(old, old.clone(), mask, "tis")
    assert stats["behaviour_kl"] == 0.0 and stats["is_weight"] == float(mask.sum())
