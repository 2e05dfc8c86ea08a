"""Pure tensor maths for RL and preference learning. Imports torch only (tests/unit/test_layering.py)."""
from openrlaif.algorithms.core import masked_mean, masked_sum
from openrlaif.algorithms.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3
from openrlaif.algorithms.advantages import (ADVANTAGE_ESTIMATORS, dr_grpo_advantages, gae_advantages,
                                             grpo_advantages, reinforce_pp_advantages, remax_advantages,
                                             rloo_advantages, whiten)
from openrlaif.algorithms.preference import PREFERENCE_LOSSES, bradley_terry_loss
from openrlaif.algorithms.policy_loss import POLICY_LOSSES, ppo_clip_loss

__all__ = [
    "masked_mean", "masked_sum",
    "KL_ESTIMATORS", "kl_k1", "kl_k2", "kl_k3",
    "ADVANTAGE_ESTIMATORS", "grpo_advantages", "dr_grpo_advantages", "rloo_advantages", "remax_advantages",
    "reinforce_pp_advantages", "gae_advantages", "whiten",
    "PREFERENCE_LOSSES", "bradley_terry_loss",
    "POLICY_LOSSES", "ppo_clip_loss",
]
