"""Advantage estimators. Keys of ADVANTAGE_ESTIMATORS are the names users type (`algorithm.advantage=grpo`)."""
import torch
from torch import Tensor


def grpo_advantages(rewards: Tensor, group_ids: Tensor, valid: Tensor, eps: float = 1e-6,
                    normalize_std: bool = True) -> Tensor:
    """GRPO outcome advantages (DeepSeekMath §4.1.2): A_i = (r_i − mean(r_group)) / (std(r_group) + eps).

    rewards, group_ids, valid: (B,). Samples with valid=False (e.g. the judge failed) take no part in their
    group's statistics and get advantage 0; they are also masked out of the loss by the caller.
    std is the unbiased sample std (as in the paper's reference code and TRL); a group with one valid sample
    has std 0 and so advantage 0. normalize_std=False gives the Dr. GRPO numerator r_i − mean.
    """
    valid_f = valid.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    for group in torch.unique(group_ids):
        in_group = (group_ids == group) & valid
        count = int(in_group.sum())
        if count == 0:
            continue
        group_rewards = rewards[in_group]
        centered = group_rewards - group_rewards.mean()
        if normalize_std:
            std = group_rewards.std(unbiased=True) if count > 1 else torch.zeros((), dtype=rewards.dtype)
            # equal rewards: centred values are exactly 0; keep them 0 rather than 0/0 when eps is 0
            centered = centered / (std + eps) if float(std + eps) > 0 else torch.zeros_like(centered)
        advantages[in_group] = centered
    return advantages * valid_f


ADVANTAGE_ESTIMATORS = {"grpo": grpo_advantages}
