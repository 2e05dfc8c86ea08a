"""Weight sync, trainer -> engines, after every update (and on resume)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import ray

from openrlaif.config import Config

if TYPE_CHECKING:
    from openrlaif.roles import Roles


def sync_weights(roles: Roles, cfg: Config, step: int) -> float:
    """Rank 0 gathers full weights (a collective under ZeRO-3), the engines load them from the object store. A
    judge that follows the policy (self-rewarding) loads them too, and its verdicts are cached per policy version."""
    state_refs = roles.actor.call(lambda w: w.packed_weights.remote(cfg.rollout.dtype))
    targets = [roles.rollout]
    if cfg.feedback.judge.follow_policy and roles.judge is not None:
        targets.append(roles.judge)
    load_refs = [ref for group in targets for ref in group.call(lambda w: w.update_weights.remote(state_refs[0]))]
    results = ray.get(state_refs[1:] + load_refs)   # ranks > 0 return None; engines return their load time
    if len(targets) > 1:
        roles.judge_client.set_policy_version(step)
    return max(results[len(state_refs) - 1:])
