"""Policy losses over response tokens. Shapes: (B, T) per-token tensors, (B,) per-sequence advantages."""
from dataclasses import dataclass

import torch
from torch import Tensor

from openrlaif.algorithms.core import masked_mean
from openrlaif.algorithms.kl import KL_ESTIMATORS


@dataclass
class PolicyLossOutput:
    loss: Tensor            # scalar to back-propagate
    policy_loss: Tensor     # scalar, the clipped surrogate part
    kl: Tensor              # scalar, mean per-token KL estimate (0 when no reference is given)
    entropy: Tensor         # scalar, mean per-token entropy (0 when not given)
    clip_fraction: Tensor   # scalar, share of tokens whose loss came from the clipped term
    ratio_mean: Tensor      # scalar


def aggregate(values: Tensor, mask: Tensor, mode: str = "token_mean", normalizer: float | None = None) -> Tensor:
    """Reduce per-token values to the scalar loss.

    token_mean:          Σ_tokens v / #tokens (DAPO; every token weighs the same, whatever its sequence length)
    seq_mean_token_mean: mean over sequences of each sequence's token mean (the original GRPO objective)
    `normalizer` replaces the denominator (#tokens, or #sequences) by the count over the whole mini-batch when
    this call sees one micro-batch of it, so accumulation and data parallelism give the big-batch value.
    """
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        total = (values * mask).sum()
        return total / (normalizer if normalizer is not None else mask.sum().clamp(min=1.0))
    if mode == "seq_mean_token_mean":
        lengths = mask.sum(-1)
        per_sequence = (values * mask).sum(-1) / lengths.clamp(min=1.0)
        count = normalizer if normalizer is not None else (lengths > 0).sum().clamp(min=1)
        return per_sequence.sum() / count
    raise ValueError(f"unknown loss aggregation {mode!r}; use token_mean or seq_mean_token_mean")


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                  clip_eps: float = 0.2, ref_logprobs: Tensor | None = None, kl_coef: float = 0.0,
                  kl_estimator: str = "k3", num_tokens: float | None = None, clip_eps_high: float | None = None,
                  dual_clip: float | None = None, entropy: Tensor | None = None, entropy_coef: float = 0.0,
                  loss_agg: str = "token_mean", is_weights: Tensor | None = None) -> PolicyLossOutput:
    """PPO-clip surrogate (Schulman et al. 2017, eq. 7) plus β·KL to the reference in the loss (GRPO, eq. 3).

    L = agg[ −min(ρ_t A, clip(ρ_t, 1−ε_low, 1+ε_high) A) + β · KL_t − c_H · H_t ],  ρ_t = exp(log π_θ − log π_old).
    clip_eps_high (DAPO "clip-higher") defaults to clip_eps. dual_clip = c > 1 (Ye et al. 2020) caps the loss of
    negative-advantage tokens at c·|A| so a huge ratio cannot blow it up. advantages may be (B,) or (B, T).
    num_tokens: the normaliser of the whole mini-batch (#tokens for token_mean, #sequences for
    seq_mean_token_mean) when this call sees one micro-batch of it; None means this call sees the whole batch.
    is_weights (B, T), no gradient: per-token importance weights π_old / π_behaviour, already truncated, for
    samples drawn by an older policy than π_old (one-step-off rollouts; the decoupled PPO objective).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)
    return clipped_surrogate(ratio, logprobs, advantages, mask, 1.0 - clip_eps, 1.0 + high, dual_clip, is_weights,
                             loss_agg, num_tokens, ref_logprobs, kl_coef, kl_estimator, entropy, entropy_coef)


def clipped_surrogate(ratio: Tensor, logprobs: Tensor, advantages: Tensor, mask: Tensor, low: float, high: float,
                      dual_clip: float | None, is_weights: Tensor | None, loss_agg: str, num_tokens,
                      ref_logprobs: Tensor | None, kl_coef: float, kl_estimator: str, entropy: Tensor | None,
                      entropy_coef: float) -> PolicyLossOutput:
    """−min(ρA, clip(ρ, low, high)A) per token (with dual-clip and importance weights), aggregated, plus β·KL and
    the entropy bonus: PPO-clip's objective for any ratio ρ (the token ratio; GSPO's sequence ratio)."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(low, high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -dual_clip * advantages), per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    policy_loss = aggregate(per_token, mask, loss_agg, num_tokens)
    kl, mean_entropy = _extras(logprobs, mask, loss_agg, num_tokens, ref_logprobs, kl_estimator, entropy)
    loss = policy_loss + kl_coef * kl - entropy_coef * mean_entropy
    with torch.no_grad():
        # the clip is active where the clipped term wins the min (PPO's clipfrac)
        clip_fraction = masked_mean((clipped < unclipped).to(logprobs.dtype), mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOutput(loss, policy_loss.detach(), kl.detach(), mean_entropy.detach(), clip_fraction,
                            ratio_mean)


def _extras(logprobs: Tensor, mask: Tensor, loss_agg: str, num_tokens, ref_logprobs, kl_estimator: str,
            entropy) -> tuple[Tensor, Tensor]:
    """The KL-to-reference and entropy terms every policy loss adds (0 when not given)."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = aggregate(KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs), mask, loss_agg, num_tokens) \
        if ref_logprobs is not None else zero
    mean_entropy = aggregate(entropy, mask, loss_agg, num_tokens) if entropy is not None else zero
    return kl, mean_entropy


def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 3e-4,
              ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
              num_tokens: float | None = None, clip_eps_high: float | None = None, dual_clip: float | None = None,
              entropy: Tensor | None = None, entropy_coef: float = 0.0, loss_agg: str = "seq_mean_token_mean",
              is_weights: Tensor | None = None) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025, eq. 5-7): the sequence-level, length-normalised ratio
    s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp(mean_t(log π_θ − log π_old)), clipped per sequence:
    L = −min(s_i A_i, clip(s_i, 1−ε_low, 1+ε_high) A_i). Written as GSPO-token (eq. 13-14): each token carries
    s_{i,t} = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)], whose value is s_i and whose gradient is GSPO's, so every token of
    a sequence shares its clip decision; with per-token advantages (PPO's GAE, per-turn credit) they enter per
    token. The paper's ε is tiny (3e-4 / 4e-4): sequence ratios stay close to 1. Aggregated per sequence
    (seq_mean_token_mean). dual_clip does not apply; is_weights (one-step-off) multiply the per-token loss."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    maskf = mask.to(logprobs.dtype)
    lengths = maskf.sum(-1).clamp(min=1.0)
    log_seq_ratio = ((logprobs - old_logprobs) * maskf).sum(-1) / lengths          # (B,)
    # value exp(log s_i) at every token, gradient that of log π_θ(y_t)
    log_ratio = logprobs - logprobs.detach() + log_seq_ratio.detach().clamp(max=10.0).unsqueeze(-1)
    return clipped_surrogate(torch.exp(log_ratio), logprobs, advantages, mask, 1.0 - clip_eps, 1.0 + high, None,
                             is_weights, loss_agg, num_tokens, ref_logprobs, kl_coef, kl_estimator, entropy,
                             entropy_coef)


def cispo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 1.0,
               ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
               num_tokens: float | None = None, clip_eps_high: float | None = None, dual_clip: float | None = None,
               entropy: Tensor | None = None, entropy_coef: float = 0.0, loss_agg: str = "token_mean",
               is_weights: Tensor | None = None) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, Chen et al. 2025, eq. 4-5): clip the importance weight, not the update, and keep every
    token's gradient: L = −sg(clip(ρ_t, 1−ε_low, 1+ε_high)) · A_t · log π_θ(y_t), token-mean over the batch.
    The paper sets no lower bound (ε_low large: clip_eps=1 makes it 0) and tunes ε_high only (configs/algorithm/
    cispo.yaml: 4, a cap of 5 on the weight). dual_clip does not apply; is_weights multiply the weight."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)
    weight = ratio.clamp(max(1.0 - clip_eps, 0.0), 1.0 + high).detach()
    if is_weights is not None:
        weight = weight * is_weights.detach()
    per_token = -weight * advantages * logprobs
    policy_loss = aggregate(per_token, mask, loss_agg, num_tokens)
    kl, mean_entropy = _extras(logprobs, mask, loss_agg, num_tokens, ref_logprobs, kl_estimator, entropy)
    loss = policy_loss + kl_coef * kl - entropy_coef * mean_entropy
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio > 1.0 + high) | (ratio < 1.0 - clip_eps)).to(logprobs.dtype), mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOutput(loss, policy_loss.detach(), kl.detach(), mean_entropy.detach(), clip_fraction,
                            ratio_mean)


def mismatch_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, mode: str = "tis",
                     off_policy: bool = False, is_cap: float = 2.0, mis_low: float = 0.5,
                     mis_high: float = 2.0) -> tuple[Tensor | None, dict[str, float]]:
    """Importance weights π_old / π_behaviour (B, T), no gradient, for samples the behaviour policy drew: an older
    policy (off_policy: one-step-off rollouts) or the engine whose numerics differ from the trainer's.
    tis (or any off-policy batch): token-level truncated IS, w_t = min(ρ_t, is_cap) (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"). mis: sequence-level masked IS, a
    sequence whose geometric-mean ratio exp(mean_t log ρ_t) leaves [mis_low, mis_high] weighs 0, the others 1
    (times their TIS weights when off-policy). none (on-policy): None, nothing is corrected. Also returns sums
    for the metrics: is_weight, is_truncated and behaviour_kl over the valid tokens (k3 of KL(behaviour ‖ π_old)),
    and mis_dropped / behaviour_sequences over the sequences."""
    log_ratio = (old_logprobs - behaviour_logprobs).detach()
    ratio = torch.exp(log_ratio)
    mask = mask.to(ratio.dtype)
    stats = {"behaviour_kl": float(((ratio - 1 - log_ratio) * mask).sum()), "is_weight": 0.0, "is_truncated": 0.0,
             "mis_dropped": 0.0, "behaviour_sequences": 0.0}
    weights = None
    if off_policy or mode == "tis":
        weights = ratio.clamp(max=is_cap)
        stats["is_weight"] = float((weights * mask).sum())
        stats["is_truncated"] = float(((ratio > is_cap).to(ratio.dtype) * mask).sum())
    if mode == "mis":
        lengths = mask.sum(-1)
        sequence_ratio = torch.exp((log_ratio * mask).sum(-1) / lengths.clamp(min=1.0))
        keep = ((sequence_ratio >= mis_low) & (sequence_ratio <= mis_high)).to(ratio.dtype)
        stats["mis_dropped"] = float(((1 - keep) * (lengths > 0)).sum())
        stats["behaviour_sequences"] = float((lengths > 0).sum())
        weights = (weights if weights is not None else torch.ones_like(ratio)) * keep.unsqueeze(-1)
    return weights, stats


POLICY_LOSSES = {"ppo_clip": ppo_clip_loss, "gspo": gspo_loss, "cispo": cispo_loss}
