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
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -dual_clip * advantages), per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    policy_loss = aggregate(per_token, mask, loss_agg, num_tokens)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = aggregate(KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs), mask, loss_agg, num_tokens) \
        if ref_logprobs is not None else zero
    mean_entropy = aggregate(entropy, mask, loss_agg, num_tokens) if entropy is not None else zero
    loss = policy_loss + kl_coef * kl - entropy_coef * mean_entropy
    with torch.no_grad():
        # the clip is active where the clipped term wins the min (PPO's clipfrac)
        clip_fraction = masked_mean((clipped < unclipped).to(logprobs.dtype), mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOutput(loss, policy_loss.detach(), kl.detach(), mean_entropy.detach(), clip_fraction,
                            ratio_mean)


POLICY_LOSSES = {"ppo_clip": ppo_clip_loss}
