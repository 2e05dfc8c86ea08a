"""Placement and fan-out. Each role gets its own placement group (one bundle per worker), so roles never share
a bundle unless a later option colocates them. Distribution shows at the call site:

    refs = group.map(lambda worker, shard: worker.logprobs.remote(shard), batch.split(len(group)))
"""
from __future__ import annotations

from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from openrlaif.config import ConfigError, RoleResources


def bundle(resources: RoleResources) -> dict[str, float]:
    spec = {"CPU": resources.num_cpus}
    if resources.num_gpus:
        spec["GPU"] = resources.num_gpus
    return spec


def check_cluster_fits(plan: dict[str, RoleResources]) -> None:
    """Fail before placing anything if the roles together ask for more than the cluster has."""
    need: dict[str, float] = {}
    for resources in plan.values():
        for key, value in bundle(resources).items():
            need[key] = need.get(key, 0.0) + value * resources.num_workers
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        per_role = ", ".join(f"{role}: {r.num_workers}×{bundle(r)}" for role, r in plan.items())
        missing = "; ".join(f"{k} needs {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        raise ConfigError(f"the roles do not fit the Ray cluster ({missing}). Roles ask for: {per_role}. "
                          "Fix: lower <role>.resources.num_workers/num_cpus/num_gpus, or add nodes "
                          "(local clusters: cluster.num_cpus).")


class WorkerGroup:
    """N Ray actors of one class, each pinned to its own bundle of one placement group."""

    def __init__(self, name: str, actor_class, resources: RoleResources,
                 make_kwargs: Callable[[int], dict[str, Any]], ready_timeout_s: float = 600.0) -> None:
        self.name = name
        self.placement = placement_group([bundle(resources)] * resources.num_workers, strategy="PACK",
                                         name=f"openrlaif-{name}")
        ready, _ = ray.wait([self.placement.ready()], timeout=ready_timeout_s)
        if not ready:
            remove_placement_group(self.placement)
            raise ConfigError(f"role {name!r}: its placement group ({resources.num_workers}×{bundle(resources)}) "
                              f"could not be placed in {ready_timeout_s:.0f} s. Fix: free or add resources.")
        self.workers = [
            actor_class.options(
                num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, name=f"openrlaif-{name}-{rank}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank),
            ).remote(**make_kwargs(rank))
            for rank in range(resources.num_workers)
        ]

    def __len__(self) -> int:
        return len(self.workers)

    def call(self, fn: Callable) -> list:
        """fn(worker) on every worker; returns the refs (submit all, then ray.get once)."""
        return [fn(worker) for worker in self.workers]

    def map(self, fn: Callable, items: list) -> list:
        """fn(worker, item) with one item per worker (fewer items than workers leaves the rest idle)."""
        if len(items) > len(self.workers):
            raise ValueError(f"{self.name}: {len(items)} shards for {len(self.workers)} workers")
        return [fn(worker, item) for worker, item in zip(self.workers, items)]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        remove_placement_group(self.placement)
