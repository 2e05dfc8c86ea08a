"""Supervised fine-tuning: next-token loss on the answers only, optional packing of short examples."""
from __future__ import annotations

import ray
from tqdm import tqdm

from openrlaif.batch import Batch
from openrlaif.checkpointing import stop_on_non_finite
from openrlaif.config import Config, cache_dir, validate_offline_training
from openrlaif.data import PromptStream
from openrlaif.data.sft import load_sft
from openrlaif.metrics import MetricsLogger, summary_line, timer
from openrlaif.models import resolve_model_path
from openrlaif.pipelines.common import finish, load_tokenizer, prepare_output_dir, save_checkpoint
from openrlaif.roles import start_actor
from openrlaif.runtime import ray_session
from openrlaif.workers.group import check_cluster_fits


def train(cfg: Config, continuing: bool = False) -> dict:
    """Run `cfg.steps` SFT updates of `data.prompts_per_step` examples; returns checkpoint and last metrics.
    `continuing`: the SFT phase of a run that already holds output.dir (pipeline=constitutional)."""
    model_path = resolve_model_path(cfg.model.path, cache_dir(cfg.model))
    tokenizer = load_tokenizer(model_path, cfg)
    examples = load_sft(cfg.data.sft, tokenizer, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens,
                        cfg.data.columns)
    out_dir = prepare_output_dir(cfg, continuing)
    resources = cfg.actor.resources
    with ray_session(cfg.cluster, resources.num_cpus * resources.num_workers):
        check_cluster_fits({"actor": resources})
        actor = start_actor(cfg, model_path, cfg.data.prompts_per_step)
        try:
            stream = PromptStream(list(range(len(examples))), cfg.data.prompts_per_step, cfg.seed, cfg.data.shuffle)
            logger = MetricsLogger(out_dir, cfg)
            metrics: dict[str, float] = {}
            for step in tqdm(range(1, cfg.steps + 1), desc="openrlaif", unit="step", dynamic_ncols=True):
                metrics = {}
                batch: Batch = examples.select(stream.next_batch())
                # one DeepSpeed update, examples sharded over the workers
                with timer(metrics, "update"), stop_on_non_finite(step):
                    per_rank = ray.get(actor.map(
                        lambda w, shard: w.sft_step.remote(shard, tokenizer.pad_token_id, cfg.data.pack_length),
                        batch.split(len(actor))))
                tokens, slots = sum(r["tokens"] for r in per_rank), sum(r["slots"] for r in per_rank)
                metrics |= {"train/loss": sum(r["loss"] for r in per_rank), "train/grad_norm": per_rank[0]["grad_norm"],
                            "train/padding_fraction": 1 - tokens / max(slots, 1.0),
                            "throughput/update_tokens_per_s": tokens / max(metrics["time/update_s"], 1e-9),
                            "time/step_s": metrics["time/update_s"]}
                logger.log(step, metrics)
                tqdm.write(summary_line(step, metrics))
            logger.close()
            with stop_on_non_finite(cfg.steps):
                checkpoint = save_checkpoint(actor, out_dir, model_path, lora=cfg.actor.lora) if cfg.output.save_final else None
        finally:
            actor.shutdown()
    return finish(checkpoint, logger.path, metrics, out_dir)


# ----------------------------------------------------------------------------------------------------------- checks

def validate(cfg: Config) -> None:
    """pipeline=sft's own checks: those of every offline pipeline."""
    validate_offline_training(cfg)
