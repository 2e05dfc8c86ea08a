"""Online / iterative DPO: every step samples a group of responses per prompt from the current policy, scores
them with the feedback (an AI judge, pointwise or pairwise; a reward model; rules), trains a DPO-family loss on
each prompt's pairs (label.pairs: best-vs-worst, best-vs-rest or all; actor.epochs passes over them), and syncs
the new weights into the engines (and into the judge when it follows the policy: self-rewarding). Same roles and
phases as online RL; only the update differs."""
from __future__ import annotations

import ray
import torch

from openrlaif.batch import Batch
from openrlaif.config import (Config, ConfigError, check_choice, check_positive, pairs_per_prompt, reference_from_actor,
                              step_batch_size, validate_preference_loss, validate_trained)
from openrlaif.data import PromptStream
from openrlaif.data.labelling import most_consistent, select_pairs
from openrlaif.data.pairs import both_sides
from openrlaif.metrics import feedback_metrics, timer
from openrlaif.pipelines import label, online_rl
from openrlaif.pipelines.preference import preference_metrics
from openrlaif.roles import Roles, RunInputs
from openrlaif.rollout.launch import generate
from openrlaif.rollout.weight_sync import sync_weights


def train(cfg: Config) -> dict:
    """Run `cfg.steps` rounds; returns {"checkpoint": path | None, "metrics": last round's metrics}."""
    return online_rl.train(cfg, one_round)


def train_loop(cfg: Config, run: RunInputs, roles: Roles) -> tuple[str | None, dict[str, float], str]:
    """Online RL's loop (resume, checkpoints, metrics) around `one_round`."""
    return online_rl.train_loop(cfg, run, roles, one_round)


def one_round(cfg: Config, run: RunInputs, roles: Roles, stream: PromptStream, step: int,
              metrics: dict[str, float]) -> None:
    prompts = stream.next_batch()
    with timer(metrics, "rollout"):        # 1. a group of responses per prompt from the current policy
        batch = generate(roles, prompts, cfg, run.tokenizer, seed=cfg.seed * 10_000 + step)
    with timer(metrics, "feedback"):       # 2. score them; failed verdicts leave their response out
        feedback = online_rl.score(roles, batch)
    pairs, skipped = select_pairs(batch["group_ids"].tolist(), feedback.rewards.tolist(), feedback.valid.tolist(),
                                  batch.meta["response"], cfg.label.pairs, cfg.label.min_gap)
    if cfg.label.keep_top_fraction < 1:    # listwise judge: only this step's most consistently ranked prompts
        kept = most_consistent(feedback.consistency, cfg.label.keep_top_fraction)
        skipped["low_consistency"] += sum(pair.group not in kept for pair in pairs)
        pairs = [pair for pair in pairs if pair.group in kept]
    pair_batch = pairs_from_rollout(batch, pairs, len(prompts),   # 3. the prompts' pairs (masked where fewer)
                                    pairs_per_prompt(cfg.label.pairs, cfg.rollout.samples_per_prompt))
    with timer(metrics, "logprobs"):       # 4. reference log-probs of both answers
        add_reference_logps(roles, pair_batch, cfg)
    with timer(metrics, "update"):         # 5. one DeepSpeed update of the DPO-family loss
        per_rank = ray.get(roles.actor.map(lambda w, shard: w.preference_step.remote(shard),
                                           pair_batch.split(len(roles.actor))))
    with timer(metrics, "sync"):           # 6. the new weights into the engines (and a self-judge)
        metrics |= sync_weights(roles, cfg, step)
        if cfg.reference.update_every and step % cfg.reference.update_every == 0:   # 7. iterative DPO
            metrics |= refresh_reference(roles, cfg)
    response_tokens = float(batch["response_mask"].sum())
    metrics |= {key: value for key, value in preference_metrics(per_rank, metrics["time/update_s"]).items()
                if key != "time/step_s"}
    metrics |= feedback_metrics(feedback, response_tokens, metrics["time/feedback_s"])
    metrics |= {"label/pairs": float(len(pairs)), "label/pair_fraction": len({p.group for p in pairs}) / len(prompts),
                "label/pairs_per_prompt": len(pairs) / len(prompts),
                "label/reward_gap_mean": sum(p.gap for p in pairs) / len(pairs) if pairs else float("nan"),
                "response/length_mean": response_tokens / len(batch),
                "throughput/rollout_tokens_per_s": response_tokens / max(metrics["time/rollout_s"], 1e-9)}
    metrics |= {f"label/skipped/{reason}": float(count) for reason, count in skipped.items()}


def pairs_from_rollout(batch: Batch, pairs: list, num_prompts: int, per_prompt: int = 1) -> Batch:
    """The layout pairs_to_batch gives, cut from the rollout rows as sampled (no re-tokenisation). Every prompt
    gets `per_prompt` rows (the most pairs label.pairs can make of a group), so every rank runs the same number
    of micro-steps whatever the rewards; a row without a pair has pair_mask 0."""
    by_group: dict[int, list] = {}
    for pair in pairs:
        by_group.setdefault(pair.group, []).append(pair)
    first_rows = {}
    for row, group in enumerate(batch["group_ids"].tolist()):
        first_rows.setdefault(group, []).append(row)
    chosen, rejected, mask = [], [], []
    for group in range(num_prompts):
        found, rows = by_group.get(group, [])[:per_prompt], first_rows[group]
        for slot in range(per_prompt):
            pair = found[slot] if slot < len(found) else None
            chosen.append(pair.chosen if pair else rows[0])
            rejected.append(pair.rejected if pair else rows[-1])
            mask.append(1.0 if pair else 0.0)
    tensors = {}
    for side, rows in (("chosen", chosen), ("rejected", rejected)):
        for name in ("input_ids", "attention_mask", "response_mask"):
            tensors[f"{side}_{name}"] = batch[name][rows]
    zeros = torch.zeros(len(mask))
    return Batch(tensors | {"ref_chosen_logps": zeros, "ref_rejected_logps": zeros.clone(), "margin": zeros.clone(),
                            "pair_mask": torch.tensor(mask)})


def refresh_reference(roles: Roles, cfg: Config) -> dict[str, float]:
    """The reference becomes the current policy (reference.update_every; iterative DPO and Self-Rewarding start
    each iteration from the last one's model): the weight sync's buckets, in float32, into the reference workers."""
    from openrlaif.rollout.weight_sync import bucket_plan, sync_bucket
    seconds = sum(sync_bucket(roles, [roles.reference], names, "float32") for names in bucket_plan(roles, cfg))
    return {"reference/refreshed": 1.0, "reference/load_s": seconds}


def add_reference_logps(roles: Roles, pair_batch: Batch, cfg: Config) -> None:
    """Σ log π_ref of every chosen and rejected answer, from the reference role or, with LoRA, the actor's base
    model (skipped for reference-free losses: SimPO, ORPO)."""
    from openrlaif.algorithms.preference import REFERENCE_FREE
    rows = both_sides(pair_batch)
    if roles.reference is not None:
        shards = rows.split(min(len(roles.reference), len(rows)))
        refs = roles.reference.map(lambda w, shard: w.logprobs.remote(shard), shards)
    elif reference_from_actor(cfg) and cfg.algorithm.loss not in REFERENCE_FREE:
        refs = roles.actor.map(lambda w, shard: w.reference_logprobs.remote(shard), rows.split(len(roles.actor)))
    else:
        return
    sequence_logps = torch.cat(ray.get(refs)).sum(-1)
    size = len(pair_batch)
    pair_batch["ref_chosen_logps"], pair_batch["ref_rejected_logps"] = sequence_logps[:size], sequence_logps[size:]


# ----------------------------------------------------------------------------------------------------------- checks

def validate(cfg: Config) -> None:
    """pipeline=online_dpo's own checks: a pairwise loss, pairs built as pipeline=label builds them."""
    from openrlaif.algorithms.preference import PREFERENCE_LOSSES, REFERENCE_FREE
    check_choice("algorithm.loss", cfg.algorithm.loss, PREFERENCE_LOSSES)
    validate_preference_loss(cfg.algorithm)
    label.validate(cfg)
    check_positive("reference.update_every", cfg.reference.update_every, allow_zero=True)
    if cfg.reference.update_every and cfg.algorithm.loss in REFERENCE_FREE:
        raise ConfigError(f"reference.update_every={cfg.reference.update_every} refreshes the reference, but "
                          f"algorithm.loss={cfg.algorithm.loss} has none. Fix: reference.update_every=0.")
    validate_trained("actor", cfg.actor, step_batch_size(cfg),
                     f"data.prompts_per_step × {pairs_per_prompt(cfg.label.pairs, cfg.rollout.samples_per_prompt)} "
                     f"pairs per prompt (label.pairs={cfg.label.pairs})")
