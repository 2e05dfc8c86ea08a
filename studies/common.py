"""What every study shares: configs composed exactly as the CLI composes them, one run per arm and seed, the
simulated labeller, the peak memory of each role, and the table + JSON + PNG every study writes.

Each study script: `python studies/<name>.py [--quick] [--out DIR] [--seeds 0,1,2]`. `--quick` is a tiny-model
smoke (the e2e tests run it: its JSON fields are checked, its claim is not)."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = os.path.join(ROOT, "studies", "results")
GOLD = "openrlaif.feedback.gold:concise"

# The shared set-up of the SmolLM2 studies (the demo's): GRPO-family runs on the shipped prompts, measured greedily
# on the 12 held-out prompts by the gold rule before the first step, every 4 steps and at the end.
FULL = ["model=smollm2", "output.save_final=false", "actor.lr=1e-5", "rollout.max_new_tokens=32",
        "eval.prompts=demo", "eval.every=4", "eval.feedback.source=function", f"eval.feedback.function={GOLD}"]
# --quick: the tiny random model on HF engines, two steps, a few prompts.
QUICK = ["model=tiny", "output.save_final=false", "rollout.engine=hf", "rollout.max_new_tokens=6",
         "data.prompts_per_step=2", "rollout.samples_per_prompt=2", "actor.lr=1e-3", "eval.prompts=demo",
         "eval.every=0", "eval.feedback.source=function", f"eval.feedback.function={GOLD}",
         "cluster.threads_per_worker=1"]


def arguments(description: str, steps: int, seeds: str = "0,1,2"):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a tiny-model smoke: 2 steps, 1 seed")
    parser.add_argument("--out", default=RESULTS, help="where <name>.json and <name>.png go")
    parser.add_argument("--seeds", default=seeds)
    parser.add_argument("--steps", type=int, default=steps)
    args = parser.parse_args()
    args.seed_list = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    args.steps = 2 if args.quick else args.steps
    args.base = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    return args


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from openrlaif.config import check_known_keys, register_configs, validate
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
        node = hydra_compose(config_name="config", overrides=overrides)
    check_known_keys(node)
    cfg = OmegaConf.to_object(node)
    validate(cfg)
    return cfg


class PeakMemory:
    """The peak resident memory (VmHWM) of each role's worker processes while a run lasts, read from /proc (one
    machine: the local cluster). Ray titles a worker process after its class (and, in a call, the actor's name)."""
    ROLES = {"ActorWorker": "actor", "ReferenceWorker": "reference", "RolloutWorker": "rollout",
             "CriticWorker": "critic", "JudgeWorker": "judge", "RewardModelWorker": "reward_model"}

    # ray::ActorWorker while idle, ray::openrlaif-actor-0:ActorWorker.train_step (the actor's name first) in a call
    TITLE = re.compile(r"ray::(?:[^\s:]+:)?(\w+)")

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s, self.peak, self.stop = every_s, {}, threading.Event()

    def poll(self) -> None:
        import psutil
        try:   # walking the tree raises when a process in it exits meanwhile: that poll is skipped, not the rest
            children = psutil.Process().children(recursive=True)   # this cluster's workers, no one else's
        except psutil.Error:
            return
        for proc in children:
            try:
                match = self.TITLE.match(" ".join(proc.cmdline() or []))
                role = self.ROLES.get(match.group(1)) if match else None
                if role is None:
                    continue
                with open(f"/proc/{proc.pid}/status") as handle:
                    hwm = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM"))
                self.peak[role] = max(self.peak.get(role, 0.0), hwm / 2 ** 20)   # kB -> GiB
            except (OSError, StopIteration, psutil.Error):
                continue

    def __enter__(self) -> "PeakMemory":
        def loop():
            while not self.stop.wait(self.every_s):
                self.poll()
        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def run_arm(overrides: list[str], out_dir: str) -> dict:
    """One run of any pipeline; its metrics rows, wall time, each role's peak memory (GiB) and what the pipeline
    returned (checkpoint, metrics, out_dir)."""
    import ray

    from openrlaif.pipelines import run
    from openrlaif.runtime import init_local_ray
    cfg = compose(overrides + [f"output.dir={out_dir}", "output.overwrite=true"])
    if not ray.is_initialized():   # one local cluster for all the arms (each run frees its placement groups)
        init_local_ray(num_cpus=6)
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = run(cfg)
    seconds = time.perf_counter() - start
    metrics = os.path.join(out_dir, "metrics.jsonl")   # pipeline=eval writes eval.json instead
    rows = [json.loads(line) for line in open(metrics)] if os.path.exists(metrics) else []
    return {"rows": rows, "seconds": seconds, "peak_gib": memory.peak, "result": result}


def gold_curve(rows: list[dict], name: str = "gold") -> list[tuple[int, float]]:
    return [(r["step"], r[f"eval/{name}_reward"]) for r in rows if r.get(f"eval/{name}_reward") is not None]


@contextlib.contextmanager
def labeller(**noise):
    from openrlaif.labeller import Labeller, LabellerServer, NoiseModel
    server = LabellerServer(Labeller(noise=NoiseModel(**noise))).start()
    try:
        yield server
    finally:
        server.stop()


def mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def welch_t(a: list[float], b: list[float]) -> float:
    """(mean a − mean b) / its standard error; inf-safe for one seed each (returns nan)."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b)) if len(a) > 1 and len(b) > 1 else float("nan")
    return (ma - mb) / se if se and math.isfinite(se) and se > 0 else float("nan")


def mean_curves(runs: dict[str, list[dict]], key: str = "curve") -> dict[str, list[tuple[int, float]]]:
    """Per arm, the mean over its seeds of each run's (step, value) curve: one line per arm in the PNG."""
    out = {}
    for arm, items in runs.items():
        steps = sorted({step for item in items for step, _ in item[key]})
        out[arm] = [(step, sum(v for item in items for s, v in item[key] if s == step)
                     / sum(1 for item in items for s, _ in item[key] if s == step)) for step in steps]
    return out


def table(columns: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    widths = [max(len(c), *(len(cell(r[i])) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(v).rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def write(name: str, out: str, payload: dict, curves: dict[str, list[tuple[int, float]]], title: str) -> str:
    """<out>/<name>.json and <out>/<name>.png (the curves on one panel, one colour each)."""
    from openrlaif.plot import render
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
    if curves:
        render(curves, ["+".join(curves)], os.path.join(out, f"{name}.png"), title)
    print(f"[study] {path}")
    return path


# ------------------------------------------------------------------ the offline studies (2 and 4): data and measures

TRAIN_PROMPTS = os.path.join(ROOT, "studies", "data", "prompts.jsonl")      # 48 prompts
EVAL_PROMPTS = os.path.join(ROOT, "studies", "data", "eval_prompts.jsonl")  # 24 others: the demo's 12 held-out + 12


def start_model(quick: bool) -> str:
    return "tiny-random-llama" if quick else "smollm2-135m-instruct"


def offline_model(quick: bool) -> list[str]:
    """The model overrides every run of an offline study starts from (--quick: the tiny model on HF engines)."""
    return ["model=tiny", "rollout.max_new_tokens=6", "cluster.threads_per_worker=1", "rollout.engine=hf"] if quick \
        else ["model=smollm2", "rollout.max_new_tokens=32"]


QUICK_PAIR = {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "Hello there, how are you today, my friend"}


def held_out_pairs(model: list[str], out_dir: str, keep: int = 48, quick: bool = False) -> tuple[str | None, int]:
    """Gold-labelled held-out pairs (eval.pairs): the starting model's 4 answers to each held-out prompt, every pair
    whose gold scores differ by more than 0.05 (pipeline=label with the gold rule as its feedback), at most `keep`
    of them drawn at random (seed 0); `quick` (the tiny model's answers often tie) falls back on one fixed pair.
    Returns (path or None when there are none, count)."""
    import random
    result = run_arm(model + ["pipeline=label", f"data.prompts={EVAL_PROMPTS}", "rollout.samples_per_prompt=4",
                              "label.pairs=all", "label.min_gap=0.05", "data.prompts_per_step=8", "feedback=function",
                              f"feedback.function={GOLD}", "seed=1"], out_dir)
    rows = [json.loads(line) for line in open(result["result"]["metrics"]["pairs_path"])]
    rows = random.Random(0).sample(rows, keep) if len(rows) > keep else rows or ([QUICK_PAIR] if quick else [])
    path = os.path.join(out_dir, "held_out.jsonl")
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return (path if rows else None), len(rows)


def greedy_answers(model: list[str], path: str, out_dir: str, remove: bool = False) -> list[dict]:
    """A model's greedy answers to the held-out prompts (`openrlaif eval` on the HF engine), each with its gold
    score; `remove` deletes the model folder afterwards (a trained checkpoint, ~0.5 GB)."""
    import shutil
    result = run_arm(model + ["pipeline=eval", f"model.path={path}", "rollout.engine=hf", f"eval.prompts={EVAL_PROMPTS}",
                              "eval.feedback.source=function", f"eval.feedback.function={GOLD}"], out_dir)
    rows = [json.loads(line) for line in open(os.path.join(result["result"]["out_dir"], "eval_samples.jsonl"))]
    for row in rows:   # the measured reward openrlaif eval wrote beside each answer (eval.name=gold)
        row["gold"] = row["gold_reward"]
    if remove:
        shutil.rmtree(path)
    return rows


def gold_win_rate(policy: list[dict], start: list[dict]) -> dict:
    """Per held-out prompt, the policy's answer against the starting model's by the gold score (ties 1/2), with
    the Wilson 95% interval (openrlaif eval's win_rate)."""
    from openrlaif.pipelines.evaluation import win_rate
    if [r["prompt"] for r in policy] != [r["prompt"] for r in start]:
        raise ValueError("the two sets of answers are not to the same prompts in the same order")
    return win_rate([1.0 if a["gold"] > b["gold"] else 0.0 if a["gold"] < b["gold"] else 0.5
                     for a, b in zip(policy, start)])
