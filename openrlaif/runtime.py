"""Starting or joining Ray. A local cluster binds to 127.0.0.1 only and stops with the run."""
from __future__ import annotations

import math
import os
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
    """A single-node cluster on 127.0.0.1 (no dashboard)."""
    import ray
    # Without this Ray advertises and listens on the machine's routable address even for a local cluster.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": worker_env(local=True)},
             configure_logging=False)


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
