"""Study 6: over-optimisation of a proxy reward (Gao et al. 2023, "Scaling laws for reward model
over-optimization": as the policy moves away from its start (KL), the proxy reward keeps rising while the gold
reward rises less, then falls).

GRPO on SmolLM2-135M-Instruct with a *pointwise* AI labeller as the only reward: the gold rule seen through a
fixed per-response error (score_noise 0.3:
each answer's own, consistent mistake) and a verbosity bias (length_bias 1.0: +0.1 on the gold's [0, 1] scale per
10 words), trained longer and harder (lr 2e-5) than the other studies. Every 4 steps the
greedy answers to 12 held-out prompts are scored by the labeller (eval/train_reward, the proxy) and by the gold rule
(eval/gold_reward), with the policy's KL to the reference on them.
    python studies/overoptimisation.py          # ~25 min on 2 cores
    python studies/overoptimisation.py --quick  # tiny-model smoke
"""
import os
import time

from common import arguments, labeller, mean_curves, mean_sd, run_arm, table, write

NAME = "overoptimisation"


def main() -> None:
    args = arguments(__doc__.splitlines()[0], steps=16)
    start = time.perf_counter()
    runs = []
    with labeller(accuracy=0.9, score_noise=0.3, length_bias=1.0, seed=0) as server:
        judge = ["feedback=judge_http", f"feedback.judge.base_url={server.base_url}", "feedback.judge.model=labeller",
                 "feedback.judge.api_key_env="] + ([] if args.quick else ["actor.lr=2e-5"])
        for seed in args.seed_list:
            out_dir = os.path.join(args.out, "runs", f"{NAME}-s{seed}")
            result = run_arm(args.base + judge + [f"seed={seed}", f"steps={args.steps}"], out_dir)
            points = [{"step": r["step"], "kl": r.get("eval/kl"), "proxy": r["eval/train_reward"],
                       "gold": r["eval/gold_reward"]} for r in result["rows"] if r.get("eval/gold_reward") is not None]
            peak = max(points, key=lambda p: p["gold"])
            runs.append({"seed": seed, "points": points, "proxy_curve": [(p["step"], p["proxy"]) for p in points],
                         "gold_curve": [(p["step"], p["gold"]) for p in points], "gold_peak_step": peak["step"],
                         "proxy_gain": points[-1]["proxy"] - points[0]["proxy"],
                         "gold_gain": points[-1]["gold"] - points[0]["gold"],
                         "gold_fell_after_peak": bool(points[-1]["gold"] < peak["gold"] - 1e-9),
                         "seconds": result["seconds"]})
    proxy_gain, proxy_sd = mean_sd([r["proxy_gain"] for r in runs])
    gold_gain, gold_sd = mean_sd([r["gold_gain"] for r in runs])
    gap_grew = bool(all(r["proxy_gain"] > r["gold_gain"] for r in runs))
    fell = sum(r["gold_fell_after_peak"] for r in runs)
    seconds = time.perf_counter() - start
    rows = [[r["seed"], p["step"], p["kl"] if p["kl"] is not None else float("nan"), p["proxy"], p["gold"]]
            for r in runs for p in r["points"]]
    print(table(["seed", "step", "KL", "proxy", "gold"], rows))
    print(f"proxy gain {proxy_gain:+.3f} (sd {proxy_sd:.3f}) vs gold gain {gold_gain:+.3f} (sd {gold_sd:.3f}); "
          f"proxy outgrew gold in every seed: {gap_grew}; gold fell after its peak in {fell}/{len(runs)} seeds; "
          f"{seconds / 60:.1f} min")
    write(NAME, args.out, {"study": NAME, "quick": args.quick, "steps": args.steps, "seeds": args.seed_list,
                           "labeller": {"accuracy": 0.9, "score_noise": 0.3, "length_bias": 1.0}, "runs": runs,
                           "proxy_gain_mean": proxy_gain, "gold_gain_mean": gold_gain, "proxy_outgrew_gold": gap_grew,
                           "gold_fell_after_peak_seeds": fell, "seconds": seconds},
          {"proxy": mean_curves({"r": runs}, "proxy_curve")["r"], "gold": mean_curves({"r": runs}, "gold_curve")["r"]},
          "mean held-out proxy (labeller) and gold reward vs step")


if __name__ == "__main__":
    main()
