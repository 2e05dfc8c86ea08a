"""Per-token estimators of KL(π_θ ‖ π_ref) from sampled-token log-probs (Schulman, "Approximating KL divergence", 2020).

All take log π_θ(a_t) and log π_ref(a_t) of the sampled tokens, shape (B, T), and return (B, T).
"""
import torch
from torch import Tensor


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log π_θ − log π_ref: unbiased, high variance, can be negative."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½ (log π_θ − log π_ref)²: biased, low variance, non-negative."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1: unbiased and non-negative (GRPO, DeepSeekMath eq. 4)."""
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # guard exp() against fp overflow on rare tokens
    return torch.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
