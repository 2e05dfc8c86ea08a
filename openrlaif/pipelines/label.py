"""pipeline=label: turn a prompt set into a preference dataset with AI feedback. For every prompt the policy
samples `rollout.samples_per_prompt` responses; the feedback scores them (a pairwise judge with position-swap
debiasing and the consistency filter, a pointwise judge, a reward model or rules); each prompt's group gives its
pairs (`label.pairs`, `label.min_gap`).

Writes, in output.dir:
  pairs.jsonl   {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}: what pipeline=preference
                and pipeline=reward_model read as data.pairs
  ranked.jsonl  {"prompt", "responses", "scores"} for prompts whose whole group was scored: LiPO's lists
  label.json    counts, skip reasons, judge metrics
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter

from tqdm import tqdm

from openrlaif.config import Config
from openrlaif.data.labelling import pair_row, select_pairs
from openrlaif.metrics import MetricsLogger, timer
from openrlaif.pipelines.online_rl import Roles, RunInputs, feedback_metrics, generate, prepare_run, start_roles
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
    return {"checkpoint": None, "metrics": summary, "out_dir": run.out_dir}


def label_prompts(cfg: Config, run: RunInputs, roles: Roles) -> dict:
    logger = MetricsLogger(run.out_dir, cfg)
    pair_rows, ranked_rows, skipped = [], [], Counter()
    start, size = time.perf_counter(), cfg.data.prompts_per_step
    chunks = range(0, len(run.prompts), size)
    for index, lo in enumerate(tqdm(chunks, desc="openrlaif label", unit="batch", dynamic_ncols=True), start=1):
        prompts, metrics = run.prompts[lo:lo + size], {}
        with timer(metrics, "rollout"):
            batch = generate(roles, prompts, cfg, run.tokenizer, seed=cfg.seed * 10_000 + index)
        with timer(metrics, "feedback"):
            feedback = roles.feedback.score(batch.meta["prompt"], batch.meta["response"])
        responses, rewards, valid = batch.meta["response"], feedback.rewards.tolist(), feedback.valid.tolist()
        group_ids = batch["group_ids"].tolist()
        pairs, chunk_skipped = select_pairs(group_ids, rewards, valid, responses, cfg.label.pairs, cfg.label.min_gap)
        skipped += chunk_skipped
        for pair in pairs:
            prompt = prompts[pair.group]
            pair_rows.append(pair_row(prompt.text, prompt.messages, responses[pair.chosen], responses[pair.rejected],
                                      rewards[pair.chosen], rewards[pair.rejected]))
        for group, prompt in enumerate(prompts):   # LiPO lists: single-turn prompts whose every response scored
            rows = [row for row, g in enumerate(group_ids) if g == group]
            if all(valid[row] for row in rows) and (prompt.messages is None or len(prompt.messages) == 1):
                ranked_rows.append({"prompt": prompt.text, "responses": [responses[r] for r in rows],
                                    "scores": [round(rewards[r], 6) for r in rows]})
        metrics |= feedback_metrics(feedback, float(batch["response_mask"].sum()), metrics["time/feedback_s"])
        metrics |= {"label/pairs": float(len(pairs))} | {f"label/skipped/{k}": float(v) for k, v in chunk_skipped.items()}
        logger.log(index, metrics)
    logger.close()
    out = run.out_dir
    summary = {"prompts": len(run.prompts), "responses_per_prompt": cfg.rollout.samples_per_prompt,
               "pairs": len(pair_rows), "ranked_lists": len(ranked_rows), "skipped": dict(skipped),
               "pairs_path": write_jsonl(os.path.join(out, "pairs.jsonl"), pair_rows),
               "ranked_path": write_jsonl(os.path.join(out, "ranked.jsonl"), ranked_rows),
               "seconds": round(time.perf_counter() - start, 3), "metrics_path": logger.path}
    with open(os.path.join(out, "label.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def write_jsonl(path: str, rows: list[dict]) -> str:
    """Written to a temp file first: a crash never leaves a half dataset under the final name."""
    staging = path + ".tmp"
    with open(staging, "w") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(staging, path)
    return path
