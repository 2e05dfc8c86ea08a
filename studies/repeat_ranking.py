"""Study 4: Repeat Ranking (Devine 2024, "Are You Sure? Rank Them Again"): a listwise AI judge ranks each prompt's
answers several times in shuffled orders; training only on the prompts it ranks most consistently (the top 50% by
Kendall's W) beats training on every prompt, although it is half the data.

For each seed, SmolLM2-135M-Instruct samples 5 answers to each of 48 training prompts (studies/data/prompts.jsonl)
and the listwise AI labeller (gold rule seen through Plackett–Luce noise, accuracy 0.8, 60% of its noise redrawn
for every request: inconsistent across repeats) ranks each group 5 times over the real HTTP judge path
(feedback=judge_listwise, backend http). pipeline=label turns each prompt into its best-vs-worst mean-rank pair,
once keeping every prompt (label.keep_top_fraction=1) and once the most consistent half (0.5); the two runs sample
the same answers and get the same rankings (same seeds, a fresh labeller each). DPO and ORPO train on each set for
the same number of updates. Measured: the share of the training pairs the gold rule agrees with (label accuracy),
the held-out gold pair accuracy of each loss's implicit reward (eval.pairs, 24 other prompts), and the gold win
rate of the greedy answers to those prompts against the starting model's.
    python studies/repeat_ranking.py          # ~35 min on 2 cores
    python studies/repeat_ranking.py --quick  # tiny-model smoke
"""
import json
import os
import time

from common import (GOLD, TRAIN_PROMPTS, arguments, gold_win_rate, greedy_answers, held_out_pairs, labeller,
                    mean_sd, offline_model, run_arm, start_model, table, write)

NAME = "repeat_ranking"
LOSSES = ["dpo", "orpo"]
SUBSETS = {"all": 1.0, "top50": 0.5}
LABELLER = {"accuracy": 0.8, "inconsistency": 0.6}


def label_accuracy(pairs: list[dict]) -> float:
    """The share of pairs whose chosen answer the gold rule scores higher (a gold tie counts 1/2)."""
    from openrlaif.feedback.rules import load_function
    gold = load_function(GOLD, {})
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = gold(prompts, [p["chosen"] for p in pairs]), gold(prompts, [p["rejected"] for p in pairs])
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / max(len(pairs), 1)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], steps=6)
    start_time, quick = time.perf_counter(), args.quick
    model = offline_model(quick)
    data_dir = os.path.join(args.out, "runs", f"{NAME}-data")
    held_out_path, held_out = held_out_pairs(model, os.path.join(data_dir, "label-held-out"), quick=quick)
    start_answers = greedy_answers(model, start_model(quick), os.path.join(data_dir, "eval-start"))
    train_base = model + ["pipeline=preference", f"steps={args.steps}", "data.prompts_per_step=8",
                          "output.save_final=true", f"actor.lr={1e-3 if quick else 5e-6}"]
    if held_out_path:
        train_base.append(f"eval.pairs={held_out_path}")
    runs, labels = [], []
    for seed in args.seed_list:
        sets = {}
        for subset, fraction in SUBSETS.items():   # 1. the same answers and rankings, two selections
            with labeller(**LABELLER, seed=seed) as server:
                judge = ["feedback=judge_listwise", "feedback.judge.backend=http", "feedback.judge.model=labeller",
                         f"feedback.judge.base_url={server.base_url}", "feedback.judge.api_key_env="]
                result = run_arm(model + judge + ["pipeline=label", f"data.prompts={TRAIN_PROMPTS}", f"seed={seed}",
                                                  "rollout.samples_per_prompt=5", "label.pairs=best_worst",
                                                  f"label.keep_top_fraction={fraction}", "data.prompts_per_step=8"],
                                 os.path.join(data_dir, f"label-{subset}-s{seed}"))
            summary = result["result"]["metrics"]
            pairs = [json.loads(line) for line in open(summary["pairs_path"])]
            w = [g["w"] for g in summary.get("kendalls_w", []) if g["w"] is not None]
            sets[subset] = (summary["pairs_path"], pairs)
            labels.append({"seed": seed, "subset": subset, "pairs": len(pairs), "label_accuracy": label_accuracy(pairs),
                           "mean_kendalls_w": sum(w) / len(w) if w else None})
        kept = {json.dumps(p, sort_keys=True) for p in sets["top50"][1]}
        nested = kept <= {json.dumps(p, sort_keys=True) for p in sets["all"][1]}
        for subset, (path, pairs) in sets.items():
            if not pairs:
                continue
            for loss in (["orpo"] if quick else LOSSES):   # 2. each loss on each selection, the same updates
                out_dir = os.path.join(args.out, "runs", f"{NAME}-{loss}-{subset}-s{seed}")
                result = run_arm(train_base + [f"algorithm={loss}", f"data.pairs={path}", f"seed={seed}"], out_dir)
                answers = greedy_answers(model, result["result"]["checkpoint"], os.path.join(out_dir, "eval"),
                                         remove=True)
                evals = [r for r in result["rows"] if "eval/reward_accuracy" in r]
                wins = gold_win_rate(answers, start_answers)
                runs.append({"loss": loss, "subset": subset, "seed": seed, "pairs": len(pairs), "nested": nested,
                             "held_out_accuracy": evals[-1]["eval/reward_accuracy"] if evals else None,
                             "held_out_accuracy_start": evals[0]["eval/reward_accuracy"] if evals else None,
                             "gold_win_rate": wins["win_rate"], "gold_win_ci95": [wins["ci95_low"], wins["ci95_high"]],
                             "gold_reward": sum(a["gold"] for a in answers) / len(answers),
                             "seconds": result["seconds"]})
                print(f"[study] {loss} on {subset} seed {seed}: held-out accuracy {runs[-1]['held_out_accuracy']}, "
                      f"gold win rate {wins['win_rate']:.3f}")
    summary, rows = {}, []
    for subset in SUBSETS:
        quality = [entry for entry in labels if entry["subset"] == subset]
        for loss in LOSSES:
            arm = [r for r in runs if r["loss"] == loss and r["subset"] == subset]
            if not arm:
                continue
            accuracy = mean_sd([r["held_out_accuracy"] for r in arm if r["held_out_accuracy"] is not None]
                               or [float("nan")])
            win = mean_sd([r["gold_win_rate"] for r in arm])
            label_acc = mean_sd([entry["label_accuracy"] for entry in quality])
            summary[f"{loss}@{subset}"] = {"held_out_accuracy": accuracy, "gold_win_rate": win,
                                           "label_accuracy": label_acc, "pairs": mean_sd([r["pairs"] for r in arm]),
                                           "seeds": len(arm)}
            rows.append([subset, loss, summary[f"{loss}@{subset}"]["pairs"][0], label_acc[0], *accuracy, *win])
    seconds = time.perf_counter() - start_time
    print(table(["prompts", "loss", "pairs", "label acc", "held-out acc", "sd", "gold win", "sd"], rows))
    print(f"{held_out} held-out gold pairs; top-50% a subset of all in every seed: "
          f"{all(r['nested'] for r in runs)}; {seconds / 60:.1f} min")
    curves = {f"{loss} {subset}": [(r["seed"], r["held_out_accuracy"]) for r in runs
                                   if r["loss"] == loss and r["subset"] == subset and r["held_out_accuracy"] is not None]
              for loss in LOSSES for subset in SUBSETS}
    write(NAME, args.out, {"study": NAME, "quick": quick, "steps": args.steps, "seeds": args.seed_list,
                           "labeller": LABELLER, "held_out_pairs": held_out, "labels": labels, "runs": runs,
                           "summary": summary, "seconds": seconds},
          {k: v for k, v in curves.items() if v}, "held-out gold pair accuracy per seed (x), each loss and prompt set")


if __name__ == "__main__":
    main()
