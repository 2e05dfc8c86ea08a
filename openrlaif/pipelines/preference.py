"""Offline preference learning (DPO, cDPO, robust DPO, IPO, SimPO, ORPO) over {"prompt", "chosen", "rejected"} pairs.

Reference log-probs are computed once, up front, by the reference role (skipped for reference-free losses);
then each step is one DeepSpeed update of the actor on `data.prompts_per_step` pairs.
"""
from __future__ import annotations


import ray
from tqdm import tqdm

from openrlaif.algorithms.preference import REFERENCE_FREE
from openrlaif.config import Config, cache_dir
from openrlaif.data import PromptStream
from openrlaif.data.pairs import Pair, both_sides, load_pairs, pairs_to_batch
from openrlaif.metrics import MetricsLogger, summary_line, timer
from openrlaif.models import resolve_model_path
from openrlaif.pipelines.common import (finish, load_tokenizer, prepare_output_dir, save_checkpoint,
                                        start_actor, threads_per_worker)
from openrlaif.runtime import ray_session
from openrlaif.workers.group import WorkerGroup, check_cluster_fits


def train(cfg: Config) -> dict:
    """Run `cfg.steps` preference updates; returns {"checkpoint": path | None, "metrics": last step's metrics}."""
    model_path = resolve_model_path(cfg.model.path, cache_dir(cfg.model))
    tokenizer = load_tokenizer(model_path, cfg)
    pairs = load_pairs(cfg.data.pairs, tokenizer, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)
    out_dir = prepare_output_dir(cfg)
    needs_reference = cfg.algorithm.loss not in REFERENCE_FREE
    plan = {"actor": cfg.actor.resources} | ({"reference": cfg.reference.resources} if needs_reference else {})
    cpus = sum(r.num_cpus * r.num_workers for r in plan.values())
    with ray_session(cfg.cluster, cpus):
        check_cluster_fits(plan)
        actor = start_actor(cfg, model_path, cfg.data.prompts_per_step)
        try:
            if needs_reference:                  # 1. reference log-probs of every pair, once
                add_reference_logps(cfg, model_path, pairs, tokenizer.pad_token_id)
            ray.get(actor.call(lambda w: w.ready.remote()))
            stream = PromptStream(pairs, cfg.data.prompts_per_step, cfg.seed, cfg.data.shuffle)
            logger = MetricsLogger(out_dir)
            metrics: dict[str, float] = {}
            for step in tqdm(range(1, cfg.steps + 1), desc="openrlaif", unit="step", dynamic_ncols=True):
                metrics = {}
                batch = pairs_to_batch(stream.next_batch(), tokenizer.pad_token_id)
                with timer(metrics, "update"):   # 2. one DeepSpeed update on the pairs, sharded over the workers
                    per_rank = ray.get(actor.map(lambda w, shard: w.preference_step.remote(shard),
                                                 batch.split(len(actor))))
                metrics |= preference_metrics(per_rank, metrics["time/update_s"])
                logger.log(step, metrics)
                tqdm.write(summary_line(step, metrics))
            logger.close()
            checkpoint = save_checkpoint(actor, out_dir, model_path) if cfg.output.save_final else None
        finally:
            actor.shutdown()
    return finish(checkpoint, logger.path, metrics, out_dir)


def add_reference_logps(cfg: Config, model_path: str, pairs: list[Pair], pad_id: int) -> None:
    """Σ log π_ref of every chosen and rejected answer, from the reference role, written into the pairs."""
    from openrlaif.workers.reference import ReferenceWorker
    resources = cfg.reference.resources
    reference = WorkerGroup("reference", ReferenceWorker, resources, lambda rank: dict(
        model_path=model_path, dtype=cfg.model.dtype, micro_batch_size=cfg.reference.micro_batch_size,
        temperature=1.0, threads=threads_per_worker(cfg, resources.num_workers), seed=cfg.seed,
        trust_remote_code=cfg.model.trust_remote_code))
    try:
        sides = both_sides(pairs_to_batch(pairs, pad_id))
        shards = sides.split(min(len(reference), len(sides)))
        token_logps = ray.get(reference.map(lambda w, shard: w.logprobs.remote(shard), shards))
    finally:
        reference.shutdown()   # the reference is not needed again: free its resources for the run
    sequence_logps = [float(v) for shard in token_logps for v in shard.sum(-1)]
    for index, pair in enumerate(pairs):
        pair.ref_chosen_logp = sequence_logps[index]
        pair.ref_rejected_logp = sequence_logps[len(pairs) + index]


def preference_metrics(per_rank: list[dict], update_seconds: float) -> dict[str, float]:
    pairs = sum(r["pairs"] for r in per_rank)
    return {
        "train/loss": sum(r["loss"] for r in per_rank),
        "train/reward_accuracy": sum(r["accuracy_x_pairs"] for r in per_rank) / pairs,
        "train/reward_margin": sum(r["margin_x_pairs"] for r in per_rank) / pairs,
        "train/chosen_reward": sum(r["chosen_reward_x_pairs"] for r in per_rank) / pairs,
        "train/rejected_reward": sum(r["rejected_reward_x_pairs"] for r in per_rank) / pairs,
        "train/grad_norm": per_rank[0]["grad_norm"],
        "throughput/update_tokens_per_s": sum(r["tokens"] for r in per_rank) / max(update_seconds, 1e-9),
        "time/step_s": update_seconds,
    }
