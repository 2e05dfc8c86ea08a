"""Placement and fan-out. Each role gets its own placement group (one bundle per worker), unless
cluster.colocate names it: colocated roles share one placement group, rank i of every one of them in bundle i
(actor, reference and rollout engine on the same GPU, as OpenRLHF's --colocate_all_models and verl's hybrid
engine do). Distribution shows at the call site:

    refs = group.map(lambda worker, shard: worker.logprobs.remote(shard), batch.split(len(group)))
"""
from __future__ import annotations

import json
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


def colocated_plan(plan: dict[str, RoleResources], colocate: list[str]) -> dict[str, RoleResources]:
    """The plan as the cluster sees it: the colocated roles this run starts become one entry, "colocated", whose
    bundle holds the largest request of each resource among them (they take turns on it). Roles in `colocate`
    that this run does not start are left out; the rest must have the same number of workers."""
    shared = {role: plan[role] for role in colocate if role in plan}
    if len(shared) < 2:
        return plan
    sizes = {role: resources.num_workers for role, resources in shared.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{role}.resources.num_workers={n}" for role, n in sizes.items())
        raise ConfigError(f"cluster.colocate puts rank i of each of {sorted(shared)} in bundle i, so they need the "
                          f"same number of workers ({listed}). Fix: make them equal, or drop a role from "
                          "cluster.colocate.")
    placements = {role: (r.strategy, dict(r.node_labels)) for role, r in shared.items()}
    if len({json.dumps(p, sort_keys=True) for p in placements.values()}) > 1:
        listed = ", ".join(f"{role}: strategy {p[0]}, node_labels {p[1]}" for role, p in placements.items())
        raise ConfigError(f"cluster.colocate shares one placement group among {sorted(shared)}, so their "
                          f"resources.strategy and node_labels must agree ({listed}). Fix: make them equal.")
    first = next(iter(shared.values()))
    merged = RoleResources(num_workers=next(iter(sizes.values())),
                           num_cpus=max(r.num_cpus for r in shared.values()),
                           num_gpus=max(r.num_gpus for r in shared.values()),
                           strategy=first.strategy, node_labels=dict(first.node_labels))
    return {role: r for role, r in plan.items() if role not in shared} | {"colocated": merged}


def reserved_cpus(plan: dict[str, RoleResources], colocate: list[str]) -> float:
    return sum(r.num_cpus * r.num_workers for r in colocated_plan(plan, colocate).values())


def check_cluster_fits(plan: dict[str, RoleResources], colocate: list[str] = ()) -> None:
    """Fail before placing anything if the roles together ask for more than the cluster has."""
    plan = colocated_plan(plan, list(colocate))
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
                          "Fix: lower <role>.resources.num_workers/num_cpus/num_gpus, colocate roles "
                          "(cluster.colocate=[actor,reference,rollout]), or add nodes (local clusters: cluster.num_cpus).")


def place(name: str, resources: RoleResources, timeout_s: float):
    """A placement group of `num_workers` bundles spread by `resources.strategy`, each on a node with
    `resources.node_labels`; a ConfigError if it cannot be placed in time."""
    labels = dict(resources.node_labels)
    group = placement_group([bundle(resources)] * resources.num_workers, strategy=resources.strategy,
                            name=f"openrlaif-{name}",
                            bundle_label_selector=[labels] * resources.num_workers if labels else None)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        where = f" on nodes labelled {labels}" if labels else ""
        raise ConfigError(f"role {name!r}: its placement group ({resources.num_workers}×{bundle(resources)}, "
                          f"{resources.strategy}{where}) could not be placed in {timeout_s:.0f} s. Fix: free or add "
                          "resources (or nodes with those labels), or relax the strategy.")
    return group


class SharedPlacement:
    """The placement group of the colocated roles: bundle i holds rank i of each of them. Each role's worker
    reserves an equal share of its bundle, so Ray places them together; they run one after another."""

    def __init__(self, plan: dict[str, RoleResources], colocate: list[str], timeout_s: float = 600.0) -> None:
        self.roles = [role for role in colocate if role in plan]
        self.resources = colocated_plan(plan, colocate)["colocated"]
        self.placement = place("colocated", self.resources, timeout_s)

    def share(self) -> RoleResources:
        k = len(self.roles)
        return RoleResources(self.resources.num_workers, self.resources.num_cpus / k, self.resources.num_gpus / k)

    def shutdown(self) -> None:
        remove_placement_group(self.placement)


class WorkerGroup:
    """N Ray actors of one class, rank i pinned to bundle i of its own placement group (or of the shared one)."""

    def __init__(self, name: str, actor_class, resources: RoleResources,
                 make_kwargs: Callable[[int], dict[str, Any]], ready_timeout_s: float = 600.0,
                 shared: SharedPlacement | None = None) -> None:
        self.name = name
        self.nodes: list[str] = []   # each worker's Ray node id, once it is up (roles.wait_until_ready)
        self.closes = callable(getattr(actor_class, "close", None))
        self.owns_placement = shared is None or name not in shared.roles
        if self.owns_placement:
            self.placement = place(name, resources, ready_timeout_s)
        else:
            self.placement, resources = shared.placement, shared.share()
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
        if self.closes:   # a worker with processes of its own (a tensor-parallel engine) stops them first
            try:
                ray.get([worker.close.remote() for worker in self.workers], timeout=30)
            except Exception:   # noqa: BLE001 - a dead or stuck worker is killed all the same
                pass
        for worker in self.workers:
            ray.kill(worker)
        if self.owns_placement:
            remove_placement_group(self.placement)
