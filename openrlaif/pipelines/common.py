"""Set-up both pipelines share: output folder and consent, tokenizer, the actor group, the final checkpoint."""
from __future__ import annotations

import os
import shutil
import socket

import ray
from omegaconf import OmegaConf

from openrlaif.config import Config, ConfigError
from openrlaif.workers.group import SharedPlacement, WorkerGroup


def prepare_output_dir(cfg: Config) -> str:
    """The absolute output folder, with the resolved config written into it; refuses to replace a checkpoint
    without output.overwrite=true (resume=true continues the run that wrote it, and may). With overwrite, an earlier
    run's resumable checkpoints are deleted and its verdict cache is moved aside."""
    out_dir = os.path.abspath(cfg.output.dir)
    final_exists = os.path.exists(os.path.join(out_dir, "checkpoint"))
    if cfg.output.save_final and final_exists and not (cfg.output.overwrite or cfg.resume):
        raise ConfigError(f"{out_dir}/checkpoint already exists and would be replaced. Fix: output.overwrite=true "
                          "to replace it, or a new output.dir.")
    resumable = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(resumable) and os.listdir(resumable) and not cfg.resume:
        if not cfg.output.overwrite:
            raise ConfigError(f"{resumable} holds resumable checkpoints of an earlier run. Fix: resume=true to "
                              "continue it, output.overwrite=true to start over (they are deleted), or a new "
                              "output.dir.")
        shutil.rmtree(resumable)
    cache = os.path.join(out_dir, "judge_cache.jsonl")
    if cfg.output.overwrite and not cfg.resume and os.path.exists(cache):
        # Starting over: the old run's verdicts are moved aside, never served to this run (rename the file back
        # to reuse them: their keys name the judge model, its settings and every request exactly).
        os.replace(cache, cache + ".previous")
        print(f"[openrlaif] output.overwrite=true: moved the earlier verdict cache to {cache}.previous")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.yaml"), "w") as handle:
        handle.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return out_dir


def load_tokenizer(model_path: str, cfg: Config):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ConfigError(f"model.path={cfg.model.path!r}: the tokenizer has no chat template. Fix: use an instruct "
                          "model, or add a chat_template to its tokenizer_config.json.")
    return tokenizer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def threads_per_worker(cfg: Config, num_workers: int) -> int:
    """Roles run one after another, so each may use every core unless the config says otherwise."""
    return cfg.cluster.threads_per_worker or max(1, (os.cpu_count() or 1) // num_workers)


def start_actor(cfg: Config, model_path: str, step_batch_size: int, temperature: float = 1.0,
                shared: SharedPlacement | None = None) -> WorkerGroup:
    """The DeepSpeed policy workers."""
    from openrlaif.workers.actor import ActorWorker
    return start_trainer(cfg, "actor", ActorWorker, cfg.actor, step_batch_size, model_path=model_path,
                         algo=cfg.algorithm, temperature=temperature, shared=shared)


def start_trainer(cfg: Config, role: str, worker_class, train_cfg, step_batch_size: int,
                  shared: SharedPlacement | None = None, **kwargs) -> WorkerGroup:
    """A DeepSpeed-trained role (actor, critic, reward model) with its own torch.distributed rendezvous."""
    resources = train_cfg.resources
    backend = cfg.cluster.dist_backend if cfg.cluster.dist_backend != "auto" else (
        "nccl" if resources.num_gpus > 0 else "gloo")
    master_addr, master_port = "127.0.0.1", free_port()
    if cfg.cluster.address:   # multi-node: rank 0's node must be reachable by the others
        master_addr = ray.util.get_node_ip_address()
    return WorkerGroup(role, worker_class, resources, lambda rank: dict(
        cfg=train_cfg, rank=rank, world_size=resources.num_workers, master_addr=master_addr,
        master_port=master_port, backend=backend, dtype=cfg.model.dtype, step_batch_size=step_batch_size,
        threads=threads_per_worker(cfg, resources.num_workers), seed=cfg.seed,
        trust_remote_code=cfg.model.trust_remote_code, **kwargs), shared=shared)


def save_checkpoint(actor: WorkerGroup, out_dir: str, tokenizer_path: str, name: str = "checkpoint") -> str:
    """HF folder at <out>/<name>, written to a temp folder first so a crash never leaves half a checkpoint."""
    final = os.path.join(out_dir, name)
    staging = final + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    ray.get(actor.call(lambda w: w.save_hf.remote(staging, tokenizer_path)))
    if os.path.exists(final):   # consent was checked at start-up (output.overwrite)
        shutil.rmtree(final)
    os.rename(staging, final)
    return final


def finish(checkpoint: str | None, metrics_path: str, metrics: dict[str, float], out_dir: str) -> dict:
    """Say where the results went; what every pipeline's train() returns."""
    if checkpoint:
        print(f"[openrlaif] checkpoint (HF format): {checkpoint}")
    print(f"[openrlaif] metrics: {metrics_path}")
    return {"checkpoint": checkpoint, "metrics": metrics, "out_dir": out_dir}
