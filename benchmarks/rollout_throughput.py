"""Rollout throughput: our vLLM engine vs our HF engine on the same model, prompts, n and max tokens.

Each (model, engine) pair runs in a fresh process (engines set thread counts and allocator state). Reports
generated tokens/s (median of `--repeats` after one warm-up) and the time of an in-place weight update: the median
of the updates after the first, which is what a run pays per step, and the first, which also touches the freshly
loaded engine's memory (HF engine on SmolLM2: 1.7 s first, 0.05 s after). Prints a table and writes
rollout_throughput.json under benchmarks/results/ (or $OPENRLAIF_BENCH_RESULTS).

    .venv/bin/python benchmarks/rollout_throughput.py                # SmolLM2-135M and the tiny model
    .venv/bin/python benchmarks/rollout_throughput.py --models tiny-random-llama --max-new-tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import fresh_process, print_table, write_report  # noqa: E402


def measure(model: str, engine: str, prompts: int, n: int, max_new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from openrlaif.config import cache_dir, ModelConfig
    from openrlaif.data import load_prompts
    from openrlaif.models import resolve_model_path
    from openrlaif.rollout.types import SamplingSpec

    path = resolve_model_path(model, cache_dir(ModelConfig()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = [p.token_ids for p in load_prompts("demo", tokenizer, 512)][:prompts]
    start = time.perf_counter()
    if engine == "vllm":
        from openrlaif.rollout.vllm_engine import VLLMEngine
        llm = VLLMEngine(path, max_model_len=512 + max_new_tokens, kv_cache_gib=1.0)
    else:
        from openrlaif.rollout.hf_engine import HFEngine
        llm = HFEngine(path)
    startup = time.perf_counter() - start
    spec = SamplingSpec(n=n, max_new_tokens=max_new_tokens, temperature=1.0, seed=0)
    llm.generate(prompt_ids, spec)                      # warm-up (oneDNN builds kernels per shape)
    rates, tokens = [], 0
    for repeat in range(repeats):
        spec.seed = repeat + 1
        start = time.perf_counter()
        completions = llm.generate(prompt_ids, spec)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for c in completions)
        rates.append(tokens / seconds)
    from transformers import AutoModelForCausalLM
    state = list(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict().items())
    syncs = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.update_weights(state)
        syncs.append(time.perf_counter() - start)
    return {"model": model, "engine": engine, "prompts": len(prompt_ids), "n": n, "max_new_tokens": max_new_tokens,
            "generated_tokens": tokens, "tokens_per_s": statistics.median(rates), "startup_s": startup,
            "weight_update_s": statistics.median(syncs[1:] or syncs), "first_weight_update_s": syncs[0],
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "tiny-random-llama"])
    parser.add_argument("--engines", nargs="+", default=["vllm", "hf"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        row = measure(*args.worker, args.prompts, args.n, args.max_new_tokens, args.repeats)
        print("RESULT " + json.dumps(row))
        return
    rows = []
    for model in args.models:
        for engine in args.engines:
            row = fresh_process([__file__, "--worker", model, engine, "--prompts", str(args.prompts), "--n",
                                 str(args.n), "--max-new-tokens", str(args.max_new_tokens), "--repeats",
                                 str(args.repeats)], f"{model} / {engine}")
            if row is not None:
                rows.append(row)
    hf_rate = {row["model"]: row["tokens_per_s"] for row in rows if row["engine"] == "hf"}
    for row in rows:
        if row["model"] in hf_rate:
            row["vs_hf"] = row["tokens_per_s"] / hf_rate[row["model"]]
    print()
    print_table(rows, [("model", "model", "s"), ("engine", "engine", "s"), ("tokens_per_s", "tok/s", ".1f"),
                       ("vs_hf", "vs hf", ".2f"), ("generated_tokens", "tokens", "d"), ("startup_s", "start s", ".1f"),
                       ("weight_update_s", "sync s", ".3f"), ("first_weight_update_s", "1st sync", ".3f")])
    write_report("rollout_throughput", {"settings": {k: v for k, v in vars(args).items() if k != "worker"},
                                        "rows": rows})


if __name__ == "__main__":
    main()
