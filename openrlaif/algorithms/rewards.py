"""Reward transforms from "Transforming and Combining Rewards for Aligning LLMs" (Wang et al. 2024), and DAPO's
overlong reward shaping."""
import torch
import torch.nn.functional as F
from torch import Tensor


def lsc_transform(rewards: Tensor, reference_rewards: Tensor) -> Tensor:
    """Log-sigmoid centred: u = log σ(r(x, y) − r_ref(x)), r_ref(x) a per-prompt reference reward (eq. 5).
    Bounded above by 0, so one objective cannot buy the sum by growing without limit ("good on all" = AND)."""
    return F.logsigmoid(rewards - reference_rewards)


def reference_reward(rewards: Tensor, quantile: float) -> float:
    """r_ref(x): the `quantile` of the rewards of the starting policy's samples for one prompt (the paper uses
    quantiles of base-policy samples; 0.5 is the median)."""
    return float(torch.quantile(rewards.float(), quantile))


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), L_max = max_new_tokens, L_cache = buffer:
    0 up to L_max − L_cache tokens, then ((L_max − L_cache) − |y|) / L_cache, falling linearly to −1 at L_max
    (scaled by `factor`); added to the reward."""
    start = max_new_tokens - buffer
    return -factor * ((lengths.float() - start).clamp(min=0.0) / buffer).clamp(max=1.0)


REWARD_TRANSFORMS = {"none", "lsc"}
