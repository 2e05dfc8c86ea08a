"""Pure tensor maths for RL and preference learning. Imports torch only (tests/unit/test_layering.py)."""
from openrlaif.algorithms.core import masked_mean, masked_sum
from openrlaif.algorithms.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3
from openrlaif.algorithms.advantages import ADVANTAGE_ESTIMATORS, grpo_advantages
from openrlaif.algorithms.policy_loss import POLICY_LOSSES, ppo_clip_loss

__all__ = [
    "masked_mean", "masked_sum",
    "KL_ESTIMATORS", "kl_k1", "kl_k2", "kl_k3",
    "ADVANTAGE_ESTIMATORS", "grpo_advantages",
    "POLICY_LOSSES", "ppo_clip_loss",
]
