"""pipeline=label: turn a prompt set into a preference dataset with AI feedback. For every prompt the policy
samples `rollout.samples_per_prompt` responses; the feedback scores them (a pairwise judge with position-swap
debiasing and the consistency filter, a pointwise judge, a reward model or rules); each prompt's group gives its
pairs (`label.pairs`, `label.min_gap`).

Writes, in output.dir:
  pairs.jsonl   {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}: what pipeline=preference
                and pipeline=reward_model read as data.pairs
  ranked.jsonl  {"prompt", "responses", "scores"} for prompts whose whole group was scored: LiPO's lists
  label.json    counts, skip reasons, judge metrics; with a listwise judge, Kendall's W of every prompt and
                whether label.keep_top_fraction kept it
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from openrlaif.checkpointing import FailedSteps
from openrlaif.config import PAIR_MODES, Config, ConfigError, check_choice, check_positive, validate_feedback_source
from openrlaif.data.labelling import most_consistent, pair_row, select_pairs
from openrlaif.metrics import MetricsLogger, feedback_metrics, timer
from openrlaif.pipelines.common import release
from openrlaif.pipelines.online_rl import score
from openrlaif.roles import Roles, RunInputs, prepare_run, start_roles
from openrlaif.rollout.launch import generate
from openrlaif.runtime import ray_session


def train(cfg: Config) -> dict:
    """Label every prompt of data.prompts once, `data.prompts_per_step` prompts per batch."""
    run = prepare_run(cfg)
    with ray_session(cfg.cluster, run.cpus_needed):
        roles = start_roles(cfg, run)
        try:
            summary = label_prompts(cfg, run, roles)
        finally:
            roles.shutdown()
    print(f"[openrlaif] {summary['pairs']} pairs from {summary['prompts']} prompts: {summary['pairs_path']}")
    release(run.out_dir)
    return {"checkpoint": None, "metrics": summary, "out_dir": run.out_dir}


def label_prompts(cfg: Config, run: RunInputs, roles: Roles) -> dict:
    logger = MetricsLogger(run.out_dir, cfg)
    groups, skipped = [], Counter()   # one LabelledGroup per prompt, in prompt order
    start, size = time.perf_counter(), cfg.data.prompts_per_step
    chunks = range(0, len(run.prompts), size)
    failed_batches = FailedSteps(cfg.feedback.max_failed_steps)
    for index, lo in enumerate(tqdm(chunks, desc="openrlaif label", unit="batch", dynamic_ncols=True), start=1):
        prompts, metrics = run.prompts[lo:lo + size], {}
        with timer(metrics, "rollout"):
            batch = generate(roles, prompts, cfg, run.tokenizer, seed=cfg.seed * 10_000 + index)
        with timer(metrics, "feedback"):
            feedback = score(roles, batch)
        chunk_groups, chunk_skipped = labelled_groups(batch, feedback, prompts, cfg, lo)
        groups += chunk_groups
        skipped += chunk_skipped
        metrics |= feedback_metrics(feedback, float(batch["response_mask"].sum()), metrics["time/feedback_s"])
        metrics |= {"label/pairs": float(sum(len(g.pairs) for g in chunk_groups))}
        metrics |= {f"label/skipped/{k}": float(v) for k, v in chunk_skipped.items()}
        logger.log(index, metrics)
        failed_batches.count(index, metrics)
    logger.close()
    kept = keep_most_consistent(groups, cfg.label.keep_top_fraction)
    skipped["low_consistency"] += sum(1 for g in groups if g.pairs and not kept[g.index])
    pair_rows = [row for g in groups if kept[g.index] for row in g.pairs]
    ranked_rows = [g.ranked for g in groups if kept[g.index] and g.ranked is not None]
    out = run.out_dir
    summary = {"prompts": len(run.prompts), "responses_per_prompt": cfg.rollout.samples_per_prompt,
               "pairs": len(pair_rows), "ranked_lists": len(ranked_rows), "skipped": dict(+skipped),   # +: without zero counts
               "pairs_path": write_jsonl(os.path.join(out, "pairs.jsonl"), pair_rows),
               "ranked_path": write_jsonl(os.path.join(out, "ranked.jsonl"), ranked_rows),
               "seconds": round(time.perf_counter() - start, 3), "metrics_path": logger.path}
    if any(g.consistency is not None for g in groups):   # a listwise judge: Kendall's W of every prompt
        summary["keep_top_fraction"] = cfg.label.keep_top_fraction
        summary["kendalls_w"] = [{"prompt": g.prompt, "w": g.consistency, "kept": kept[g.index]} for g in groups]
    with open(os.path.join(out, "label.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


@dataclass
class LabelledGroup:
    """What one prompt's scored group yields: its pairs.jsonl rows, its ranked.jsonl row (None unless every
    response was scored and the prompt is single-turn), and Kendall's W of its rankings (listwise judges)."""
    index: int
    prompt: str
    pairs: list[dict]
    ranked: dict | None
    consistency: float | None


def labelled_groups(batch, feedback, prompts: list, cfg: Config,
                    offset: int = 0) -> tuple[list[LabelledGroup], Counter]:
    """The groups of one batch of prompts (`offset`: the first one's position in data.prompts)."""
    responses, rewards, valid = batch.meta["response"], feedback.rewards.tolist(), feedback.valid.tolist()
    group_ids = batch["group_ids"].tolist()
    pairs, skipped = select_pairs(group_ids, rewards, valid, responses, cfg.label.pairs, cfg.label.min_gap)
    out = []
    for group, prompt in enumerate(prompts):
        rows = [row for row, g in enumerate(group_ids) if g == group]
        pair_rows = [pair_row(prompt.text, prompt.messages, responses[p.chosen], responses[p.rejected],
                              rewards[p.chosen], rewards[p.rejected]) for p in pairs if p.group == group]
        ranked = None   # LiPO lists: single-turn prompts whose every response scored
        if all(valid[row] for row in rows) and (prompt.messages is None or len(prompt.messages) == 1):
            ranked = {"prompt": prompt.text, "responses": [responses[r] for r in rows],
                      "scores": [round(rewards[r], 6) for r in rows]}
        out.append(LabelledGroup(offset + group, prompt.text, pair_rows, ranked,
                                 feedback.consistency.get(group)))
    return out, skipped


def keep_most_consistent(groups: list[LabelledGroup], fraction: float) -> dict[int, bool]:
    """Which prompts label.keep_top_fraction keeps: all with fraction 1, else the most consistently ranked."""
    if fraction >= 1:
        return {g.index: True for g in groups}
    keep = most_consistent({g.index: g.consistency for g in groups if g.consistency is not None}, fraction)
    return {g.index: g.index in keep for g in groups}


def write_jsonl(path: str, rows: list[dict]) -> str:
    """Written to a temp file first: a crash never leaves a half dataset under the final name."""
    staging = path + ".tmp"
    with open(staging, "w") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(staging, path)
    return path


# ----------------------------------------------------------------------------------------------------------- checks

def validate(cfg: Config) -> None:
    """pipeline=label's own checks, and the pair-building half of online_dpo's: a group per prompt, scored, best
    vs worst."""
    check_choice("label.pairs", cfg.label.pairs, set(PAIR_MODES))
    check_positive("label.min_gap", cfg.label.min_gap, allow_zero=True)
    if not 0 < cfg.label.keep_top_fraction <= 1:
        raise ConfigError(f"label.keep_top_fraction={cfg.label.keep_top_fraction} must be in (0, 1]: the share of "
                          "prompts kept, most consistently ranked first (Repeat Ranking: 0.25, 0.5 or 0.75).")
    listwise = cfg.feedback.source == "judge" and cfg.feedback.judge.mode == "listwise"
    if cfg.label.keep_top_fraction < 1 and not listwise:
        raise ConfigError("label.keep_top_fraction < 1 keeps the prompts whose repeated rankings agree most "
                          "(Kendall's W), which only a listwise judge gives. Fix: feedback=judge_listwise, or "
                          "label.keep_top_fraction=1.0 (for a pairwise judge, feedback.judge.consistency_threshold "
                          "filters pairs instead).")
    if cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(f"rollout.samples_per_prompt={cfg.rollout.samples_per_prompt}: a preference pair needs at "
                          f"least 2 responses per prompt. Fix: rollout.samples_per_prompt=4")
    validate_feedback_source(cfg)
