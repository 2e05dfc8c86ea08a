"""One GRPO step and one DPO step in openrlaif vs TRL (GRPOTrainer, DPOTrainer) on the same work: same model,
prompts or pairs, group size, max tokens, reward rule, learning rate and batch, both in float32 on this machine.

TRL runs in its own venv (.venv-trl, created here on first use with TRL and our torch/transformers/accelerate
versions; TRL is never one of our dependencies), through benchmarks/trl_side.py. Each side runs `--steps` steps;
we report the median step wall time after `--warmup` steps, and TRL's median over ours.

    .venv/bin/python benchmarks/vs_trl.py                      # SmolLM2-135M, GRPO and DPO
    .venv/bin/python benchmarks/vs_trl.py --model tiny --steps 4 --only grpo
    .venv/bin/python benchmarks/vs_trl.py --only grpo --with-async   # plus one-step-off rollouts
    .venv/bin/python benchmarks/vs_trl.py --only grpo --engines vllm --steps 12 --report vs_trl_grpo_12
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, config, metrics_rows, print_table, write_report  # noqa: E402

TRL_VENV = os.path.join(ROOT, ".venv-trl")
TRL_VERSION = "1.13.0"
GRPO = {"prompts_per_step": 4, "n": 4, "max_new_tokens": 32, "lr": 1e-6, "kl_coef": 0.0, "loss_type": "dapo",
        "target_words": 4}
DPO = {"batch": 8, "lr": 1e-6, "beta": 0.1}


def ensure_trl_venv() -> str:
    """.venv-trl/bin/python with trl and the torch/transformers/accelerate versions of our venv."""
    pins = [f"torch=={md.version('torch').split('+')[0]}", f"trl=={TRL_VERSION}",
            f"transformers=={md.version('transformers')}", f"accelerate=={md.version('accelerate')}",
            "requests"]   # GRPOTrainer imports it; trl does not declare it
    python, stamp = os.path.join(TRL_VENV, "bin", "python"), os.path.join(TRL_VENV, ".pins")
    if os.path.exists(stamp) and open(stamp).read() == " ".join(pins):
        return python
    print(f"[vs_trl] creating {TRL_VENV} with {' '.join(pins)} (about a minute with a warm pip cache)")
    subprocess.run([sys.executable, "-m", "venv", TRL_VENV], check=True)
    for step in ([pins[0]], pins):                                                 # the CPU torch wheel first
        subprocess.run([python, "-m", "pip", "install", "-q", *step], check=True, stderr=subprocess.DEVNULL)
    with open(stamp, "w") as handle:
        handle.write(" ".join(pins))
    return python


def trl_pairs(path: str) -> list[dict]:
    """Our pairs file in TRL's conversational form with an explicit prompt."""
    rows = []
    for line in open(path):
        row = json.loads(line)
        if isinstance(row["chosen"], str):
            prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]}],
                         "rejected": [{"role": "assistant", "content": row["rejected"]}]})
        else:    # implicit prompt: the shared turns before the last
            rows.append({"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]})
    return rows


def run_trl(python: str, kind: str, model_path: str, steps: int, extra: dict, dtype: str = "float32") -> dict:
    data = os.path.join(ROOT, "openrlaif", "data")
    prompts = [row.get("messages") or [{"role": "user", "content": row["prompt"]}]
               for row in map(json.loads, open(os.path.join(data, "demo_prompts.jsonl")))]
    spec = {"kind": kind, "model": model_path, "steps": steps, "threads": os.cpu_count(), "prompts": prompts,
            "bf16": dtype == "bfloat16",
            "pairs": trl_pairs(os.path.join(data, "demo_pairs.jsonl")), "grpo": GRPO, "dpo": DPO | extra}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w") as handle:
            json.dump(spec, handle)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        out = subprocess.run([python, os.path.join(ROOT, "benchmarks", "trl_side.py"), spec_path, result_path],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"TRL side failed:\n{out.stderr[-3000:]}")
        with open(result_path) as handle:
            return json.load(handle)


def run_ours(kind: str, model: str, steps: int, engine: str, async_steps: int = 0,
             dtype: str = "float32") -> list[dict]:
    from openrlaif.pipelines import run

    common = [f"model.path={model}", f"steps={steps}", "output.save_final=false", "actor.resources.num_workers=1",
              f"model.dtype={dtype}", f"rollout.dtype={dtype}",
              f"actor.lr={GRPO['lr'] if kind == 'grpo' else DPO['lr']}", "cluster.threads_per_worker=0",
              "data.shuffle=false"]
    if kind == "grpo":
        overrides = common + ["algorithm=grpo", f"algorithm.kl_coef={GRPO['kl_coef']}", "feedback=function",
                              f"+feedback.function_kwargs.target_words={GRPO['target_words']}",
                              f"data.prompts_per_step={GRPO['prompts_per_step']}", f"rollout.samples_per_prompt={GRPO['n']}",
                              f"rollout.max_new_tokens={GRPO['max_new_tokens']}", f"rollout.engine={engine}",
                              f"rollout.async_steps={async_steps}",
                              f"actor.micro_batch_size={GRPO['prompts_per_step'] * GRPO['n']}"]
    else:
        overrides = common + ["pipeline=preference", "algorithm=dpo", f"algorithm.beta={DPO['beta']}", "data.pairs=demo",
                              f"data.prompts_per_step={DPO['batch']}", f"actor.micro_batch_size={DPO['batch']}"]
    with tempfile.TemporaryDirectory() as out_dir:
        run(config(overrides + [f"output.dir={out_dir}"]))
        return metrics_rows(out_dir)


def summary(name: str, side: str, step_s: list[float], warmup: int) -> dict:
    kept = step_s[warmup:]
    return {"name": name, "side": side, "median_step_s": statistics.median(kept), "min_step_s": min(kept),
            "max_step_s": max(kept), "steps_timed": len(kept), "all_step_s": [round(s, 4) for s in step_s]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a short name or an HF folder")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2,
                        help="steps left out of the median: both sides need about two to reach their pace")
    parser.add_argument("--only", nargs="*", default=["grpo", "dpo"])
    parser.add_argument("--engines", nargs="*", default=["vllm", "hf"], choices=["vllm", "hf"],
                        help="our rollout engines to time in GRPO")
    parser.add_argument("--report", default="vs_trl",
                        help="the JSON's name in the results folder (keep make bench's vs_trl.json apart)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="both sides' precision: ours model.dtype/rollout.dtype, TRL's bf16=True (autocast)")
    parser.add_argument("--with-async", action="store_true",
                        help="also time one-step-off GRPO (rollout.async_steps=1); it only pays on separate devices")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import ray

    from openrlaif.config import ModelConfig, cache_dir
    from openrlaif.models import resolve_model_path
    from openrlaif.runtime import init_local_ray

    model_path = resolve_model_path(args.model, cache_dir(ModelConfig()))
    python = ensure_trl_venv()
    rows, trl_versions = [], {}
    for kind in args.only:
        variants = [("trl", {})] if kind == "grpo" else [("trl", {"precompute_ref": True}),
                                                       ("trl (reference pass every step)", {"precompute_ref": False})]
        for side, extra in variants:
            start = time.perf_counter()
            result = run_trl(python, kind, model_path, args.steps, extra, args.dtype)
            trl_versions = result["versions"]
            rows.append(summary(kind, side, result["step_s"], args.warmup) | {"wall_s": time.perf_counter() - start})
            kept = list(zip(result["step_s"], result.get("generate_s", [])))[args.warmup:]
            if kept:   # TRL's GRPO step: generation and scoring, then the rest (the update)
                rows[-1]["phases_s"] = {"generate_and_score_s": statistics.median(g for _, g in kept),
                                        "rest_s": statistics.median(s - g for s, g in kept)}
            print(f"[vs_trl] {kind} {side}: median {rows[-1]['median_step_s']:.3f} s/step; "
                  f"phases {rows[-1].get('phases_s', {})}")
        if kind == "grpo":
            engines = [(engine, 0) for engine in args.engines] + ([("vllm", 1)] if args.with_async else [])
        else:
            engines = [("-", 0)]
        for engine, async_steps in engines:
            init_local_ray(num_cpus=4)
            try:
                start = time.perf_counter()
                metrics = run_ours(kind, args.model, args.steps, engine, async_steps, args.dtype)
            finally:
                ray.shutdown()
            step_s = [m["time/step_s"] for m in metrics]
            phases = {f"{p}_s": statistics.median(m[f"time/{p}_s"] for m in metrics[args.warmup:])
                      for p in ("rollout", "feedback", "logprobs", "update", "sync") if f"time/{p}_s" in metrics[0]}
            side = f"openrlaif ({engine} engine{', one-step-off' if async_steps else ''})" if engine != "-" \
                else "openrlaif"
            rows.append(summary(kind, side, step_s, args.warmup) | {"wall_s": time.perf_counter() - start,
                                                                   "phases_s": phases})
            print(f"[vs_trl] {kind} {side}: median {rows[-1]['median_step_s']:.3f} s/step; phases {phases}")
    for row in rows:      # TRL's step time over this row's: > 1 means this row is faster than TRL
        trl = next(r for r in rows if r["name"] == row["name"] and r["side"] == "trl")
        row["trl_over_this"] = trl["median_step_s"] / row["median_step_s"]
    print()
    print_table(rows, [("name", "step", "s"), ("side", "framework", "s"), ("median_step_s", "median s", ".3f"),
                       ("min_step_s", "min s", ".3f"), ("max_step_s", "max s", ".3f"),
                       ("trl_over_this", "TRL s / this s", ".2f")])
    write_report(args.report, {"model": args.model, "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype,
                               "trl": trl_versions, "grpo": GRPO, "dpo": DPO,
                               "command": "benchmarks/vs_trl.py " + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
