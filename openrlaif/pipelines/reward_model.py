"""Bradley–Terry reward-model training over {"prompt", "chosen", "rejected"} pairs (optional per-row "margin"),
with accuracy on a held-out split. The checkpoint is a one-label SequenceClassification HF folder: it loads as
the reward-model role (feedback.source=reward_model) and as the PPO critic's start (critic.model)."""
from __future__ import annotations

import random

import ray
import torch
from tqdm import tqdm

from openrlaif.algorithms.preference import bradley_terry_loss
from openrlaif.checkpointing import stop_on_non_finite
from openrlaif.config import Config, ConfigError, cache_dir, check_positive, validate_offline_training
from openrlaif.data import PromptStream
from openrlaif.data.pairs import Pair, load_pairs, pairs_to_batch
from openrlaif.metrics import MetricsLogger, summary_line, timer
from openrlaif.models import resolve_model_path
from openrlaif.pipelines.common import finish, load_tokenizer, prepare_output_dir, save_checkpoint
from openrlaif.roles import start_trainer
from openrlaif.runtime import ray_session
from openrlaif.workers.group import WorkerGroup, check_cluster_fits


def train(cfg: Config) -> dict:
    """`cfg.steps` updates of `data.prompts_per_step` pairs; evaluates on the held-out pairs every
    `data.eval_every` steps and at the end."""
    from openrlaif.workers.critic import CriticWorker
    model_path = resolve_model_path(cfg.model.path, cache_dir(cfg.model))
    tokenizer = load_tokenizer(model_path, cfg)
    pairs = load_pairs(cfg.data.pairs, tokenizer, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens,
                       default_margin=cfg.algorithm.margin, columns=cfg.data.columns)
    train_pairs, eval_pairs = held_out_split(pairs, cfg.data.eval_fraction, cfg.seed)
    out_dir = prepare_output_dir(cfg)
    resources = cfg.actor.resources
    with ray_session(cfg.cluster, resources.num_cpus * resources.num_workers):
        check_cluster_fits({"reward_model": resources})
        trainer = start_trainer(cfg, "reward_model", CriticWorker, cfg.actor, cfg.data.prompts_per_step,
                                model_path=model_path, pad_token_id=tokenizer.pad_token_id)
        try:
            ray.get(trainer.call(lambda w: w.ready.remote()))
            stream = PromptStream(train_pairs, cfg.data.prompts_per_step, cfg.seed, cfg.data.shuffle)
            logger = MetricsLogger(out_dir, cfg)
            metrics: dict[str, float] = {}
            for step in tqdm(range(1, cfg.steps + 1), desc="openrlaif", unit="step", dynamic_ncols=True):
                metrics = {}
                batch = pairs_to_batch(stream.next_batch(), tokenizer.pad_token_id)
                with timer(metrics, "update"), stop_on_non_finite(step):
                    per_rank = ray.get(trainer.map(lambda w, shard: w.reward_model_step.remote(shard),
                                                   batch.split(len(trainer))))
                pairs_seen = sum(r["pairs"] for r in per_rank)
                metrics |= {"train/loss": sum(r["loss"] for r in per_rank),
                            "train/accuracy": sum(r["accuracy_x_pairs"] for r in per_rank) / pairs_seen,
                            "train/margin": sum(r["margin_x_pairs"] for r in per_rank) / pairs_seen,
                            "train/grad_norm": per_rank[0]["grad_norm"],
                            "throughput/update_tokens_per_s": sum(r["tokens"] for r in per_rank)
                            / max(metrics["time/update_s"], 1e-9), "time/step_s": metrics["time/update_s"]}
                if eval_pairs and (step % cfg.data.eval_every == 0 or step == cfg.steps):
                    metrics |= evaluate(trainer, eval_pairs, tokenizer.pad_token_id)
                logger.log(step, metrics)
                tqdm.write(summary_line(step, metrics))
            logger.close()
            with stop_on_non_finite(cfg.steps):
                checkpoint = save_checkpoint(trainer, out_dir, model_path) if cfg.output.save_final else None
        finally:
            trainer.shutdown()
    return finish(checkpoint, logger.path, metrics, out_dir)


def held_out_split(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A seeded shuffle, then the last `fraction` (at least one pair when fraction > 0) is held out."""
    if fraction <= 0:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(pairs) * fraction))
    if held >= len(pairs):
        from openrlaif.config import ConfigError
        raise ConfigError(f"data.eval_fraction={fraction} holds out all {len(pairs)} pairs. Fix: a smaller "
                          "fraction, or more pairs.")
    return [pairs[i] for i in order[:-held]], [pairs[i] for i in order[-held:]]


def evaluate(trainer: WorkerGroup, pairs: list[Pair], pad_id: int) -> dict[str, float]:
    """Held-out accuracy (chosen scored above rejected), mean margin and Bradley–Terry loss. Every worker runs
    the same number of forward passes (a collective under ZeRO-3): shards are equal, short ones repeat pairs."""
    world = len(trainer)
    per_worker = -(-len(pairs) // world)
    padded = [pairs[i % len(pairs)] for i in range(per_worker * world)]
    batch = pairs_to_batch(padded, pad_id)
    scores = torch.cat(ray.get(trainer.map(lambda w, shard: w.pair_scores.remote(shard), batch.split(world))))
    scores = scores[:len(pairs)]
    margins = scores[:, 0] - scores[:, 1]
    return {"eval/accuracy": float((margins > 0).float().mean()), "eval/margin": float(margins.mean()),
            "eval/loss": float(bradley_terry_loss(scores[:, 0], scores[:, 1]).mean()), "eval/pairs": float(len(pairs))}


# ----------------------------------------------------------------------------------------------------------- checks

def validate(cfg: Config) -> None:
    """pipeline=reward_model's own checks: the held-out share of pairs and how often it is measured."""
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1).")
    check_positive("data.eval_every", cfg.data.eval_every)
    validate_offline_training(cfg)
