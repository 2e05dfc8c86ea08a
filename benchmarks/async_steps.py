"""Synchronous GRPO vs batches sampled 1 and 2 steps ahead (`rollout.async_steps=0|1|2`), through the real driver:
the median step time after the warm-up steps, where it goes (the time spent waiting for this step's samples, the
update, the weight sync), how stale the batches were and how far the behaviour policy was from π_old.

Each setting runs in a fresh process with its own Ray cluster; the same prompts, seeds and reward in each. On a
machine where the engines and the trainer share the same cores (this 2-core CPU), sampling ahead cannot overlap
with the update and is no faster; the script reports what it measures.

    .venv/bin/python benchmarks/async_steps.py                      # SmolLM2-135M, vLLM, 6 steps each
    .venv/bin/python benchmarks/async_steps.py --model tiny --steps 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, fresh_process, metrics_rows, print_table, write_report  # noqa: E402


def measure(model: str, engine: str, steps: int, async_steps: int) -> dict:
    from openrlaif.pipelines import run
    out = tempfile.mkdtemp(prefix="openrlaif-bench-async-")
    cfg = config([f"model={model}", "feedback=function", "+feedback.function_kwargs.target_words=4",
                  f"rollout.engine={engine}", f"rollout.async_steps={async_steps}", f"steps={steps}",
                  "data.prompts=demo", "data.prompts_per_step=4", "rollout.samples_per_prompt=4",
                  "rollout.max_new_tokens=32", "rollout.kv_cache_gib=0.25", "actor.micro_batch_size=4",
                  f"output.dir={out}", "output.save_final=false"])
    run(cfg)
    rows = metrics_rows(out)
    steady = rows[async_steps + 1:] or rows[-1:]   # after the steps that fill the queue

    def median(key: str) -> float:
        values = [row[key] for row in steady if key in row]
        return statistics.median(values) if values else float("nan")
    return {"model": model, "engine": engine, "async_steps": async_steps, "steps": steps,
            "step_s": median("time/step_s"), "rollout_wait_s": median("time/rollout_s"),
            "update_s": median("time/update_s"), "sync_s": median("time/sync_s"),
            "staleness": statistics.mean(row["rollout/staleness"] for row in steady),
            "behaviour_kl": median("train/behaviour_kl"), "is_weight": median("train/is_weight_mean"),
            "reward_first": rows[0]["reward/mean"], "reward_last": rows[-1]["reward/mean"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(measure(args.model, args.engine, args.steps, args.worker)))
        return
    rows = []
    for k in args.ks:
        row = fresh_process([__file__, "--worker", str(k), "--model", args.model, "--engine", args.engine,
                             "--steps", str(args.steps)], f"rollout.async_steps={k}")
        if row is not None:
            rows.append(row)
    synchronous = next((row for row in rows if row["async_steps"] == 0), None)
    for row in rows:   # a ratio within this run: the synchronous step's time over this one's
        if synchronous:
            row["speed_vs_sync"] = synchronous["step_s"] / row["step_s"]
    print()
    print_table(rows, [("async_steps", "async_steps", "d"), ("step_s", "step s", ".2f"),
                       ("speed_vs_sync", "vs sync", ".2f"), ("rollout_wait_s", "waiting for samples s", ".2f"),
                       ("update_s", "update s", ".2f"), ("sync_s", "sync s", ".2f"),
                       ("staleness", "staleness", ".2f"), ("behaviour_kl", "KL(behaviour‖π_old)", ".2g"),
                       ("is_weight", "IS weight", ".3f")])
    write_report("async_steps", {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows})


if __name__ == "__main__":
    main()
