"""Study 3: direct RLAIF vs canonical RLAIF vs best-of-N SFT on the same judge budget (Lee et al. 2023, "RLAIF":
d-RLAIF, the judge's score used directly as the reward, matches or beats distilling the judge into a reward model
first; Sharma et al. 2024, "A Critical Evaluation of AI Feedback": SFT on the judge's best of N is a strong baseline
that RL on AI feedback often fails to beat).

One pointwise AI labeller (gold rule + a fixed per-answer error 0.2, over the real HTTP judge) and, per seed, 32 of
the 48 training prompts (studies/data/prompts.jsonl). Every arm asks the labeller about 4 answers to each of the
32 prompts (128 requests; their judge tokens are reported):
  (a) d-RLAIF:    GRPO, 8 steps × 4 prompts × 4 samples, the labeller's expected score as the reward;
  (b) canonical:  pipeline=label on the 32 prompts (best vs worst answer), a Bradley–Terry reward model trained on
                  those pairs (pipeline=reward_model), then GRPO with the reward model for the same 8 steps;
  (c) best-of-N:  SFT on the labeller's best answer of each prompt (the same labels as (b)).
Measured: the gold win rate of each trained policy's greedy answers to the 24 held-out prompts against the
starting model's (ties 1/2), and their mean gold reward.
    python studies/rlaif_variants.py          # ~15 min per seed on 2 cores
    python studies/rlaif_variants.py --quick  # tiny-model smoke
"""
import json
import os
import random
import shutil
import time

from common import (TRAIN_PROMPTS, arguments, gold_win_rate, greedy_answers, labeller, mean_sd, offline_model,
                    run_arm, start_model, table, welch_t, write)

NAME = "rlaif_variants"
ARMS = ["d_rlaif", "canonical", "best_of_n_sft"]
PROMPTS, SAMPLES, PER_STEP = 32, 4, 4   # 32 prompts × 4 answers judged in every arm: 8 GRPO steps of 4 prompts


def judge_tokens(rows: list[dict]) -> float:
    return sum(r.get("feedback/judge_prompt_tokens", 0.0) + r.get("feedback/judge_generated_tokens", 0.0)
               for r in rows)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], steps=PROMPTS // PER_STEP)
    start_time, quick = time.perf_counter(), args.quick
    model = offline_model(quick)
    lr = 1e-3 if quick else 1e-5
    prompts = [json.loads(line) for line in open(TRAIN_PROMPTS)]
    data_dir = os.path.join(args.out, "runs", f"{NAME}-data")
    os.makedirs(data_dir, exist_ok=True)
    start_answers = greedy_answers(model, start_model(quick), os.path.join(data_dir, "eval-start"))
    runs = []
    for seed in args.seed_list:
        chosen = random.Random(seed).sample(prompts, args.steps * PER_STEP)   # one pass of GRPO's prompt stream
        prompt_file = os.path.join(data_dir, f"prompts-s{seed}.jsonl")
        with open(prompt_file, "w") as handle:
            handle.writelines(json.dumps(p) + "\n" for p in chosen)
        grpo = model + ["algorithm=grpo", f"steps={args.steps}", f"data.prompts={prompt_file}", f"seed={seed}",
                        f"data.prompts_per_step={PER_STEP}", f"rollout.samples_per_prompt={SAMPLES}", f"actor.lr={lr}",
                        "output.save_final=true"]
        results = {}
        with labeller(accuracy=0.8, score_noise=0.2, seed=seed) as server:
            judge = ["feedback=judge_http", f"feedback.judge.base_url={server.base_url}", "feedback.judge.model=labeller",
                     "feedback.judge.api_key_env=", "feedback.judge.mode=pointwise"]
            direct = run_arm(grpo + judge, os.path.join(args.out, "runs", f"{NAME}-d_rlaif-s{seed}"))   # (a)
            results["d_rlaif"] = (direct, judge_tokens(direct["rows"]))
            label = run_arm(model + judge + ["pipeline=label", f"data.prompts={prompt_file}", f"seed={seed}",   # (b), (c)
                                             f"rollout.samples_per_prompt={SAMPLES}", "label.pairs=best_worst",
                                             "data.prompts_per_step=8"], os.path.join(data_dir, f"label-s{seed}"))
        label_tokens = judge_tokens(label["rows"])
        pairs_path = label["result"]["metrics"]["pairs_path"]
        pairs = [json.loads(line) for line in open(pairs_path)]
        reward_model = run_arm(model + ["pipeline=reward_model", "algorithm=bradley_terry", f"data.pairs={pairs_path}",
                                        f"steps={max(1, len(pairs) // 8)}", "data.prompts_per_step=8", f"seed={seed}",
                                        f"actor.lr={lr}", "output.save_final=true"],
                               os.path.join(data_dir, f"reward-model-s{seed}"))
        rm_path = reward_model["result"]["checkpoint"]
        canonical = run_arm(grpo + ["feedback=reward_model", f"feedback.reward_model.path={rm_path}"],
                            os.path.join(args.out, "runs", f"{NAME}-canonical-s{seed}"))
        results["canonical"] = (canonical, label_tokens)
        sft_file = os.path.join(data_dir, f"best-of-{SAMPLES}-s{seed}.jsonl")
        with open(sft_file, "w") as handle:
            handle.writelines(json.dumps({"prompt": p["prompt"], "response": p["chosen"]}) + "\n" for p in pairs)
        sft = run_arm(model + ["pipeline=sft", "algorithm=sft", f"data.sft={sft_file}", f"seed={seed}",
                               f"steps={max(1, len(pairs) // 8)}", "data.prompts_per_step=8", f"actor.lr={lr}",
                               "output.save_final=true"], os.path.join(args.out, "runs", f"{NAME}-best_of_n_sft-s{seed}"))
        results["best_of_n_sft"] = (sft, label_tokens)
        rm_accuracy = next((r.get("eval/accuracy") for r in reversed(reward_model["rows"]) if "eval/accuracy" in r), None)
        for arm, (result, tokens) in results.items():
            answers = greedy_answers(model, result["result"]["checkpoint"],
                                     os.path.join(args.out, "runs", f"{NAME}-{arm}-s{seed}", "eval"), remove=True)
            wins = gold_win_rate(answers, start_answers)
            runs.append({"arm": arm, "seed": seed, "judge_tokens": tokens, "gold_win_rate": wins["win_rate"],
                         "gold_win_ci95": [wins["ci95_low"], wins["ci95_high"]],
                         "gold_reward": sum(a["gold"] for a in answers) / len(answers),
                         "pairs": len(pairs) if arm != "d_rlaif" else None,
                         "reward_model_accuracy": rm_accuracy if arm == "canonical" else None,
                         "seconds": result["seconds"] + (label["seconds"] if arm != "d_rlaif" else 0.0)
                         + (reward_model["seconds"] if arm == "canonical" else 0.0)})
            print(f"[study] {arm} seed {seed}: gold win rate {wins['win_rate']:.3f}, judge tokens {tokens:.0f}")
        shutil.rmtree(rm_path, ignore_errors=True)   # ~0.5 GB; its accuracy is kept
    summary, rows = {}, []
    for arm in ARMS:
        items = [r for r in runs if r["arm"] == arm]
        win, gold, tokens = (mean_sd([r[key] for r in items]) for key in ("gold_win_rate", "gold_reward", "judge_tokens"))
        summary[arm] = {"gold_win_rate": win, "gold_reward": gold, "judge_tokens": tokens, "seeds": len(items)}
        rows.append([arm, *win, gold[0], tokens[0]])
    wins = {arm: [r["gold_win_rate"] for r in runs if r["arm"] == arm] for arm in ARMS}
    t_direct = welch_t(wins["d_rlaif"], wins["canonical"])
    t_sft = welch_t(wins["best_of_n_sft"], wins["d_rlaif"])
    seconds = time.perf_counter() - start_time
    print(table(["arm", "gold win", "sd", "gold reward", "judge tokens"], rows))
    print(f"d-RLAIF vs canonical: Welch t {t_direct:.2f}; best-of-N SFT vs d-RLAIF: t {t_sft:.2f}; "
          f"starting gold reward {sum(a['gold'] for a in start_answers) / len(start_answers):.3f}; {seconds / 60:.1f} min")
    write(NAME, args.out, {"study": NAME, "quick": quick, "steps": args.steps, "seeds": args.seed_list,
                           "labeller": {"accuracy": 0.8, "score_noise": 0.2}, "runs": runs, "summary": summary,
                           "welch_t_direct_vs_canonical": t_direct, "welch_t_sft_vs_direct": t_sft, "seconds": seconds},
          {arm: [(r["seed"], r["gold_win_rate"]) for r in runs if r["arm"] == arm] for arm in ARMS},
          "gold win rate against the start per seed (x), each arm")


if __name__ == "__main__":
    main()
