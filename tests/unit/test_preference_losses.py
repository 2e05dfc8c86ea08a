import math

import pytest
import torch
import torch.nn.functional as F

from openrlaif.algorithms.preference import (PREFERENCE_LOSSES, bradley_terry_loss, dpo_loss, ipo_loss, orpo_loss,
                                             robust_dpo_loss, simpo_loss)


def pair(h: float):
    """Log-probs whose DPO margin h is given: chosen gains h over the reference, rejected stays put."""
    return dict(chosen_logps=torch.tensor([-10.0 + h]), rejected_logps=torch.tensor([-12.0]),
                ref_chosen_logps=torch.tensor([-10.0]), ref_rejected_logps=torch.tensor([-12.0]))


def test_dpo_is_ln2_at_zero_margin_and_hand_computed():
    assert float(dpo_loss(**pair(0.0))) == pytest.approx(math.log(2))
    assert float(dpo_loss(**pair(1.0), beta=0.1)) == pytest.approx(-math.log(1 / (1 + math.exp(-0.1))))


def test_cdpo_is_the_expected_loss_under_flipped_labels():
    eps, beta, h = 0.2, 0.5, 2.0
    expected = (1 - eps) * -math.log(1 / (1 + math.exp(-beta * h))) + eps * -math.log(1 / (1 + math.exp(beta * h)))
    assert float(dpo_loss(**pair(h), beta=beta, label_smoothing=eps)) == pytest.approx(expected)


def test_robust_dpo_equals_dpo_without_flips_and_is_debiased():
    assert float(robust_dpo_loss(**pair(1.3), label_smoothing=0.0)) == pytest.approx(float(dpo_loss(**pair(1.3))))
    eps, beta, h = 0.1, 0.1, 1.0
    ell = lambda z: -math.log(1 / (1 + math.exp(-z)))   # noqa: E731
    assert float(robust_dpo_loss(**pair(h), beta=beta, label_smoothing=eps)) == pytest.approx(
        ((1 - eps) * ell(beta * h) - eps * ell(-beta * h)) / (1 - 2 * eps))
    with pytest.raises(ValueError):
        robust_dpo_loss(**pair(1.0), label_smoothing=0.5)


def test_ipo_minimum_is_at_margin_one_over_two_beta():
    beta = 0.25
    lengths = dict(chosen_lengths=torch.tensor([1.0]), rejected_lengths=torch.tensor([1.0]))
    h = torch.tensor([1 / (2 * beta)], requires_grad=True)
    loss = ipo_loss(chosen_logps=-10.0 + h, rejected_logps=torch.tensor([-12.0]),
                    ref_chosen_logps=torch.tensor([-10.0]), ref_rejected_logps=torch.tensor([-12.0]),
                    beta=beta, **lengths)
    (grad,) = torch.autograd.grad(loss.sum(), h)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-10) and float(grad) == pytest.approx(0.0, abs=1e-6)


def test_simpo_and_orpo_hand_computed():
    chosen, rejected = torch.tensor([-4.0]), torch.tensor([-9.0])
    lengths = dict(chosen_lengths=torch.tensor([2.0]), rejected_lengths=torch.tensor([3.0]))
    # SimPO: logits = 2·(−2 − (−3)) − 0.5 = 1.5
    assert float(simpo_loss(chosen, rejected, beta=2.0, gamma=0.5, **lengths)) == pytest.approx(
        -math.log(1 / (1 + math.exp(-1.5))))
    # ORPO: mean log-probs −2 and −3; log odds = m − log(1 − e^m)
    odds = lambda m: m - math.log(1 - math.exp(m))   # noqa: E731
    expected = 2.0 - 0.1 * math.log(1 / (1 + math.exp(-(odds(-2.0) - odds(-3.0)))))
    assert float(orpo_loss(chosen, rejected, beta=0.1, **lengths)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("mean_logp", [-1e-7, -1e-6, -1e-5, -1e-3, -0.5, -0.7, -3.0, -30.0])
def test_orpo_log_odds_are_exact_near_p_equal_one(mean_logp):
    """log(1 − P) near P = 1 needs log(−expm1(x)): log1p(−exp(x)) loses its digits above x ≈ −1e-5, and a clamp
    on P froze the rejected side's gradient above x ≈ −1e-6. Value and gradient in float32 against float64."""
    def loss_and_grad(dtype):
        rejected = torch.tensor([mean_logp], dtype=dtype, requires_grad=True)
        one = torch.ones(1, dtype=dtype)
        loss = orpo_loss(torch.tensor([-2.0], dtype=dtype), rejected, chosen_lengths=one, rejected_lengths=one,
                         beta=0.1)
        (grad,) = torch.autograd.grad(loss.sum(), rejected)
        return float(loss.detach()), float(grad)

    loss32, grad32 = loss_and_grad(torch.float32)
    loss64, grad64 = loss_and_grad(torch.float64)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    assert grad32 == pytest.approx(grad64, rel=1e-3) and grad64 > 0   # pushing the rejected answer down


def test_log1mexp_is_exact_and_its_gradient_finite_on_both_branches():
    from openrlaif.algorithms.preference import log1mexp
    for value in (-1e-9, -1e-6, -0.5, -0.7, -3.0, -30.0):
        assert float(log1mexp(torch.tensor([value]))) == pytest.approx(math.log(-math.expm1(value)), rel=1e-6)
    x = torch.tensor([-1e-9, -0.69, -0.70, -50.0, 0.0], requires_grad=True)
    (grad,) = torch.autograd.grad(log1mexp(x).sum(), x)
    assert torch.isfinite(grad).all()


def test_matches_trl_documented_formulas_on_random_logprobs():
    """TRL's dpo_trainer computes sigmoid / robust / ipo from logits = h (length-averaged for ipo)."""
    torch.manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (-torch.rand(64) * 50 for _ in range(4))
    lengths_w, lengths_l = torch.randint(1, 40, (64,)).float(), torch.randint(1, 40, (64,)).float()
    beta, eps = 0.1, 0.15
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    trl_sigmoid = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    trl_robust = (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    ipo_logits = (chosen / lengths_w - rejected / lengths_l) - (ref_chosen / lengths_w - ref_rejected / lengths_l)
    trl_ipo = (ipo_logits - 1 / (2 * beta)) ** 2
    args = (chosen, rejected, ref_chosen, ref_rejected)
    assert torch.allclose(dpo_loss(*args, beta=beta, label_smoothing=eps), trl_sigmoid, atol=1e-6)
    assert torch.allclose(robust_dpo_loss(*args, beta=beta, label_smoothing=eps), trl_robust, atol=1e-6)
    assert torch.allclose(ipo_loss(*args, chosen_lengths=lengths_w, rejected_lengths=lengths_l, beta=beta),
                          trl_ipo, atol=1e-5)


def test_bradley_terry_margin_and_registry_names():
    assert float(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]))) == pytest.approx(math.log(2))
    assert float(bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=1.0)) == pytest.approx(math.log(2))
    assert {"dpo", "cdpo", "robust_dpo", "ipo", "simpo", "orpo"} <= PREFERENCE_LOSSES.keys()


from openrlaif.algorithms.preference import bco_loss, bco_rewards, kto_loss, lipo_lambda_loss  # noqa: E402


def test_kto_hand_computed_with_reference_point():
    logps, ref = torch.tensor([-5.0, -5.0]), torch.tensor([-6.0, -4.0])       # log ratios +1 and -1
    desirable = torch.tensor([True, False])
    kl_logps, ref_kl = torch.tensor([-3.0, -3.0]), torch.tensor([-3.5, -3.5])  # z0 = 0.5
    loss = kto_loss(logps, ref, desirable, kl_logps, ref_kl, beta=1.0, undesirable_weight=2.0)
    sig = lambda z: 1 / (1 + math.exp(-z))   # noqa: E731
    assert loss.tolist() == pytest.approx([1 - sig(1.0 - 0.5), 2.0 * (1 - sig(0.5 - (-1.0)))])
    # a negative batch KL estimate is clamped to 0
    clamped = kto_loss(logps, ref, desirable, kl_logps, kl_logps + 1.0, beta=1.0)
    assert clamped.tolist() == pytest.approx([1 - sig(1.0), 1 - sig(1.0)])


def test_bco_shifts_by_delta_and_matches_dpo_shape():
    logps, ref = torch.tensor([-5.0, -5.0]), torch.tensor([-6.0, -4.0])
    desirable = torch.tensor([True, False])
    rewards = bco_rewards(logps, ref, beta=0.5)
    assert rewards.tolist() == [0.5, -0.5]
    loss = bco_loss(logps, ref, desirable, delta=rewards.mean(), beta=0.5)
    ell = lambda z: -math.log(1 / (1 + math.exp(-z)))   # noqa: E731
    assert loss.tolist() == pytest.approx([ell(0.5), ell(0.5)])


def test_lipo_with_two_responses_is_dpo_scaled_by_the_lambda_weight():
    logps, ref = torch.tensor([[-4.0, -6.0]]), torch.tensor([[-5.0, -5.5]])
    loss = lipo_lambda_loss(logps, ref, labels=torch.tensor([[1.0, 0.0]]), beta=0.1)
    dpo = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
    weight = 1.0 * abs(1 / math.log2(2) - 1 / math.log2(3))      # |G1 - G0| · |1/D(1) - 1/D(2)|
    assert float(loss) == pytest.approx(weight * float(dpo))


def test_lipo_ignores_ties_and_masked_entries():
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.zeros(1, 3)
    assert float(lipo_lambda_loss(logps, ref, labels=torch.tensor([[2.0, 2.0, 2.0]]))) == 0.0
    masked = lipo_lambda_loss(logps, ref, labels=torch.tensor([[2.0, 1.0, 0.0]]),
                              mask=torch.tensor([[True, True, False]]))
    two = lipo_lambda_loss(logps[:, :2], ref[:, :2], labels=torch.tensor([[2.0, 1.0]]))
    assert float(masked) == pytest.approx(float(two))


def test_implicit_rewards_compare_what_each_loss_compares():
    """chosen − rejected implicit reward is the argument of each loss's logit (eval.pairs ranks by it), by hand."""
    from openrlaif.algorithms.preference import implicit_rewards, log1mexp, simpo_loss
    logps = torch.tensor([-6.0, -10.0], dtype=torch.float64)        # chosen, rejected: Σ log π
    ref = torch.tensor([-7.0, -8.0], dtype=torch.float64)
    lengths = torch.tensor([3.0, 5.0], dtype=torch.float64)
    beta = 0.1

    def margin(loss):
        r = implicit_rewards(loss, logps, ref, lengths, beta)
        return r[0] - r[1]

    # DPO: β[(−6+7) − (−10+8)] = 0.1·3 = 0.3; the loss is ℓ(0.3)
    assert float(margin("dpo")) == pytest.approx(0.3)
    assert float(dpo_loss(logps[:1], logps[1:], ref[:1], ref[1:], beta)) == pytest.approx(-math.log(torch.sigmoid(
        torch.tensor(0.3)).item()))
    assert float(margin("robust_dpo")) == float(margin("cdpo")) == float(margin("dpo"))
    # IPO: 1/3 − (−2/5) = 0.7333..., the loss (h − 1/2β)²
    assert float(margin("ipo")) == pytest.approx(1 / 3 + 2 / 5)
    assert float(ipo_loss(logps[:1], logps[1:], ref[:1], ref[1:], lengths[:1], lengths[1:], beta)) == pytest.approx(
        (1 / 3 + 2 / 5 - 5.0) ** 2)
    # SimPO: β(−2 − (−2)) = 0; its loss is ℓ(margin − γ)
    assert float(margin("simpo")) == pytest.approx(0.0)
    assert float(simpo_loss(logps[:1], logps[1:], lengths[:1], lengths[1:], beta=beta, gamma=0.5)) == pytest.approx(
        -math.log(torch.sigmoid(torch.tensor(-0.5)).item()))
    # ORPO: log odds of the mean token probability: m − log(1 − e^m), m = −2 for both here -> 0
    assert float(margin("orpo")) == pytest.approx(0.0)
    odds = implicit_rewards("orpo", torch.tensor([-1.0]), torch.zeros(1), torch.ones(1), beta)
    assert float(odds) == pytest.approx(-1.0 - math.log(1 - math.exp(-1.0)))
    assert float(log1mexp(torch.tensor(-1.0))) == pytest.approx(math.log(1 - math.exp(-1.0)))
    with pytest.raises(ValueError, match="kto"):
        implicit_rewards("kto", logps, ref, lengths, beta)
