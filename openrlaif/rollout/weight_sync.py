"""Weight sync, trainer -> engines, after every update (and on resume)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import ray

from openrlaif.config import Config, lora_sync

if TYPE_CHECKING:
    from openrlaif.roles import Roles


def sync_weights(roles: Roles, cfg: Config, step: int) -> dict[str, float]:
    """The trainer's weights to the engines, one bucket at a time (`rollout.sync_bucket_mb` of whole decoder
    layers): every actor rank gathers the bucket (a collective under ZeRO-3), rank 0 packs it, the engines load it
    from the object store (`rollout.weight_sync=object_store`) or receive it as rank 0 broadcasts it over their
    own process group (`collective`), then the next. So rank 0 never holds more than a bucket of gathered weights (the whole
    model with sync_bucket_mb=0). A judge that follows the policy (self-rewarding) loads them too, and its verdicts
    are cached per policy version. Metrics: the engines' load seconds summed over the buckets (sync/engine_s), the
    buckets, the most gathered MiB rank 0 held at once (sync/gathered_mib_peak), the MiB sent (sync/mib), and whether
    the collective path carried them (sync/collective). A LoRA policy sends vLLM its adapters alone, in one piece
    (actor.lora.sync=adapter, sync/adapter)."""
    if cfg.rollout.sleep_between_steps:   # asleep since the rollout; level 2's weights come with this sync
        ray.get(roles.rollout.call(lambda w: w.wake_up.remote()))
    targets = [roles.rollout]
    if cfg.feedback.judge.follow_policy and roles.judge is not None:
        targets.append(roles.judge)
    if lora_sync(cfg) == "adapter":   # LoRA: only the adapters travel, one small piece
        adapter_refs = roles.actor.call(lambda w: w.packed_adapter.remote(cfg.rollout.dtype))
        load_refs = roles.rollout.call(lambda w: w.update_adapter.remote(adapter_refs[0]))
        results = ray.get(adapter_refs[1:] + load_refs)
        peak, sent = ray.get(roles.actor.call(lambda w: w.take_sync_bytes.remote()))[0]
        return {"sync/engine_s": max(results[len(adapter_refs) - 1:]), "sync/buckets": 1.0,
                "sync/gathered_mib_peak": peak / 2 ** 20, "sync/mib": sent / 2 ** 20, "sync/collective": 0.0,
                "sync/adapter": 1.0}
    plan = bucket_plan(roles, cfg)
    if weight_sync_path(cfg) == "collective":
        join_sync_group(roles, targets, cfg)
        seconds = sum(broadcast_bucket(roles, targets, names, cfg.rollout.dtype) for names in plan)
    else:
        seconds = sum(sync_bucket(roles, targets, names, cfg.rollout.dtype) for names in plan)
    if len(targets) > 1:
        roles.judge_client.set_policy_version(step)
    peak, sent = ray.get(roles.actor.call(lambda w: w.take_sync_bytes.remote()))[0]
    return {"sync/engine_s": seconds, "sync/buckets": float(len(plan)),
            "sync/gathered_mib_peak": peak / 2 ** 20, "sync/mib": sent / 2 ** 20,
            "sync/collective": float(weight_sync_path(cfg) == "collective")}


def bucket_plan(roles: Roles, cfg: Config) -> list[list[str]]:
    """The buckets' tensor names (whole decoder layers, about rollout.sync_bucket_mb each), asked once per run."""
    if roles.sync_plan is None:
        roles.sync_plan = ray.get(roles.actor.call(
            lambda w: w.sync_plan.remote(cfg.rollout.dtype, cfg.rollout.sync_bucket_mb))[0])
    return roles.sync_plan


def sync_bucket(roles: Roles, targets: list, names: list[str], dtype: str) -> float:
    """One bucket, gathered by every actor rank, loaded by every engine; its refs (and so its copy in the object
    store) are gone when this returns, before the next bucket is gathered."""
    state_refs = roles.actor.call(lambda w: w.packed_weights.remote(dtype, names))
    load_refs = [ref for group in targets for ref in group.call(lambda w: w.update_weights.remote(state_refs[0]))]
    results = ray.get(state_refs[1:] + load_refs)   # ranks > 0 return None; engines return their load time
    return max(results[len(state_refs) - 1:])


def weight_sync_path(cfg: Config) -> str:
    """rollout.weight_sync, with `auto` resolved: collective (NCCL) where the trainer and the engines hold GPUs,
    else the object store, which measured faster on CPU (benchmarks/weight_sync.py)."""
    if cfg.rollout.weight_sync != "auto":
        return cfg.rollout.weight_sync
    return "collective" if on_gpus(cfg) else "object_store"


def on_gpus(cfg: Config) -> bool:
    """The trainer and the engines hold GPUs: the weight-sync group can be NCCL's."""
    return cfg.actor.resources.num_gpus > 0 and cfg.rollout.resources.num_gpus > 0


def join_sync_group(roles: Roles, targets: list, cfg: Config) -> None:
    """Once per run: trainer rank 0 and every engine worker of `targets` form the weight-sync group (gloo on CPU,
    NCCL when the roles hold GPUs). All members join at once: submit every join, then wait."""
    if roles.sync_group_size:
        return
    engines = [worker for group in targets for worker in group.workers]
    device = "cuda" if on_gpus(cfg) else "cpu"
    rank0 = roles.actor.workers[0]
    address, port = ray.get(rank0.open_weight_sync.remote())
    world = 1 + len(engines)
    ray.get([rank0.join_weight_sync.remote(world, device)] +
            [worker.join_weight_sync.remote(address, port, 1 + i, world, device) for i, worker in enumerate(engines)])
    roles.sync_group_size = world


def broadcast_bucket(roles: Roles, targets: list, names: list[str], dtype: str) -> float:
    """One bucket over the weight-sync group: every actor rank gathers it, rank 0 broadcasts it, every engine
    receives and loads it before this returns; the slowest engine's load seconds."""
    send_refs = roles.actor.call(lambda w: w.broadcast_weights.remote(dtype, names))
    load_refs = [ref for group in targets for ref in group.call(lambda w: w.receive_weights.remote())]
    results = ray.get(send_refs + load_refs)
    return max(results[len(send_refs):])
