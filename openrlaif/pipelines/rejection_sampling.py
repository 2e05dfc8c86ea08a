"""Rejection sampling (best-of-N SFT; RAFT, ReST, OpenRLHF's rejection sampling, the "Critical Evaluation of AI
Feedback" baseline): every round samples N responses per prompt from the current policy, scores them with any
feedback source, keeps each prompt's best response when it scores at least `rejection.threshold`, fine-tunes on
the kept ones (SFT on the answer tokens), and syncs the new weights into the engines. Online RL's loop around it
(resume, checkpoints, eval, metrics)."""
from __future__ import annotations

import math

import ray

from openrlaif.batch import Batch
from openrlaif.config import Config, ConfigError, step_batch_size, validate_feedback_source, validate_trained
from openrlaif.data import PromptStream
from openrlaif.metrics import feedback_metrics, timer
from openrlaif.pipelines import online_rl
from openrlaif.roles import Roles, RunInputs
from openrlaif.rollout.launch import generate
from openrlaif.rollout.weight_sync import sync_weights


def train(cfg: Config) -> dict:
    """Run `cfg.steps` rounds; returns {"checkpoint": path | None, "metrics": last round's metrics}."""
    return online_rl.train(cfg, one_round)


def one_round(cfg: Config, run: RunInputs, roles: Roles, stream: PromptStream, step: int,
              metrics: dict[str, float]) -> None:
    prompts = stream.next_batch()
    with timer(metrics, "rollout"):        # 1. N responses per prompt from the current policy
        batch = generate(roles, prompts, cfg, run.tokenizer, seed=cfg.seed * 10_000 + step)
    with timer(metrics, "feedback"):       # 2. score them; failed verdicts leave their response out
        feedback = online_rl.score(roles, batch)
    examples, kept = best_of_n(batch, feedback.rewards.tolist(), feedback.valid.tolist(), len(prompts),
                               cfg.rejection.threshold)   # 3. each prompt's best, if good enough (else empty)
    with timer(metrics, "update"):         # 4. SFT on the kept answers (every rank the same number of examples)
        pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
        per_rank = ray.get(roles.actor.map(lambda w, shard: w.sft_step.remote(shard, pad),
                                           examples.split(len(roles.actor))))
    with timer(metrics, "sync"):           # 5. the new weights into the engines
        metrics |= sync_weights(roles, cfg, step)
    response_tokens = float(batch["response_mask"].sum())
    metrics |= feedback_metrics(feedback, response_tokens, metrics["time/feedback_s"])
    kept_rewards = [reward for reward in kept if reward is not None]
    metrics |= {"train/loss": sum(r["loss"] for r in per_rank), "train/grad_norm": per_rank[0]["grad_norm"],
                "rejection/kept": float(len(kept_rewards)), "rejection/kept_fraction": len(kept_rewards) / len(prompts),
                "rejection/kept_reward_mean": sum(kept_rewards) / len(kept_rewards) if kept_rewards else math.nan,
                "response/length_mean": response_tokens / len(batch),
                "throughput/rollout_tokens_per_s": response_tokens / max(metrics["time/rollout_s"], 1e-9)}


def best_of_n(batch: Batch, rewards: list[float], valid: list[bool], num_prompts: int,
              threshold: float | None) -> tuple[Batch, list[float | None]]:
    """One SFT example per prompt, in prompt order: the prompt and its highest-rewarded valid response (ties: the
    earliest), if that reward is at least `threshold` (None: any); otherwise the prompt with an empty answer, which carries
    no loss but keeps every rank's number of micro-steps equal. Also the kept reward per prompt (None: none)."""
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(batch["group_ids"].tolist()):
        groups.setdefault(group, []).append(row)
    width = batch["input_ids"].shape[1] - batch["response_mask"].shape[1]
    prompt_ids, response_ids, kept = [], [], []
    for group in range(num_prompts):
        rows = groups[group]
        scored = [row for row in rows if valid[row]]
        best = max(scored, key=lambda row: (rewards[row], -row)) if scored else None
        keep = best is not None and (threshold is None or rewards[best] >= threshold)
        row = best if best is not None else rows[0]
        ids, mask = batch["input_ids"][row], batch["attention_mask"][row]
        prompt_ids.append(ids[:width][mask[:width].bool()].tolist())
        response = ids[width:][batch["response_mask"][row].bool()].tolist()
        response_ids.append(response if keep else [])
        kept.append(rewards[best] if keep else None)
    return Batch({}, {"prompt_ids": prompt_ids, "response_ids": response_ids}), kept


def validate(cfg: Config) -> None:
    """pipeline=rejection_sampling's own checks."""
    if cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(f"rollout.samples_per_prompt={cfg.rollout.samples_per_prompt}: best-of-N needs N >= 2. "
                          "Fix: rollout.samples_per_prompt=4.")
    if cfg.env.name:
        raise ConfigError("pipeline=rejection_sampling fine-tunes on single answers; env.* episodes are for "
                          "pipeline=online_rl. Fix: env.name=''.")
    validate_trained("actor", cfg.actor, step_batch_size(cfg), "data.prompts_per_step (one example per prompt)")
    validate_feedback_source(cfg)
