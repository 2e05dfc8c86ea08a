"""Offline preference learning: pairwise losses (DPO, cDPO, robust DPO, IPO, SimPO, ORPO) over
{"prompt", "chosen", "rejected"} pairs, unpaired ones (KTO, BCO) over good/bad samples, listwise LiPO-λ over
scored lists.

Reference log-probs are computed once, up front, by the reference role (skipped for reference-free losses);
then each step is one DeepSpeed update of the actor on `data.prompts_per_step` examples.
"""
from __future__ import annotations

import time

import ray
import torch
from tqdm import tqdm

from openrlaif.algorithms.preference import LISTWISE_LOSSES, PREFERENCE_LOSSES, REFERENCE_FREE, UNPAIRED_LOSSES
from openrlaif.checkpointing import stop_on_non_finite
from openrlaif.config import (Config, cache_dir, check_choice, reference_from_actor, validate_offline_training,
                              validate_preference_loss)
from openrlaif.data import PromptStream
from openrlaif.data.lists import ListExample, lists_to_batch, load_ranked, load_unpaired
from openrlaif.data.pairs import both_sides, load_pairs, pairs_to_batch
from openrlaif.metrics import MetricsLogger, summary_line, timer
from openrlaif.models import resolve_model_path
from openrlaif.pipelines.common import finish, load_tokenizer, prepare_output_dir, save_checkpoint
from openrlaif.roles import start_actor, threads_per_worker
from openrlaif.pipelines.evaluation import eval_due
from openrlaif.runtime import ray_session
from openrlaif.workers.group import WorkerGroup, check_cluster_fits


def train(cfg: Config) -> dict:
    """Run `cfg.steps` preference updates; returns {"checkpoint": path | None, "metrics": last step's metrics}."""
    model_path = resolve_model_path(cfg.model.path, cache_dir(cfg.model))
    tokenizer = load_tokenizer(model_path, cfg)
    examples = load_examples(cfg, tokenizer)
    held_out = load_pairs(cfg.eval.pairs, tokenizer, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens,
                          key="eval.pairs") if cfg.eval.pairs else []
    pairwise = not isinstance(examples[0], ListExample)
    list_size = 2 if pairwise else len(examples[0].responses)
    out_dir = prepare_output_dir(cfg)
    needs_reference = cfg.algorithm.loss not in REFERENCE_FREE
    from_actor = needs_reference and reference_from_actor(cfg)   # LoRA: the actor's base model is the reference
    plan = {"actor": cfg.actor.resources} | ({"reference": cfg.reference.resources}
                                             if needs_reference and not from_actor else {})
    cpus = sum(r.num_cpus * r.num_workers for r in plan.values())
    with ray_session(cfg.cluster, cpus):
        check_cluster_fits(plan)
        actor = start_actor(cfg, model_path, cfg.data.prompts_per_step)
        try:
            if needs_reference:                  # 1. reference log-probs of every pair (held-out ones too), once
                add_reference_logps(cfg, model_path, examples + held_out, tokenizer.pad_token_id,
                                    actor if from_actor else None)
            ray.get(actor.call(lambda w: w.ready.remote()))
            stream = PromptStream(examples, cfg.data.prompts_per_step, cfg.seed, cfg.data.shuffle)
            logger = MetricsLogger(out_dir, cfg)
            metrics: dict[str, float] = {}
            if held_out:                         # the starting policy on the held-out pairs, as step 0
                logger.log(0, held_out_accuracy(cfg, actor, held_out, tokenizer.pad_token_id))
            for step in tqdm(range(1, cfg.steps + 1), desc="openrlaif", unit="step", dynamic_ncols=True):
                metrics = {}
                # 2. one DeepSpeed update on the examples, sharded over the workers
                with timer(metrics, "update"), stop_on_non_finite(step):
                    if pairwise:
                        batch = pairs_to_batch(stream.next_batch(), tokenizer.pad_token_id)
                        per_rank = ray.get(actor.map(lambda w, shard: w.preference_step.remote(shard),
                                                     batch.split(len(actor))))
                    else:
                        batch = lists_to_batch(stream.next_batch(), tokenizer.pad_token_id)
                        per_rank = ray.get(actor.map(lambda w, shard: w.listwise_step.remote(shard, list_size),
                                                     batch.split(len(actor))))
                metrics |= (preference_metrics if pairwise else listwise_metrics)(per_rank, metrics["time/update_s"])
                if held_out and eval_due(cfg, step):
                    metrics |= held_out_accuracy(cfg, actor, held_out, tokenizer.pad_token_id)
                logger.log(step, metrics)
                tqdm.write(summary_line(step, metrics))
            logger.close()
            with stop_on_non_finite(cfg.steps):
                checkpoint = save_checkpoint(actor, out_dir, model_path, lora=cfg.actor.lora) if cfg.output.save_final else None
        finally:
            actor.shutdown()
    return finish(checkpoint, logger.path, metrics, out_dir)


def load_examples(cfg: Config, tokenizer) -> list:
    """Pairs for pairwise losses, ListExamples for unpaired (KTO, BCO) and listwise (LiPO) ones."""
    data, loss = cfg.data, cfg.algorithm.loss
    if loss in UNPAIRED_LOSSES:
        return load_unpaired(data.pairs, tokenizer, data.max_prompt_tokens, data.max_response_tokens,
                             with_mismatched=loss == "kto", columns=data.columns)
    if loss in LISTWISE_LOSSES:
        return load_ranked(data.pairs, tokenizer, data.max_prompt_tokens, data.max_response_tokens, data.columns)
    return load_pairs(data.pairs, tokenizer, data.max_prompt_tokens, data.max_response_tokens, columns=data.columns)


def add_reference_logps(cfg: Config, model_path: str, examples: list, pad_id: int, actor=None) -> None:
    """Σ log π_ref of every answer, from the reference role (or, given the LoRA `actor`, its base model with the
    adapters off), written into the examples."""
    pairwise = not isinstance(examples[0], ListExample)
    rows = both_sides(pairs_to_batch(examples, pad_id)) if pairwise else lists_to_batch(examples, pad_id)
    if actor is not None:   # every rank an equal share (a collective forward under ZeRO-3), the last row repeated
        size = len(rows)
        padded = rows.select(list(range(size)) + [size - 1] * (-size % len(actor)))
        token_logps = ray.get(actor.map(lambda w, shard: w.reference_logprobs.remote(shard), padded.split(len(actor))))
        token_logps = [torch.cat(token_logps)[:size]]
    else:
        from openrlaif.workers.reference import ReferenceWorker
        resources = cfg.reference.resources
        reference = WorkerGroup("reference", ReferenceWorker, resources, lambda rank: dict(
            model_path=model_path, dtype=cfg.model.dtype, micro_batch_size=cfg.reference.micro_batch_size,
            temperature=1.0, threads=threads_per_worker(cfg, resources.num_workers), seed=cfg.seed,
            trust_remote_code=cfg.model.trust_remote_code))
        try:
            token_logps = ray.get(reference.map(lambda w, shard: w.logprobs.remote(shard),
                                                rows.split(min(len(reference), len(rows)))))
        finally:
            reference.shutdown()   # the reference is not needed again: free its resources for the run
    sequence_logps = [float(v) for shard in token_logps for v in shard.sum(-1)]
    if pairwise:               # chosen rows, then rejected rows
        for index, pair in enumerate(examples):
            pair.ref_chosen_logp = sequence_logps[index]
            pair.ref_rejected_logp = sequence_logps[len(examples) + index]
        return
    values = iter(sequence_logps)   # K consecutive rows per example
    for example in examples:
        example.ref_logps = [next(values) for _ in example.responses]


# Implicit rewards closer than this are a tie: the actor's and the reference's engines differ by ~1e-6 on the same
# weights, which would otherwise decide the step-0 pairs (policy == reference) at random.
TIE = 1e-5


def held_out_accuracy(cfg: Config, actor: WorkerGroup, pairs: list, pad_id: int) -> dict[str, float]:
    """eval.pairs: how the loss's implicit reward (algorithms.preference.implicit_rewards) ranks held-out pairs.
    eval/reward_accuracy counts a tie (within TIE) as 1/2 (DPO's implicit reward is 0 for every answer before the
    first step); eval/reward_margin is the mean chosen − rejected reward."""
    import torch

    from openrlaif.algorithms.preference import implicit_rewards
    start = time.perf_counter()
    rows = both_sides(pairs_to_batch(pairs, pad_id))
    token_logps = torch.cat(ray.get(actor.map(lambda w, shard: w.logprobs.remote(shard),
                                              rows.split(min(len(actor), len(rows))))))
    lengths = rows["response_mask"].sum(-1).clamp(min=1.0)
    ref = torch.tensor([p.ref_chosen_logp for p in pairs] + [p.ref_rejected_logp for p in pairs])
    rewards = implicit_rewards(cfg.algorithm.loss, token_logps.sum(-1).double(), ref.double(), lengths.double(),
                               cfg.algorithm.beta)
    chosen, rejected = rewards[:len(pairs)], rewards[len(pairs):]
    tie = (chosen - rejected).abs() <= TIE
    wins = ((chosen > rejected) & ~tie).double() + 0.5 * tie.double()
    return {"eval/reward_accuracy": float(wins.mean()), "eval/reward_margin": float((chosen - rejected).mean()),
            "eval/pairs": float(len(pairs)), "time/eval_s": time.perf_counter() - start}


def preference_metrics(per_rank: list[dict], update_seconds: float) -> dict[str, float]:
    """Means over the pairs that counted (online DPO masks tied prompts; nan when none did)."""
    pairs = sum(r["pairs"] for r in per_rank)

    def mean(key: str) -> float:
        return sum(r[key] for r in per_rank) / pairs if pairs else float("nan")

    return {
        "train/loss": sum(r["loss"] for r in per_rank),
        "train/reward_accuracy": mean("accuracy_x_pairs"),
        "train/reward_margin": mean("margin_x_pairs"),
        "train/chosen_reward": mean("chosen_reward_x_pairs"),
        "train/rejected_reward": mean("rejected_reward_x_pairs"),
        "train/grad_norm": per_rank[0]["grad_norm"],
        "throughput/update_tokens_per_s": sum(r["tokens"] for r in per_rank) / max(update_seconds, 1e-9),
        "time/step_s": update_seconds,
    }


def listwise_metrics(per_rank: list[dict], update_seconds: float) -> dict[str, float]:
    """KTO/BCO: mean implicit reward β·log π/π_ref of desirable and undesirable samples; LiPO: the share of
    ordered pairs the implicit reward ranks like the labels, and the first response's reward."""
    total = {key: sum(r[key] for r in per_rank) for key in per_rank[0]}
    good = total["good_reward"] / max(total["good"], 1.0)
    bad = total["bad_reward"] / max(total["bad"], 1.0)
    out = {"train/loss": total["loss"], "train/desirable_reward": good, "train/undesirable_reward": bad,
           "train/reward_margin": good - bad, "train/grad_norm": per_rank[0]["grad_norm"],
           "throughput/update_tokens_per_s": total["tokens"] / max(update_seconds, 1e-9),
           "time/step_s": update_seconds}
    if "accuracy" in total:
        out["train/ranking_accuracy"] = total["accuracy"] / total["examples"]
    return out


# ----------------------------------------------------------------------------------------------------------- checks

def validate(cfg: Config) -> None:
    """pipeline=preference's own checks: a loss of the DPO family (paired, unpaired or listwise) and its settings."""
    check_choice("algorithm.loss", cfg.algorithm.loss,
                 PREFERENCE_LOSSES.keys() | UNPAIRED_LOSSES.keys() | LISTWISE_LOSSES.keys())
    validate_preference_loss(cfg.algorithm)
    validate_offline_training(cfg)
