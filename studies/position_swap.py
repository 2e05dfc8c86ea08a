"""Study 1: position-swap debiasing in training (RLAIF, Lee et al. 2023, §3.3 / App.: LLM labellers prefer the
response shown first; judging both orders and averaging removes the bias).

GRPO on SmolLM2-135M-Instruct with a *pairwise* AI labeller (the simulated labeller behind the real HTTP judge
path: accuracy 0.8, position bias +3 logits for Response A) and every pair of each group of 4 compared. Arms:
feedback.judge.swap=true (both orders, the default) vs swap=false (one order only: a debug switch). Measured: the
gold reward (openrlaif.feedback.gold:concise) of the policy's greedy answers to 12 held-out prompts, at the start
and after N steps, over 3 seeds.

Claim: with a position-biased labeller, training without the swap learns (much) less than with it.
    python studies/position_swap.py            # ~25 min on 2 cores
    python studies/position_swap.py --quick    # tiny-model smoke
"""
import os
import time

from common import arguments, gold_curve, labeller, mean_curves, mean_sd, run_arm, table, welch_t, write

NAME = "position_swap"


def main() -> None:
    args = arguments(__doc__.splitlines()[0], steps=8)
    start = time.perf_counter()
    arms = {"swap": "true", "no_swap": "false"}
    runs = {arm: [] for arm in arms}
    with labeller(accuracy=0.8, position_bias=3.0, seed=0) as server:
        judge = ["feedback=judge_http", f"feedback.judge.base_url={server.base_url}", "feedback.judge.model=labeller",
                 "feedback.judge.api_key_env=", "feedback.judge.mode=pairwise", "feedback.judge.cache=false"]
        for seed in args.seed_list:
            for arm, swap in arms.items():
                out_dir = os.path.join(args.out, "runs", f"{NAME}-{arm}-s{seed}")
                result = run_arm(args.base + judge + [f"feedback.judge.swap={swap}", f"seed={seed}",
                                                      f"steps={args.steps}"], out_dir)
                curve = gold_curve(result["rows"])
                flips = [r["feedback/judge_flip_rate"] for r in result["rows"] if "feedback/judge_flip_rate" in r]
                runs[arm].append({"seed": seed, "gold_start": curve[0][1], "gold_end": curve[-1][1],
                                  "gold_gain": curve[-1][1] - curve[0][1], "curve": curve,
                                  "flip_rate": sum(flips) / len(flips) if flips else None,
                                  "seconds": result["seconds"]})
        rows, summary = [], {}
    for arm, items in runs.items():
        gain, sd = mean_sd([r["gold_gain"] for r in items])
        end, end_sd = mean_sd([r["gold_end"] for r in items])
        summary[arm] = {"gold_gain_mean": gain, "gold_gain_sd": sd, "gold_end_mean": end, "gold_end_sd": end_sd}
        rows.append([arm, len(items), items[0]["gold_start"], end, end_sd, gain, sd])
    t = welch_t([r["gold_gain"] for r in runs["swap"]], [r["gold_gain"] for r in runs["no_swap"]])
    reproduced = bool(summary["swap"]["gold_gain_mean"] > summary["no_swap"]["gold_gain_mean"] and t > 2)
    seconds = time.perf_counter() - start
    print(table(["arm", "seeds", "gold@0", f"gold@{args.steps}", "sd", "gain", "sd"], rows))
    print(f"swap − no swap: gold gain difference t = {t:.2f} (Welch, over seeds); claim reproduced: {reproduced}; "
          f"{seconds / 60:.1f} min")
    write(NAME, args.out, {"study": NAME, "quick": args.quick, "steps": args.steps, "seeds": args.seed_list,
                           "labeller": {"accuracy": 0.8, "position_bias": 3.0}, "arms": runs, "summary": summary,
                           "welch_t": t, "reproduced": reproduced, "seconds": seconds},
          mean_curves(runs), "mean gold reward (held-out, greedy) vs step: swap vs no swap")


if __name__ == "__main__":
    main()
