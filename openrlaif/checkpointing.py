"""Resumable checkpoints of the online pipelines: <out>/checkpoints/step_<N>/ holds each trained role's DeepSpeed
state (weights, optimizer, per-rank RNG) and driver.json (step, prompt-stream position, feedback state). A
checkpoint is written under a temp name and renamed when complete, so `latest()` never sees half of one; its
driver.json lists every file's size, so a checkpoint damaged later (truncated, a file lost) is passed over for
the one before it; only the newest `keep_last` are kept. The judge's verdict cache (<out>/judge_cache.jsonl) is
append-only and is reused as it is on resume.

Every worker writes its own shard of a role's state, so on a multi-node cluster output.dir must be a filesystem
all nodes share (as for DeepSpeed itself)."""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager

import ray

from openrlaif.config import ConfigError

_STEP_DIR = re.compile(r"^step_(\d+)$")


class RunError(RuntimeError):
    """A run stopped part-way (a role died, ...). The message says what happened and how to resume."""


class Checkpointer:
    def __init__(self, out_dir: str, every: int, keep_last: int) -> None:
        self.root = os.path.join(out_dir, "checkpoints")
        self.every, self.keep_last = every, keep_last
        self.last_path: str | None = None

    def due(self, step: int, final_step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == final_step)

    def complete(self) -> list[tuple[int, str]]:
        """(step, path) of every checkpoint whose driver.json was written (the last file), newest first."""
        if not os.path.isdir(self.root):
            return []
        steps = sorted((int(m.group(1)) for name in os.listdir(self.root) if (m := _STEP_DIR.match(name))
                        and os.path.exists(os.path.join(self.root, name, "driver.json"))), reverse=True)
        return [(step, os.path.join(self.root, f"step_{step:06d}")) for step in steps]

    def latest(self, report=None) -> tuple[int, str] | None:
        """The newest complete checkpoint whose files are all there at their saved sizes. A broken one (a shard
        truncated or missing: a full disk, a copy cut short) is passed over for the next older one, and `report`
        (e.g. print) is told which and why, so a resume falls back instead of failing half-way through loading."""
        for step, path in self.complete():
            problem = damaged(path)
            if problem is None:
                return step, path
            if report is not None:
                report(f"[openrlaif] {path} is not intact ({problem}); trying the checkpoint before it")
        return None

    def save(self, step: int, roles: dict, driver_state: dict) -> str:
        """roles: name -> WorkerGroup of DeepSpeedWorkers. Collective on each role's workers."""
        final = os.path.join(self.root, f"step_{step:06d}")
        staging = final + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        ray.get([ref for name, group in roles.items()
                 for ref in group.call(lambda w, name=name: w.save_state.remote(os.path.join(staging, name)))])
        files = file_sizes(staging)
        with open(os.path.join(staging, "driver.json"), "w") as handle:   # written last: marks it complete
            json.dump({"step": step, **driver_state, "files": files}, handle)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
        self.last_path = final
        self._prune()
        return final

    def load(self, path: str, roles: dict) -> dict:
        missing = [name for name in roles if not os.path.isdir(os.path.join(path, name))]
        if missing:
            raise ConfigError(f"resume: {path} has no state for role(s) {missing}; it was written by a run with "
                              "different roles. Fix: resume with the same algorithm/feedback, or a new output.dir.")
        try:
            ray.get([ref for name, group in roles.items()
                     for ref in group.call(lambda w, name=name: w.load_state.remote(os.path.join(path, name)))])
        except ray.exceptions.RayTaskError as err:   # e.g. a state saved under another ZeRO layout
            if isinstance(err.cause, ConfigError):
                raise err.cause from None
            raise
        with open(os.path.join(path, "driver.json")) as handle:
            return json.load(handle)

    def _prune(self) -> None:
        steps = sorted(int(m.group(1)) for name in os.listdir(self.root) if (m := _STEP_DIR.match(name)))
        for step in steps[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(os.path.join(self.root, f"step_{step:06d}"), ignore_errors=True)


def file_sizes(folder: str) -> dict[str, int]:
    """Every file under `folder` but its driver.json (relative path -> bytes): the manifest a resume checks a
    checkpoint against."""
    sizes = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(parent, name)
            sizes[os.path.relpath(full, folder)] = os.path.getsize(full)
    sizes.pop("driver.json", None)
    return sizes


def damaged(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (a file missing or of another size than when it was
    saved), or None. Checkpoints written before the manifest existed are taken as they are."""
    try:
        with open(os.path.join(path, "driver.json")) as handle:
            files = json.load(handle).get("files", {})
    except (OSError, ValueError) as err:
        return f"driver.json unreadable: {err}"
    for name, size in sorted(files.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != size:
            return f"{name} has {os.path.getsize(full)} bytes, {size} when saved"
    return None


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop metric rows after the checkpoint a run resumes from (a killed run may have logged later steps)."""
    if not os.path.exists(path):
        return
    with open(path) as handle:
        lines = handle.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError):
            continue   # a line cut by the kill
    with open(path + ".tmp", "w") as handle:
        handle.writelines(kept)
    os.replace(path + ".tmp", path)


def dead_workers(groups: dict, timeout_s: float = 10.0) -> list[str]:
    """'role (worker r of n, on node ADDRESS ID[, which is down])' for every worker that no longer answers because
    its process (or its node) is gone. A worker still busy (e.g. blocked in a collective with the dead one) is not
    reported."""
    from ray.exceptions import RayActorError
    probes = {}
    for name, group in groups.items():
        for rank, worker in enumerate(group.workers):
            probes[worker.ready.remote()] = (name, rank, len(group.workers), group)
    ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=timeout_s)
    nodes = {node["NodeID"]: node for node in ray.nodes()}   # after the probes: a lost node is marked down by then
    dead = []
    for ref in ready:
        try:
            ray.get(ref)
        except RayActorError:
            name, rank, size, group = probes[ref]
            node = nodes.get(group.nodes[rank]) if rank < len(getattr(group, "nodes", [])) else None
            where = "" if node is None else (f", on node {node['NodeManagerAddress']} {node['NodeID'][:8]}"
                                             + ("" if node["Alive"] else ", which is down"))
            dead.append(f"role {name!r} (worker {rank} of {size}{where})")
    return dead


def resume_hint(checkpointer: Checkpointer | None) -> str:
    if checkpointer is not None and checkpointer.last_path:
        return f"The last checkpoint is {checkpointer.last_path}: rerun the same command with resume=true."
    if checkpointer is not None and checkpointer.every > 0:
        return "No checkpoint was written yet: rerun the same command to start over."
    return "Checkpoints are off: set output.checkpoint_every=N to make runs resumable."


@contextmanager
def stop_on_non_finite(step: int, checkpointer: Checkpointer | None = None):
    """Around a step's update or a checkpoint: a worker that refused a non-finite loss or non-finite weights
    (workers/engine.py NonFiniteUpdate) stops the run with what happened and the way on, before anything NaN is
    applied or saved."""
    from openrlaif.workers.engine import NonFiniteUpdate
    try:
        yield
    except ray.exceptions.RayTaskError as err:
        if not isinstance(err.cause, NonFiniteUpdate):
            raise
        raise non_finite_stop(step, str(err.cause), checkpointer) from None


def non_finite_stop(step: int, what: str, checkpointer: Checkpointer | None) -> RunError:
    return RunError(f"step {step}: {what}. The run stopped; nothing non-finite was saved. {resume_hint(checkpointer)} "
                    "Likely causes: a learning rate too high, a reward or advantage that is not finite, a KL "
                    "coefficient too large. Fix: e.g. a lower actor.lr.")


def role_died(dead: list[str], err: Exception, phase: str, step: int, checkpointer: Checkpointer) -> RunError:
    """The error a run stops with when a worker died: which role, when, and how to go on."""
    return RunError(f"{', '.join(dead)} died during the {phase} phase of step {step} "
                    f"({type(err).__name__}). {resume_hint(checkpointer)}")


class FailedSteps:
    """Counts consecutive steps in which every sample's feedback failed; at `limit` the run stops (RunError, exit 1,
    no final checkpoint): it would exit 0 having learned nothing."""

    def __init__(self, limit: int) -> None:
        self.limit, self.run = limit, 0

    def count(self, step: int, metrics: dict[str, float], checkpointer: Checkpointer | None = None) -> None:
        kinds = {key for key in metrics if key.startswith("feedback/failures/")}
        # a strict pairwise consistency filter that kept nothing is the user's setting working, not a failure
        filtered = kinds == {"feedback/failures/no_kept_comparison"} and not any(
            key.startswith("feedback/comparison_failures/") for key in metrics)
        self.run = self.run + 1 if metrics.get("feedback/failure_rate") == 1.0 and not filtered else 0
        if not self.limit or self.run < self.limit:
            return
        kinds = ", ".join(f"{key.rsplit('/', 1)[-1]} ×{int(value)}" for key, value in sorted(metrics.items())
                          if key.startswith("feedback/failures/"))
        raise RunError(f"step {step}: every sample's feedback failed in each of the last {self.run} steps ({kinds}; "
                       "the lines above give each kind's cause), so the run learned nothing from them. It stopped "
                       f"without writing a final checkpoint. {resume_hint(checkpointer)} Fix: what the failures "
                       "name (the judge endpoint, the judge model, the reward function), or "
                       "feedback.max_failed_steps=0 to go on regardless.")
