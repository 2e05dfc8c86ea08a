"""What AI feedback costs: judge tokens and judge seconds per policy token, pointwise vs pairwise with position
swap, on the same sampled responses (pipeline=label over the demo prompts, same seed, the policy model as judge).

    .venv/bin/python benchmarks/judge_cost.py                       # SmolLM2-135M as policy and judge
    .venv/bin/python benchmarks/judge_cost.py --model tiny
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, metrics_rows, print_table, write_report  # noqa: E402

MODES = {
    "pointwise (probs)": ["feedback=judge"],
    "pairwise + swap (probs)": ["feedback=judge_pairwise"],
}
GENERATE_MODE = {   # --with-generate: sampled verdicts, two per order (pairwise consistency filter); slow on CPU
    "pairwise + swap, 2 repeats (generate, T=0.7)": ["feedback=judge_pairwise", "feedback.judge.readout=generate",
                                                     "feedback.judge.repeats=2", "feedback.judge.temperature=0.7"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--with-generate", action="store_true", help="also time a generate-readout judge")
    args = parser.parse_args()
    modes = MODES | (GENERATE_MODE if args.with_generate else {})
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
                            f"rollout.samples_per_prompt={args.samples}", f"rollout.max_new_tokens={args.max_new_tokens}",
                            "feedback.judge.cache=false", "cluster.threads_per_worker=0", f"output.dir={out_dir}",
                            # cost, not quality: every verdict counts, also a weak judge's (the tiny model's)
                            "feedback.judge.min_label_mass=0", "feedback.max_failed_steps=0", *extra]))
                chunks = metrics_rows(out_dir)
            judge_tokens = sum(c["feedback/judge_prompt_tokens"] + c["feedback/judge_generated_tokens"] for c in chunks)
            policy_tokens = sum((c["feedback/judge_prompt_tokens"] + c["feedback/judge_generated_tokens"])
                                / c["feedback/judge_tokens_per_policy_token"] for c in chunks)
            seconds = sum(c["time/feedback_s"] for c in chunks)
            requests = sum(c.get("feedback/judge_requests", 0) for c in chunks)
            rows.append({"mode": name, "policy_tokens": policy_tokens, "judge_tokens": judge_tokens,
                         "judge_requests": requests, "judge_s": seconds,
                         "judge_tokens_per_policy_token": judge_tokens / policy_tokens,
                         "judge_ms_per_policy_token": 1000 * seconds / policy_tokens,
                         "rollout_s": sum(c["time/rollout_s"] for c in chunks),
                         "failures": sum(c.get("feedback/failures", 0) for c in chunks)})
            print(f"[judge_cost] {name}: {rows[-1]['judge_tokens_per_policy_token']:.1f} judge tokens and "
                  f"{rows[-1]['judge_ms_per_policy_token']:.1f} ms per policy token")
    finally:
        ray.shutdown()
    base = rows[0]["judge_s"]
    for row in rows:
        row["seconds_vs_pointwise"] = row["judge_s"] / base
    print()
    print_table(rows, [("mode", "judge", "s"), ("policy_tokens", "policy tok", ".0f"),
                       ("judge_tokens", "judge tok", ".0f"), ("judge_requests", "requests", ".0f"),
                       ("judge_tokens_per_policy_token", "judge tok / policy tok", ".2f"),
                       ("judge_ms_per_policy_token", "judge ms / policy tok", ".1f"),
                       ("seconds_vs_pointwise", "s vs pointwise", ".2f"), ("failures", "failures", ".0f")])
    write_report("judge_cost", {"model": args.model, "samples_per_prompt": args.samples,
                                "max_new_tokens": args.max_new_tokens, "prompts": "demo (17)",
                                "command": "benchmarks/judge_cost.py " + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
