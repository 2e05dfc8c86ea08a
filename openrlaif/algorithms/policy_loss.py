"""Policy losses over response tokens. Shapes: (B, T) per-token tensors, (B,) per-sequence advantages."""
from dataclasses import dataclass

import torch
from torch import Tensor

from openrlaif.algorithms.core import masked_mean, masked_sum
from openrlaif.algorithms.kl import KL_ESTIMATORS


@dataclass
class PolicyLossOutput:
    loss: Tensor            # scalar to back-propagate
    policy_loss: Tensor     # scalar, the clipped surrogate part
    kl: Tensor              # scalar, mean per-token KL estimate (0 when kl_coef == 0 and no ref given)
    clip_fraction: Tensor   # scalar, share of tokens whose loss came from the clipped term
    ratio_mean: Tensor      # scalar


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                  clip_eps: float = 0.2, ref_logprobs: Tensor | None = None, kl_coef: float = 0.0,
                  kl_estimator: str = "k3", num_tokens: float | None = None) -> PolicyLossOutput:
    """PPO-clip surrogate (Schulman et al. 2017, eq. 7) plus β·KL to the reference in the loss (GRPO, eq. 3).

    L = mean_tokens[ −min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A) + β · KL_t ],  ρ_t = exp(log π_θ − log π_old).
    Token-mean over all unmasked tokens of the batch (DAPO-style aggregation, unbiased across lengths).
    advantages may be (B,) (broadcast over tokens) or (B, T).
    num_tokens: the token count of the whole mini-batch when this call sees one micro-batch of it, so that
    gradient accumulation and data parallelism give exactly the big-batch token mean (the caller undoes the
    engines' 1/accumulation and 1/world averaging); None means this call sees the whole batch.
    """
    def aggregate(values: Tensor) -> Tensor:
        if num_tokens is None:
            return masked_mean(values, mask)
        return masked_sum(values, mask) / num_tokens

    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    policy_loss = aggregate(per_token)
    if ref_logprobs is not None:
        kl = aggregate(KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs))
    else:
        kl = torch.zeros((), dtype=logprobs.dtype)
    loss = policy_loss + kl_coef * kl
    with torch.no_grad():
        # the clip is active where the clipped term wins the min (PPO's clipfrac)
        clip_fraction = masked_mean((clipped < unclipped).to(logprobs.dtype), mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOutput(loss, policy_loss.detach(), kl.detach(), clip_fraction, ratio_mean)


POLICY_LOSSES = {"ppo_clip": ppo_clip_loss}
