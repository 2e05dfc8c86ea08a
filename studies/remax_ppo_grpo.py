"""Study 5: ReMax vs PPO vs GRPO on the same reward (Li et al. 2024, "ReMax": ReMax matches PPO's reward with
about 50% less GPU memory and about 2x the speed, since it drops the critic).

SmolLM2-135M-Instruct on the shipped prompts, 4 prompts x 4 samples per step for every arm, the gold rule itself
as the reward (feedback=function, openrlaif.feedback.gold:concise), measured greedily on 12 held-out prompts.
Arms: algorithm=remax (REINFORCE, greedy-response baseline), ppo (critic, GAE), grpo (group baseline). Measured:
gold reward vs step and vs wall time, seconds per step, and the peak resident memory of each role's processes
(CPU RSS here: the machine has no GPU; the critic's share is what the claim is about).
    python studies/remax_ppo_grpo.py           # ~30 min on 2 cores
    python studies/remax_ppo_grpo.py --quick   # tiny-model smoke
"""
import os
import time

from common import GOLD, arguments, gold_curve, mean_curves, mean_sd, run_arm, table, welch_t, write

NAME = "remax_ppo_grpo"


def main() -> None:
    args = arguments(__doc__.splitlines()[0], steps=6)
    start = time.perf_counter()
    arms = ["remax", "ppo", "grpo"]
    reward = ["feedback=function", f"feedback.function={GOLD}"] + ([] if args.quick else ["eval.every=3"])
    runs = {arm: [] for arm in arms}
    for seed in args.seed_list:
        for arm in arms:
            out_dir = os.path.join(args.out, "runs", f"{NAME}-{arm}-s{seed}")
            result = run_arm(args.base + reward + [f"algorithm={arm}", f"seed={seed}", f"steps={args.steps}"],
                             out_dir)
            curve = gold_curve(result["rows"])
            steps = [r for r in result["rows"] if r["step"] > 0]
            elapsed, clock = 0.0, []
            for r in steps:
                elapsed += r["time/step_s"]
                if r.get("eval/gold_reward") is not None:
                    clock.append((round(elapsed, 1), r["eval/gold_reward"]))
            runs[arm].append({"seed": seed, "gold_start": curve[0][1], "gold_end": curve[-1][1],
                              "gold_gain": curve[-1][1] - curve[0][1], "curve": curve, "gold_vs_seconds": clock,
                              "step_s": sum(r["time/step_s"] for r in steps) / len(steps),
                              "peak_gib": result["peak_gib"], "peak_gib_total": sum(result["peak_gib"].values()),
                              "seconds": result["seconds"]})
    rows, summary = [], {}
    for arm, items in runs.items():
        end, end_sd = mean_sd([r["gold_end"] for r in items])
        gain, gain_sd = mean_sd([r["gold_gain"] for r in items])
        step_s, _ = mean_sd([r["step_s"] for r in items])
        memory, _ = mean_sd([r["peak_gib_total"] for r in items])
        roles = {role: mean_sd([r["peak_gib"].get(role, 0.0) for r in items])[0] for role in items[0]["peak_gib"]}
        summary[arm] = {"gold_end_mean": end, "gold_end_sd": end_sd, "gold_gain_mean": gain, "gold_gain_sd": gain_sd,
                        "step_s_mean": step_s, "peak_gib_total_mean": memory, "peak_gib_by_role": roles}
        rows.append([arm, len(items), end, end_sd, gain, gain_sd, step_s, memory])
    remax, ppo = summary["remax"], summary["ppo"]
    t = welch_t([r["gold_gain"] for r in runs["remax"]], [r["gold_gain"] for r in runs["ppo"]])
    memory_ratio = remax["peak_gib_total_mean"] / ppo["peak_gib_total_mean"]
    speedup = ppo["step_s_mean"] / remax["step_s_mean"]
    verdict = {"reward_matches_ppo": bool(t > -2 if t == t else remax["gold_gain_mean"] >= ppo["gold_gain_mean"]),
               "memory_ratio_remax_over_ppo": memory_ratio, "memory_halved": bool(memory_ratio <= 0.6),
               "speedup_ppo_over_remax": speedup, "twice_as_fast": bool(speedup >= 1.7)}
    seconds = time.perf_counter() - start
    print(table(["arm", "seeds", f"gold@{args.steps}", "sd", "gain", "sd", "s/step", "peak GiB"], rows))
    print(f"ReMax vs PPO: gain t = {t:.2f}; memory {memory_ratio:.2f}x; PPO step time / ReMax {speedup:.2f}x; "
          f"{seconds / 60:.1f} min")
    write(NAME, args.out, {"study": NAME, "quick": args.quick, "steps": args.steps, "seeds": args.seed_list,
                           "arms": runs, "summary": summary, "welch_t_gain_remax_vs_ppo": t, "verdict": verdict,
                           "seconds": seconds},
          mean_curves(runs), "mean gold reward (held-out, greedy) vs step: ReMax, PPO, GRPO")


if __name__ == "__main__":
    main()
