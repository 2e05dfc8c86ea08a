"""Study 7: the policy learns to use a tool from a rule reward alone (issue 18: "the calculator task learning on a
rule reward"), in the agentic RL setting of verl's and OpenRLHF's tool-use examples.

SmolLM2-135M-Instruct, env=tool_use with the calculator, feedback=env: 1 when the final turn's last number is the
exact answer, else 0, nothing for using the tool or for the format. The arithmetic (two- and three-digit products,
sums of products) is beyond the model itself: alone it answers almost none. Each prompt row carries one worked
example exchange (user, `<calculator>12 * 7</calculator>`, the tool's "84", "84") before its question, the
in-context cold start a 135M model needs: without it the model never calls the tool (0 of 32 episodes here) and
GRPO has no signal. GRPO on 64 generated training problems; measured greedily on 16 other problems (exact-answer
rate = eval/train_reward, and the share of episodes calling the tool) before the first step, every `--every` steps
and at the end. The claim: the held-out exact-answer rate rises.
    python studies/tool_learning.py            # ~40 min on 2 cores
    python studies/tool_learning.py --quick    # tiny-model smoke
"""
import json
import os
import random
import time

from common import arguments, mean_sd, run_arm, table, write

NAME = "tool_learning"
EXAMPLE = [{"role": "user", "content": "What is 12 * 7? Use a tool, then give the number."},
           {"role": "assistant", "content": "<calculator>12 * 7</calculator>"},
           {"role": "tool", "content": "84"},
           {"role": "assistant", "content": "84"}]


def problems(count: int, seed: int) -> list[dict]:
    """Arithmetic a 135M model cannot do in its head: a*b, a*b + c, (a + b) * c with two- and three-digit numbers."""
    rng, rows = random.Random(seed), []
    while len(rows) < count:
        a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(2, 9)
        expression = rng.choice([f"{a} * {b}", f"{a} * {b} + {c}", f"({a} + {b}) * {c}", f"{a * 10 + c} * {b}"])
        rows.append({"messages": EXAMPLE + [{"role": "user", "content": f"What is {expression}? Use a tool, then "
                                                                        "give the number."}],
                     "answer": eval(expression)})   # noqa: S307 - our own arithmetic strings
    return rows


def write_rows(path: str, rows: list[dict]) -> str:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def tool_call_share(out_dir: str, step: int) -> float:
    """The share of the held-out episodes at `step` whose trajectory called the calculator."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "eval_samples.jsonl"))]
    rows = [r for r in rows if r["step"] == step]
    return sum("<calculator>" in r["response"] for r in rows) / max(len(rows), 1)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], steps=18, seeds="0")
    start = time.perf_counter()
    data = os.path.join(args.out, "runs", f"{NAME}-data")
    os.makedirs(data, exist_ok=True)
    train = write_rows(os.path.join(data, "train.jsonl"), problems(64, seed=1))
    held_out = write_rows(os.path.join(data, "eval.jsonl"), problems(16, seed=2))
    every = 2 if args.quick else 6
    setting = ["env=tool_use", "feedback=env", f"data.prompts={train}", "env.max_turns=3",
               "env.max_total_tokens=96", f"eval.prompts={held_out}", f"eval.every={every}", "algorithm=grpo",
               "data.max_prompt_tokens=384"]
    if not args.quick:
        setting += ["rollout.max_new_tokens=24", "data.prompts_per_step=6", "rollout.samples_per_prompt=8",
                    "rollout.temperature=0.8", "actor.lr=3e-5"]
    mine = {item.split("=")[0] for item in setting}
    base = [item for item in args.base if item.split("=")[0] not in mine and not item.startswith("eval.feedback")]
    runs = []
    for seed in args.seed_list:
        out_dir = os.path.join(args.out, "runs", f"{NAME}-s{seed}")
        result = run_arm(base + setting + [f"seed={seed}", f"steps={args.steps}"], out_dir)
        curve = [(r["step"], r["eval/train_reward"]) for r in result["rows"] if "eval/train_reward" in r]
        calls = [(step, tool_call_share(out_dir, step)) for step, _ in curve]
        trained = [r for r in result["rows"] if r["step"] > 0]
        runs.append({"seed": seed, "exact_start": curve[0][1], "exact_end": curve[-1][1],
                     "exact_gain": curve[-1][1] - curve[0][1], "curve": curve, "tool_call_share": calls,
                     "train_reward": [(r["step"], r["reward/mean"]) for r in trained],
                     "tool_calls_per_step": [(r["step"], r.get("env/tool_calls", 0.0)) for r in trained],
                     "step_s": sum(r["time/step_s"] for r in trained) / max(len(trained), 1),
                     "seconds": result["seconds"]})
    gain, gain_sd = mean_sd([r["exact_gain"] for r in runs])
    rows = [[r["seed"], r["exact_start"], r["exact_end"], r["tool_call_share"][0][1], r["tool_call_share"][-1][1],
             r["train_reward"][0][1], r["train_reward"][-1][1], r["step_s"]] for r in runs]
    verdict = {"exact_rate_rises": bool(gain > 0), "exact_gain_mean": gain, "exact_gain_sd": gain_sd}
    seconds = time.perf_counter() - start
    print(table(["seed", "exact@0", f"exact@{args.steps}", "calls@0", f"calls@{args.steps}", "train r@1",
                 f"train r@{args.steps}", "s/step"], rows))
    print(f"held-out exact-answer rate gain {gain:+.3f} (sd {gain_sd:.3f}); {seconds / 60:.1f} min")
    write(NAME, args.out, {"study": NAME, "quick": args.quick, "steps": args.steps, "seeds": args.seed_list,
                           "runs": runs, "verdict": verdict, "seconds": seconds},
          {"exact answer (held-out)": runs[0]["curve"], "tool-call share (held-out)": runs[0]["tool_call_share"]},
          "calculator task: held-out exact-answer rate and tool-call share vs step (GRPO, rule reward)")


if __name__ == "__main__":
    main()
