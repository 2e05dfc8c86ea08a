"""Step time per online algorithm, per preference loss, for SFT and reward-model training, on the tiny model,
through the real driver.

One local Ray cluster for all runs; each run does `--steps` steps and we report the median step time after the
first (warm-up) step, with the per-phase split for online runs. Prints a table and writes
train_step.json under benchmarks/results/ (or $OPENRLAIF_BENCH_RESULTS). Timings belong here, never in tests.

    .venv/bin/python benchmarks/train_step.py
    .venv/bin/python benchmarks/train_step.py --only grpo dpo --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import config, write_report  # noqa: E402

ONLINE = ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax", "ppo"]
PREFERENCE = ["dpo", "cdpo", "robust_dpo", "ipo", "simpo", "orpo", "kto", "bco", "lipo"]
PHASES = ["rollout", "feedback", "logprobs", "advantage", "update", "sync"]


def config_for(name: str, out_dir: str, steps: int):
    overrides = [f"algorithm={name}", "model=tiny", f"steps={steps}", f"output.dir={out_dir}", "output.save_final=false",
                 "actor.resources.num_workers=2", "cluster.threads_per_worker=1"]
    if name in ONLINE:
        overrides += ["feedback=function", "rollout.kv_cache_gib=0.1", "data.prompts_per_step=4",
                      "rollout.samples_per_prompt=4", "rollout.max_new_tokens=32", "actor.micro_batch_size=4"]
        if name == "ppo":
            overrides += ["critic.resources.num_workers=2", "critic.micro_batch_size=4"]
    elif name == "sft":
        overrides += ["pipeline=sft", "data.prompts_per_step=8", "actor.micro_batch_size=4", "data.pack_length=256"]
    elif name == "bradley_terry":
        overrides += ["pipeline=reward_model", "data.prompts_per_step=8", "actor.micro_batch_size=4",
                      "data.eval_fraction=0"]
    else:
        overrides += ["pipeline=preference", "data.prompts_per_step=8", "actor.micro_batch_size=4"]
        if name == "cdpo":
            overrides.append("algorithm.label_smoothing=0.1")
    return config(overrides)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=ONLINE + PREFERENCE + ["sft", "bradley_terry"])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import ray

    from openrlaif.pipelines import run
    from openrlaif.runtime import init_local_ray

    init_local_ray(num_cpus=6)
    rows = []
    try:
        for name in args.only:
            with tempfile.TemporaryDirectory() as out_dir:
                start = time.perf_counter()
                run(config_for(name, out_dir, args.steps))
                wall = time.perf_counter() - start
                metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))][1:]
            kind = "online" if name in ONLINE else "preference" if name in PREFERENCE else name
            row = {"name": name, "kind": kind,
                   "step_s": statistics.median(m["time/step_s"] for m in metrics), "run_wall_s": wall,
                   "update_tokens_per_s": statistics.median(m["throughput/update_tokens_per_s"] for m in metrics)}
            for phase in PHASES:
                if f"time/{phase}_s" in metrics[0]:
                    row[f"{phase}_s"] = statistics.median(m[f"time/{phase}_s"] for m in metrics)
            rows.append(row)
    finally:
        ray.shutdown()
    print(f"\n{'name':24s} {'kind':10s} {'step s':>8s} {'update tok/s':>13s}  phases (s)")
    for row in rows:
        phases = " ".join(f"{p}={row[p + '_s']:.3f}" for p in PHASES if p + "_s" in row)
        print(f"{row['name']:24s} {row['kind']:10s} {row['step_s']:8.3f} {row['update_tokens_per_s']:13.0f}  {phases}")
    write_report("train_step", {
        "model": "tiny-random-llama (2 layers, hidden 128)", "steps": args.steps,
        "setup": "actor 2 workers ZeRO-2 (gloo); online: vLLM rollout, 4 prompts x 4 samples x 32 tokens, rule "
                 "reward (ppo: + critic, 2 workers); preference/sft/reward model: 8 examples per step", "rows": rows})


if __name__ == "__main__":
    main()
