"""Direct preference losses. Keys of PREFERENCE_LOSSES are the names users type (`algorithm.loss=ipo`).

Inputs are per-sequence sums of token log-probs, shape (B,):
    chosen_logps, rejected_logps            log π_θ(y_w|x), log π_θ(y_l|x)
    ref_chosen_logps, ref_rejected_logps    log π_ref(...)  (reference-free losses ignore them)
    chosen_lengths, rejected_lengths        response token counts (length-normalised losses)
Each returns the per-pair loss, shape (B,); the caller averages.
Notation: h = [log π/π_ref](y_w) − [log π/π_ref](y_l), ℓ(z) = −log σ(z).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _margin(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
            ref_rejected_logps: Tensor) -> Tensor:
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
             label_smoothing: float = 0.0, **_) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): ℓ(βh). With label_smoothing ε it is cDPO:
    (1−ε)·ℓ(βh) + ε·ℓ(−βh), the loss under labels flipped with probability ε (soft label p = 1−ε)."""
    logits = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def robust_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
                    label_smoothing: float = 0.1, **_) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 8): [(1−ε)·ℓ(βh) − ε·ℓ(−βh)] / (1−2ε), an unbiased loss under a
    known flip rate ε (here `label_smoothing`, as in TRL's `robust`)."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_dpo needs a flip rate in [0, 0.5), got {label_smoothing}")
    logits = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1 - 2 * eps)


def ipo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
             rejected_lengths, beta: float = 0.1, **_) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h − 1/(2β))², with h on length-averaged log-probs as TRL computes it."""
    h = ((chosen_logps - ref_chosen_logps) / chosen_lengths
         - (rejected_logps - ref_rejected_logps) / rejected_lengths)
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta: float = 2.0,
               gamma: float = 0.5, **_) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free: ℓ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ)."""
    logits = beta * (chosen_logps / chosen_lengths - rejected_logps / rejected_lengths) - gamma
    return -F.logsigmoid(logits)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate over the whole range (Mächler 2012, "Accurately computing
    log(1 − exp(−|a|))"): log(−expm1(x)) for x > −ln 2, where 1 − exp(x) cancels, and log1p(−exp(x)) below. x is clamped just below 0
    (x = 0 is P = 1, whose log-odds are infinite); each branch sees only its own inputs, so neither can put a NaN
    into the other's gradient."""
    x = x.clamp(max=-1e-12)
    near_zero = x > -0.6931471805599453
    safe = torch.full_like(x, -1.0)
    return torch.where(near_zero, torch.log(-torch.expm1(torch.where(near_zero, x, safe))),
                       torch.log1p(-torch.exp(torch.where(near_zero, safe, x))))


def orpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta: float = 0.1, **_) -> Tensor:
    """ORPO (Hong et al. 2024, eq. 6-7), reference-free: NLL(y_w) + λ·ℓ(log odds(y_w) − log odds(y_l)),
    odds(y) = P/(1−P) with P = exp(mean token log-prob); λ = `beta`. log odds = log P − log(1 − P) with an exact
    log1mexp: near P = 1 (mean log-prob above about −1e-5) log1p(−exp(·)) loses its precision and, clamped at
    P < 1 − 1e-6, froze the rejected side's gradient."""
    chosen_mean, rejected_mean = chosen_logps / chosen_lengths, rejected_logps / rejected_lengths
    log_odds = (chosen_mean - log1mexp(chosen_mean)) - (rejected_mean - log1mexp(rejected_mean))
    return -chosen_mean - beta * F.logsigmoid(log_odds)


def kto_loss(logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl_logps: Tensor, ref_kl_logps: Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             kl_mean: Tensor | None = None) -> Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 8), unpaired good/bad samples, shape (B,) each.

    r = log π/π_ref(y); z₀ = max(0, mean log π/π_ref on mismatched (x, y′) pairs), no gradient (as TRL).
    desirable: w_D·(1 − σ(β(r − z₀)));  undesirable: w_U·(1 − σ(β(z₀ − r))).
    `kl_mean` overrides that mean (a data-parallel caller passes the all-reduced one).
    """
    kl_mean = (kl_logps - ref_kl_logps).mean() if kl_mean is None else kl_mean
    z0 = kl_mean.clamp(min=0).detach()
    log_ratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio)))
    return torch.where(desirable, good, bad)


def bco_loss(logps: Tensor, ref_logps: Tensor, desirable: Tensor, delta: Tensor | float,
             beta: float = 0.1) -> Tensor:
    """BCO (Jung et al. 2024, eq. 9): a binary classifier on the implicit reward r = β·log π/π_ref with the
    reward shift δ (the caller keeps a running mean of r, `bco_rewards`): −log σ(r − δ) for desirable samples,
    −log σ(−(r − δ)) for undesirable ones."""
    rewards = beta * (logps - ref_logps)
    return torch.where(desirable, -F.logsigmoid(rewards - delta), -F.logsigmoid(-(rewards - delta)))


def bco_rewards(logps: Tensor, ref_logps: Tensor, beta: float = 0.1) -> Tensor:
    """The implicit rewards whose running mean is BCO's δ (detached)."""
    return (beta * (logps - ref_logps)).detach()


def lipo_lambda_loss(logps: Tensor, ref_logps: Tensor, labels: Tensor, beta: float = 0.1,
                     mask: Tensor | None = None) -> Tensor:
    """LiPO-λ (Liu et al. 2024, eq. 11), listwise over K responses per prompt, shapes (B, K) -> (B,).

    s_i = β·log π/π_ref(y_i); loss = −Σ_{ψ_i > ψ_j} Δ_ij · log σ(s_i − s_j), with the LambdaLoss weight
    Δ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|, G = 2^ψ − 1, D(τ) = log2(1 + τ), τ = rank of s_i (1 = best,
    from the current scores, no gradient). `mask` (B, K) drops padded list entries.
    """
    scores = beta * (logps - ref_logps)
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    ranking_scores = scores.detach().masked_fill(~mask, float("-inf"))
    ranks = ranking_scores.argsort(-1, descending=True).argsort(-1).to(scores.dtype) + 1
    gain = 2.0 ** labels.to(scores.dtype) - 1
    discount = 1.0 / torch.log2(1 + ranks)
    delta = (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs() * (discount.unsqueeze(-1) - discount.unsqueeze(-2)).abs()
    better = (labels.unsqueeze(-1) > labels.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
    pair_loss = -F.logsigmoid(scores.unsqueeze(-1) - scores.unsqueeze(-2))
    return (delta * pair_loss * better).sum((-1, -2))


PREFERENCE_LOSSES = {
    "dpo": dpo_loss,
    "cdpo": dpo_loss,            # dpo with algorithm.label_smoothing > 0
    "robust_dpo": robust_dpo_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
REFERENCE_FREE = {"simpo", "orpo"}
# Unpaired (KTO, BCO) and listwise (LiPO-λ) losses take other inputs; they are registered by data shape.
UNPAIRED_LOSSES = {"kto": kto_loss, "bco": bco_loss}
LISTWISE_LOSSES = {"lipo": lipo_lambda_loss}


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Bradley–Terry reward-model loss (Ouyang et al. 2022; margin as in Llama 2): −log σ(r_w − r_l − m)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin)


def implicit_rewards(loss: str, logps: Tensor, ref_logps: Tensor, lengths: Tensor, beta: float) -> Tensor:
    """Per sequence, the reward a pairwise loss implicitly learns: what its logits compare between the chosen and
    the rejected answer, so that `chosen > rejected` is the loss's own preference (held-out pair accuracy,
    `eval.pairs`). DPO, cDPO, robust DPO: β·log π/π_ref (Rafailov et al., eq. 5); IPO: the length-averaged
    log π/π_ref; SimPO: β·mean log π; ORPO: the log odds of the mean token probability."""
    if loss == "ipo":
        return (logps - ref_logps) / lengths
    if loss == "simpo":
        return beta * logps / lengths
    if loss == "orpo":
        mean = logps / lengths
        return mean - log1mexp(mean)
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"no implicit reward for loss {loss!r}: one of {sorted(PREFERENCE_LOSSES)}")
    return beta * (logps - ref_logps)
