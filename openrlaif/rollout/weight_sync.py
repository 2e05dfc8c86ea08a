"""Weight sync, trainer -> engines, after every update (and on resume)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import ray

from openrlaif.config import Config

if TYPE_CHECKING:
    from openrlaif.roles import Roles


def sync_weights(roles: Roles, cfg: Config, step: int) -> dict[str, float]:
    """The trainer's weights to the engines, one bucket at a time (`rollout.sync_bucket_mb` of whole decoder
    layers): every actor rank gathers the bucket (a collective under ZeRO-3), rank 0 packs it, the engines load it
    from the object store, then the next. So rank 0 never holds more than a bucket of gathered weights (the whole
    model with sync_bucket_mb=0). A judge that follows the policy (self-rewarding) loads them too, and its verdicts
    are cached per policy version. Metrics: the engines' load seconds summed over the buckets (sync/engine_s), the
    buckets, and the most gathered MiB rank 0 held at once (sync/gathered_mib_peak)."""
    if roles.sync_plan is None:   # the buckets' names, once per run
        roles.sync_plan = ray.get(roles.actor.call(
            lambda w: w.sync_plan.remote(cfg.rollout.dtype, cfg.rollout.sync_bucket_mb))[0])
    targets = [roles.rollout]
    if cfg.feedback.judge.follow_policy and roles.judge is not None:
        targets.append(roles.judge)
    seconds = sum(sync_bucket(roles, targets, names, cfg.rollout.dtype) for names in roles.sync_plan)
    if len(targets) > 1:
        roles.judge_client.set_policy_version(step)
    peak = ray.get(roles.actor.call(lambda w: w.take_sync_peak_bytes.remote()))[0]
    return {"sync/engine_s": seconds, "sync/buckets": float(len(roles.sync_plan)),
            "sync/gathered_mib_peak": peak / 2 ** 20}


def sync_bucket(roles: Roles, targets: list, names: list[str], dtype: str) -> float:
    """One bucket, gathered by every actor rank, loaded by every engine; its refs (and so its copy in the object
    store) are gone when this returns, before the next bucket is gathered."""
    state_refs = roles.actor.call(lambda w: w.packed_weights.remote(dtype, names))
    load_refs = [ref for group in targets for ref in group.call(lambda w: w.update_weights.remote(state_refs[0]))]
    results = ray.get(state_refs[1:] + load_refs)   # ranks > 0 return None; engines return their load time
    return max(results[len(state_refs) - 1:])
