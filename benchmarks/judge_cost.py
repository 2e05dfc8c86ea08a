"""What AI feedback costs: judge tokens and judge seconds per policy token, pointwise vs pairwise with position
swap, on the HF and the vLLM judge engine, on the same sampled responses (pipeline=label over the demo prompts,
same seed, the policy model as judge). --strategies adds pairwise rows per comparison strategy (all, anchor,
adaptive) on the vLLM judge, with their request counts.

    .venv/bin/python benchmarks/judge_cost.py                       # SmolLM2-135M as policy and judge
    .venv/bin/python benchmarks/judge_cost.py --model tiny
    .venv/bin/python benchmarks/judge_cost.py --samples 8 --strategies
    .venv/bin/python benchmarks/judge_cost.py --dtype bfloat16         # policy, judge and engines in bf16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, metrics_rows, print_table, write_report  # noqa: E402

MODES = {
    "pointwise (probs), HF judge": ["feedback=judge", "feedback.judge.engine=hf"],
    "pointwise (probs), vLLM judge": ["feedback=judge", "feedback.judge.engine=vllm"],
    "pairwise + swap (probs), HF judge": ["feedback=judge_pairwise", "feedback.judge.engine=hf"],
    "pairwise + swap (probs), vLLM judge": ["feedback=judge_pairwise", "feedback.judge.engine=vllm"],
}
STRATEGIES = {f"pairwise {name} (Bradley-Terry), vLLM judge": [
    "feedback=judge_pairwise", "feedback.judge.engine=vllm", f"feedback.judge.pairwise_strategy={name}",
    "feedback.judge.pairwise_reward=bradley_terry"] for name in ("all", "anchor", "k_random", "adaptive")}
GENERATE_MODE = {   # --with-generate: sampled verdicts, two per order (pairwise consistency filter); slow on CPU
    "pairwise + swap, 2 repeats (generate, T=0.7)": ["feedback=judge_pairwise", "feedback.judge.readout=generate",
                                                     "feedback.judge.repeats=2", "feedback.judge.temperature=0.7"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompts", default="demo", help="data.prompts: the prompts to answer and judge")
    parser.add_argument("--with-generate", action="store_true", help="also time a generate-readout judge")
    parser.add_argument("--strategies", action="store_true",
                        help="also every pairwise strategy with Bradley-Terry rewards (vLLM judge), and each one's "
                             "Kendall tau with all-pairs Bradley-Terry on the same responses")
    parser.add_argument("--only-strategies", action="store_true", help="--strategies without the engine rows")
    parser.add_argument("--rollout-engine", default="vllm", choices=["vllm", "hf"],
                        help="the policy's sampler (the judge's engine is each row's own); the e2e smoke takes hf, "
                             "which starts faster on the tiny model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model.dtype and rollout.dtype: the judge runs in the model's precision")
    parser.add_argument("--report", default="judge_cost", help="the JSON's name in the results folder")
    args = parser.parse_args()
    args.strategies = args.strategies or args.only_strategies
    modes = ({} if args.only_strategies else MODES) | (STRATEGIES if args.strategies else {}) | \
        (GENERATE_MODE if args.with_generate else {})
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import ray

    from openrlaif.pipelines import run
    from openrlaif.runtime import init_local_ray

    rows = []
    init_local_ray(num_cpus=4)
    try:
        for name, extra in modes.items():
            with tempfile.TemporaryDirectory() as out_dir:
                run(config(["pipeline=label", f"model.path={args.model}", "data.prompts_per_step=4",
                            f"data.prompts={args.prompts}", f"rollout.engine={args.rollout_engine}",
                            f"model.dtype={args.dtype}", f"rollout.dtype={args.dtype}",
                            f"rollout.samples_per_prompt={args.samples}", f"rollout.max_new_tokens={args.max_new_tokens}",
                            "feedback.judge.cache=false", "cluster.threads_per_worker=0", f"output.dir={out_dir}",
                            # cost, not quality: every verdict counts, also a weak judge's (the tiny model's)
                            "feedback.judge.min_label_mass=0", "feedback.max_failed_steps=0", *extra]))
                chunks = metrics_rows(out_dir)
                ranked = {json.dumps(row["prompt"]): row["scores"] for row in map(json.loads, open(
                    os.path.join(out_dir, "ranked.jsonl")))}
            judge_tokens = sum(c["feedback/judge_prompt_tokens"] + c["feedback/judge_generated_tokens"] for c in chunks)
            policy_tokens = sum((c["feedback/judge_prompt_tokens"] + c["feedback/judge_generated_tokens"])
                                / c["feedback/judge_tokens_per_policy_token"] for c in chunks)
            seconds = sum(c["time/feedback_s"] for c in chunks)
            requests = sum(c.get("feedback/judge_requests", 0) for c in chunks)
            cached = sum(c.get("feedback/judge_cached_prompt_tokens", 0) for c in chunks)
            rows.append({"mode": name, "policy_tokens": policy_tokens, "judge_tokens": judge_tokens,
                         "judge_requests": requests, "judge_s": seconds,
                         "cached_prompt_fraction": cached / max(sum(c["feedback/judge_prompt_tokens"]
                                                                    for c in chunks), 1),
                         "judge_tokens_per_policy_token": judge_tokens / policy_tokens,
                         "judge_ms_per_policy_token": 1000 * seconds / policy_tokens,
                         "rollout_s": sum(c["time/rollout_s"] for c in chunks),
                         "failures": sum(c.get("feedback/failures", 0) for c in chunks), "ranked": ranked})
            print(f"[judge_cost] {name}: {rows[-1]['judge_tokens_per_policy_token']:.1f} judge tokens and "
                  f"{rows[-1]['judge_ms_per_policy_token']:.1f} ms per policy token")
    finally:
        ray.shutdown()
    from openrlaif.feedback.comparisons import kendall_tau
    ranked = {row["mode"]: row.pop("ranked") for row in rows}     # per prompt: the group's rewards
    reference = next((r for r in rows if r["mode"].startswith("pairwise all (Bradley-Terry)")), None)
    for row in rows:
        if reference is None or "(Bradley-Terry)" not in row["mode"]:
            continue
        mine, theirs = ranked[row["mode"]], ranked[reference["mode"]]
        taus = [kendall_tau(mine[p], theirs[p]) for p in mine if p in theirs]
        row["kendall_tau_vs_all"] = sum(taus) / len(taus) if taus else float("nan")
        row["requests_vs_all"] = row["judge_requests"] / reference["judge_requests"]
    base = rows[0]["judge_s"]
    for row in rows:
        row["seconds_vs_pointwise"] = row["judge_s"] / base
        hf = next((r for r in rows if r["mode"] == row["mode"].replace("vLLM judge", "HF judge")), None)
        row["ms_vs_hf_judge"] = row["judge_ms_per_policy_token"] / hf["judge_ms_per_policy_token"] if hf else 1.0
    print()
    print_table(rows, [("mode", "judge", "s"), ("policy_tokens", "policy tok", ".0f"),
                       ("judge_tokens", "judge tok", ".0f"), ("judge_requests", "requests", ".0f"),
                       ("judge_tokens_per_policy_token", "judge tok / policy tok", ".2f"),
                       ("judge_ms_per_policy_token", "judge ms / policy tok", ".1f"),
                       ("seconds_vs_pointwise", "s vs HF pointwise", ".2f"),
                       ("ms_vs_hf_judge", "ms vs HF judge", ".2f"),
                       ("cached_prompt_fraction", "prompt cached", ".2f"), ("failures", "failures", ".0f")]
                + ([("requests_vs_all", "requests vs all", ".2f"), ("kendall_tau_vs_all", "tau vs all", ".2f")]
                   if args.strategies else []))
    write_report(args.report, {"model": args.model, "samples_per_prompt": args.samples,
                                "rollout_engine": args.rollout_engine, "dtype": args.dtype,
                                "max_new_tokens": args.max_new_tokens,
                                "prompts": "demo (17)" if args.prompts == "demo" else args.prompts,
                                "command": "benchmarks/judge_cost.py " + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
