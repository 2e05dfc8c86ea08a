"""Starting or joining Ray. A local cluster binds to 127.0.0.1 only and stops with the run."""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager

from openrlaif.config import ClusterConfig

# Set in every worker process. vLLM runs in-process (one engine per actor, weights handed over as tensors).
# vLLM's INFO/WARNING lines repeat on every generate call on CPU; set VLLM_LOGGING_LEVEL to see them.
WORKER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
              "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}


def worker_env(local: bool) -> dict[str, str]:
    """On a local machine without CUDA, pin DeepSpeed's accelerator (quiet and explicit). On a cluster the
    driver's node says nothing about the workers' GPUs: the actor sets it from its own backend instead."""
    env = dict(WORKER_ENV)
    import torch
    if local and not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def init_local_ray(num_cpus: int) -> None:
    """A single-node cluster that listens on 127.0.0.1 only (no dashboard), however this process was started.

    Ray picks a local node's IP, and with it the address every server binds to, from
    `ray_constants.ENABLE_RAY_CLUSTER`, which it reads from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when `ray` is
    first imported. Setting the variable afterwards (as this module once did) is too late: run directly,
    `openrlaif train` advertised the machine's routable address and listened on 0.0.0.0 / [::]. So the flag is
    set for this call itself and restored after it; workers take the node's IP from the raylet. A cluster that
    is joined (cluster.address) never goes through here: its driver must keep its routable address."""
    import ray
    from ray._private import ray_constants
    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # address="local": a new cluster of our own, whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster say
        # (without it ray.init joined someone else's cluster and died on num_cpus)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": worker_env(local=True)}, configure_logging=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":   # a Ray version that no longer honours the flag: say so, never silently
        print(f"[openrlaif] warning: the local Ray cluster's node IP is {node_ip}, not 127.0.0.1; its servers may "
              "be reachable from other machines. Fix: export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Python "
              "starts.", file=sys.stderr)


@contextmanager
def ray_session(cfg: ClusterConfig, num_cpus_needed: float):
    import ray
    if ray.is_initialized():   # a caller (a test, a notebook) owns the cluster: use it, leave it running
        yield
        return
    if cfg.address:
        ray.init(address=cfg.address, runtime_env={"env_vars": worker_env(local=False)})
    else:
        init_local_ray(cfg.num_cpus or max(1, math.ceil(num_cpus_needed)))
    try:
        yield
    finally:
        ray.shutdown()
