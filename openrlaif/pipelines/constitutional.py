"""pipeline=constitutional: the supervised phase of Constitutional AI (Bai et al. 2022). The policy answers every
prompt; the judge (by default the same model, as in the paper; or any endpoint) critiques each answer against a
principle drawn from `constitution.principles`, then rewrites it; after `constitution.revisions` rounds the final
revisions become SFT data, and (with constitution.train=true) the policy is fine-tuned on them for `steps` steps.

Writes, in output.dir:
  revisions.jsonl      {"prompt", "response", "original", "critiques", "principles"}: data.sft for pipeline=sft
  constitutional.json  counts, failures by kind, lengths, judge seconds
  checkpoint/          the SFT-trained policy (constitution.train=true)
"""
from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import replace

from tqdm import tqdm

from openrlaif.checkpointing import RunError
from openrlaif.config import Config, ConfigError, check_positive, validate_judge, validate_offline_training
from openrlaif.feedback.base import JudgeFailure
from openrlaif.feedback.judge_prompts import clean_revision, critique_messages, revision_messages
from openrlaif.pipelines.common import release
from openrlaif.pipelines.label import write_jsonl
from openrlaif.roles import Roles, RunInputs, prepare_run, start_roles
from openrlaif.rollout.launch import generate
from openrlaif.runtime import ray_session


def train(cfg: Config) -> dict:
    run = prepare_run(cfg)
    with ray_session(cfg.cluster, run.cpus_needed):
        roles = start_roles(cfg, run)
        try:
            summary = revise_all(cfg, run, roles)
        finally:
            roles.shutdown()
    print(f"[openrlaif] {summary['revised']} revisions of {summary['responses']} responses: "
          f"{summary['revisions_path']}")
    if not cfg.constitution.train:
        release(run.out_dir)
        return {"checkpoint": None, "metrics": summary, "out_dir": run.out_dir}
    if summary["revised"] == 0:
        raise RunError(f"constitutional: every critique or revision failed ({summary['failures']}), so there is "
                           "nothing to fine-tune on. Fix: a stronger feedback.judge.model, or more "
                           "constitution.max_new_tokens; see constitutional.json.")
    from openrlaif.pipelines import sft
    sft_cfg = replace(cfg, pipeline="sft", data=replace(cfg.data, sft=summary["revisions_path"]),
                      output=replace(cfg.output, dir=run.out_dir))
    return sft.train(sft_cfg, continuing=True)


def revise_all(cfg: Config, run: RunInputs, roles: Roles) -> dict:
    """Sample, then critique -> revise every response `constitution.revisions` times, in batches of
    `data.prompts_per_step` prompts. A failed critique or revision drops that response (counted by kind)."""
    con, judge = cfg.constitution, roles.judge_client
    rng = random.Random(cfg.seed)
    rows, failures, start = [], Counter(), time.perf_counter()
    original_words = revised_words = changed = responses_total = 0
    size = cfg.data.prompts_per_step
    for index, lo in enumerate(tqdm(range(0, len(run.prompts), size), desc="openrlaif critique+revise",
                                    unit="batch", dynamic_ncols=True), start=1):
        prompts = run.prompts[lo:lo + size]
        batch = generate(roles, prompts, cfg, run.tokenizer, seed=cfg.seed * 10_000 + index)
        group_ids = batch["group_ids"].tolist()
        conversations = [prompts[g].messages for g in group_ids]
        originals = batch.meta["response"]
        responses_total += len(originals)
        current: list[str | None] = list(originals)
        critiques: list[list[str]] = [[] for _ in originals]
        principles: list[list[int]] = [[] for _ in originals]
        for round_ in range(con.revisions):
            alive = [i for i, text in enumerate(current) if text is not None]
            drawn = {i: rng.randrange(len(con.principles)) for i in alive}
            seed = {i: ((lo * cfg.rollout.samples_per_prompt + i) * 64 + round_) * 2 for i in alive}
            replies = judge.generate(
                [critique_messages(conversations[i], current[i], con.principles[drawn[i]].critique) for i in alive],
                con.max_new_tokens, con.temperature, [seed[i] for i in alive])
            critique_of = {}
            for i, reply in zip(alive, replies):
                if reply.failure or not reply.text.strip():
                    failures[reply.failure or "empty_critique"] += 1
                    current[i] = None
                else:
                    critique_of[i] = reply.text.strip()
            alive = list(critique_of)
            replies = judge.generate(
                [revision_messages(conversations[i], current[i], con.principles[drawn[i]].critique, critique_of[i],
                                   con.principles[drawn[i]].revision) for i in alive],
                con.max_new_tokens, con.temperature, [seed[i] + 1 for i in alive])
            for i, reply in zip(alive, replies):
                try:
                    if reply.failure:
                        raise JudgeFailure(reply.failure, reply.detail)
                    current[i] = clean_revision(reply.text)
                except JudgeFailure as failure:
                    failures[failure.kind] += 1
                    current[i] = None
                    continue
                critiques[i].append(critique_of[i])
                principles[i].append(drawn[i])
        for i, revision in enumerate(current):
            if revision is None:
                continue
            prompt = prompts[group_ids[i]]
            row = ({"prompt": prompt.text} if len(prompt.messages) == 1
                   else {"messages": prompt.messages + [{"role": "assistant", "content": revision}]})
            rows.append(row | {"response": revision, "original": originals[i], "critiques": critiques[i],
                               "principles": principles[i]})
            original_words += len(originals[i].split())
            revised_words += len(revision.split())
            changed += revision.strip() != originals[i].strip()
    stats = judge.take_stats()
    kept = len(rows)
    summary = {"prompts": len(run.prompts), "responses": responses_total, "revised": kept,
               "failures": dict(failures), "changed_fraction": changed / max(kept, 1),
               "original_words_mean": original_words / max(kept, 1), "revised_words_mean": revised_words / max(kept, 1),
               "judge_seconds": round(stats.get("judge_seconds", 0.0), 3),
               "judge_requests": int(stats.get("judge_requests", 0)),
               "judge_generated_tokens": int(stats.get("judge_generated_tokens", 0)),
               "seconds": round(time.perf_counter() - start, 3),
               "revisions_path": write_jsonl(os.path.join(run.out_dir, "revisions.jsonl"), rows)}
    with open(os.path.join(run.out_dir, "constitutional.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


# ----------------------------------------------------------------------------------------------------------- checks

def validate(cfg: Config) -> None:
    """pipeline=constitutional's own checks: its principles, the judge that critiques and revises, and the SFT
    run on the revisions (constitution.train)."""
    con = cfg.constitution
    if not con.principles:
        raise ConfigError("constitution.principles is empty. Fix: give at least one {critique, revision} pair, or "
                          "leave it unset for the built-in principles.")
    for index, principle in enumerate(con.principles):
        if not (principle.critique.strip() and principle.revision.strip()):
            raise ConfigError(f"constitution.principles[{index}] needs a non-empty critique and revision request.")
    check_positive("constitution.revisions", con.revisions)
    check_positive("constitution.max_new_tokens", con.max_new_tokens)
    check_positive("constitution.temperature", con.temperature, allow_zero=True)
    validate_judge(cfg.feedback.judge, cfg.pipeline, cfg.rollout.engine)
    if con.train:
        validate_offline_training(cfg)
