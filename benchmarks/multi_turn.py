"""Multi-turn rollout throughput: episodes (env.*) on our vLLM engine with prefix caching on vs off, and on the HF
engine, on the same prompts, turns and observations.

Every turn after the first is sampled from the whole episode so far (prompt, earlier turns, the environment's
observations), so without prefix caching each turn re-reads that growing context; with it the cached blocks are
reused. The environment is scripted (a fixed `--observation-words`-word tool result after every turn, `--turns`
turns), so both settings sample the same kind of episodes. Each setting runs in a fresh process; reports policy
tokens/s over whole episodes (median of `--repeats` after one warm-up) and the ratio to prefix caching off. Prints a
table and writes multi_turn.json under benchmarks/results/ (or $OPENRLAIF_BENCH_RESULTS).

    .venv/bin/python benchmarks/multi_turn.py                                  # SmolLM2-135M
    .venv/bin/python benchmarks/multi_turn.py --model tiny-random-llama --prompts 2 --turns 2 --repeats 1
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

OBSERVATION_WORDS = 24


class Scripted:
    """A tool that answers every turn with the same long result, for `turns` turns."""

    def __init__(self, turns: int = 4, words: int = OBSERVATION_WORDS) -> None:
        self.turns, self.seen = turns, 0
        self.result = " ".join(f"value{i}={i * 7 % 100}" for i in range(words))

    def reset(self, row: dict) -> list[dict]:
        return list(row["messages"])

    def step(self, messages: list[dict], assistant_turn: str):
        from openrlaif.envs import EnvStep
        self.seen += 1
        if self.seen == self.turns:
            return EnvStep(None, 0.0)
        return EnvStep([{"role": "tool", "content": self.result}])


def measure(model: str, setting: str, prompts: int, n: int, turns: int, words: int, max_new_tokens: int,
            repeats: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from openrlaif.config import Config, EnvConfig, ModelConfig, RolloutConfig, cache_dir
    from openrlaif.data import load_prompts
    from openrlaif.envs import env_factory
    from openrlaif.models import resolve_model_path
    from openrlaif.rollout.multi_turn import run_episodes
    from openrlaif.rollout.types import SamplingSpec

    path = resolve_model_path(model, cache_dir(ModelConfig()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    from transformers import AutoConfig
    positions = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 2048)
    budget = min(turns * (max_new_tokens + 8 * words + 32), positions - 512)   # room for the turns and observations
    cfg = Config(rollout=RolloutConfig(max_new_tokens=max_new_tokens, samples_per_prompt=n),
                 env=EnvConfig(name="multi_turn:Scripted", max_turns=turns, max_total_tokens=budget,
                               kwargs={"turns": turns, "words": words}))
    rows = load_prompts("demo", tokenizer, 512, env=env_factory(cfg.env))[:prompts]
    if setting == "hf":
        from openrlaif.rollout.hf_engine import HFEngine
        engine = HFEngine(path)
    else:
        from openrlaif.rollout.vllm_engine import VLLMEngine
        engine = VLLMEngine(path, max_model_len=512 + budget, kv_cache_gib=1.0,
                            enable_prefix_caching=setting == "vllm+prefix_cache")

    def sample(contexts, spec):
        return sorted(engine.generate(contexts, spec), key=lambda c: c.prompt_index)

    def episodes(seed: int):
        first = engine.generate([p.token_ids for p in rows], SamplingSpec(n=n, max_new_tokens=max_new_tokens, seed=seed))
        return run_episodes(sample, rows, first, cfg, tokenizer, seed)

    episodes(0)                                           # warm-up (kernels per shape)
    rates, batch = [], None
    for repeat in range(repeats):
        start = time.perf_counter()
        batch = episodes(repeat + 1)
        seconds = time.perf_counter() - start
        rates.append(float(batch["response_mask"].sum()) / seconds)
    policy = float(batch["response_mask"].sum())
    return {"model": model, "setting": setting, "episodes": len(batch), "turns_mean": sum(batch.meta["env_turns"]) / len(batch),
            "policy_tokens": policy, "env_tokens": float(batch["attention_mask"][:, -batch["response_mask"].shape[1]:].sum()) - policy,
            "policy_tokens_per_s": statistics.median(rates), "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--settings", nargs="+", default=["vllm+prefix_cache", "vllm", "hf"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--observation-words", type=int, default=OBSERVATION_WORDS)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", metavar="SETTING", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = [args.prompts, args.n, args.turns, args.observation_words, args.max_new_tokens, args.repeats]
    if args.worker:
        print("RESULT " + json.dumps(measure(args.model, args.worker, *common)))
        return
    rows = []
    for setting in args.settings:
        row = fresh_process([__file__, "--worker", setting, "--model", args.model, "--prompts", str(args.prompts),
                             "--n", str(args.n), "--turns", str(args.turns), "--observation-words",
                             str(args.observation_words), "--max-new-tokens", str(args.max_new_tokens), "--repeats",
                             str(args.repeats)], setting)
        if row is not None:
            rows.append(row)
    off = next((row["policy_tokens_per_s"] for row in rows if row["setting"] == "vllm"), None)
    for row in rows:
        if off:
            row["vs_no_prefix_cache"] = row["policy_tokens_per_s"] / off
    print()
    print_table(rows, [("setting", "setting", "s"), ("policy_tokens_per_s", "policy tok/s", ".1f"),
                       ("vs_no_prefix_cache", "vs no cache", ".2f"), ("episodes", "episodes", "d"),
                       ("turns_mean", "turns", ".2f"), ("policy_tokens", "policy tok", ".0f"),
                       ("env_tokens", "env tok", ".0f")])
    write_report("multi_turn", {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows})


if __name__ == "__main__":
    main()
