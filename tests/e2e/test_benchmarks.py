"""`make bench`'s scripts run end to end on the tiny model and write their JSON where they are told.

A smoke test, not a timing: timings live in benchmarks/results, never in tests. vs_trl.py is left out (it builds a
second venv with TRL); it shares its config, run and report code with the scripts here.
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED = os.path.join(ROOT, "benchmarks", "results")


def digest(folder: str) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))} if os.path.isdir(folder) else {}


@pytest.fixture(scope="module")
def bench(model_cache, tiny_model, tmp_path_factory):
    results = tmp_path_factory.mktemp("bench-results")
    committed = digest(COMMITTED)

    def run(script: str, *args: str) -> dict:
        env = dict(os.environ, OPENRLAIF_CACHE=model_cache, OPENRLAIF_BENCH_RESULTS=str(results))
        out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        with open(results / script.replace(".py", ".json")) as handle:
            return json.load(handle)

    yield run
    assert digest(COMMITTED) == committed, "a smoke run wrote over benchmarks/results"


def test_rollout_throughput(bench):
    report = bench("rollout_throughput.py", "--models", "tiny-random-llama", "--prompts", "4", "--n", "2",
                   "--max-new-tokens", "8", "--repeats", "2")
    assert [(row["model"], row["engine"]) for row in report["rows"]] == [("tiny-random-llama", "vllm"),
                                                                          ("tiny-random-llama", "hf")]
    for row in report["rows"]:
        assert 0 < row["generated_tokens"] <= 4 * 2 * 8 and row["tokens_per_s"] > 0
        assert row["weight_update_s"] > 0 and row["first_weight_update_s"] > 0
    assert report["settings"]["repeats"] == 2 and "torch" in report["versions"]


def test_train_step(bench):
    report = bench("train_step.py", "--only", "grpo", "dpo", "--steps", "2")
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["grpo", "dpo"]
    assert {"rollout_s", "update_s", "sync_s"} <= set(rows["grpo"]) and "rollout_s" not in rows["dpo"]
    assert all(row["step_s"] > 0 and row["update_tokens_per_s"] > 0 for row in rows.values())


def test_zero_vs_ddp(bench):
    # DDP and the two ends of ZeRO (the stages between are the same code with another stage number)
    report = bench("zero_vs_ddp.py", "--model", "tiny-random-llama", "--steps", "2", "--batch", "4",
                   "--prompt-len", "8", "--response-len", "8", "--stages", "0", "3")
    assert [row["name"].split(" ")[0] for row in report["rows"]] == ["ddp", "zero-0", "zero-3"]
    assert report["peak_gflops"] > 0 and report["step_gflop"] > 0 and report["peak_bf16_gflops"] > 0
    for row in report["rows"]:
        # against the bf16 peak: above 1 where bf16 is emulated (this CPU without AVX512 runs it slower than fp32)
        assert row["step_s"] > 0 and 0 < row["mfu"] < 1 and row["mfu_vs_bf16_peak"] > 0


def test_judge_cost(bench, tmp_path):
    prompts = tmp_path / "prompts.jsonl"   # one step's worth (the demo's 17 prompts are five label chunks)
    prompts.write_text("".join(json.dumps({"prompt": f"Name {thing}."}) + "\n"
                               for thing in ("a colour", "a tree", "a sea", "a number")))
    report = bench("judge_cost.py", "--model", "tiny-random-llama", "--samples", "2", "--max-new-tokens", "8",
                   "--prompts", str(prompts), "--rollout-engine", "hf")
    rows = {row["mode"]: row for row in report["rows"]}
    assert list(rows) == [f"{mode} (probs), {engine} judge" for mode in ("pointwise", "pairwise + swap")
                          for engine in ("HF", "vLLM")]
    for row in rows.values():
        assert row["policy_tokens"] > 0 and row["judge_requests"] > 0 and row["judge_tokens"] > row["policy_tokens"]
    for mode in ("pointwise", "pairwise + swap"):   # both engines judged the same responses
        hf, vllm = rows[f"{mode} (probs), HF judge"], rows[f"{mode} (probs), vLLM judge"]
        assert hf["policy_tokens"] == vllm["policy_tokens"] and hf["judge_requests"] == vllm["judge_requests"]
        assert hf["cached_prompt_fraction"] == 0


def test_multi_turn(bench):
    report = bench("multi_turn.py", "--model", "tiny-random-llama", "--prompts", "2", "--turns", "3",
                   "--observation-words", "8", "--max-new-tokens", "8", "--repeats", "1")
    rows = {row["setting"]: row for row in report["rows"]}
    assert list(rows) == ["vllm+prefix_cache", "vllm", "hf"]
    for row in rows.values():   # every setting played the same scripted episodes out: 3 turns, 2 observations
        assert row["episodes"] == 4 and row["turns_mean"] == 3.0 and row["env_tokens"] > 0
        assert 0 < row["policy_tokens"] <= 4 * 3 * 8 and row["policy_tokens_per_s"] > 0
    assert rows["vllm"]["vs_no_prefix_cache"] == 1.0


def test_weight_sync(bench):
    """Both paths, in buckets (the whole-model setting's memory is asserted by the GRPO loop test: 0.5 of 1.6 MiB)."""
    report = bench("weight_sync.py", "--model", "tiny", "--engine", "hf", "--buckets", "0.3")
    rows = {row["path"]: row for row in report["rows"]}
    assert set(rows) == {"object_store", "collective"}
    for row in rows.values():
        assert row["buckets"] == 4 and 0.4 < row["gathered_mib_peak"] < 0.6   # embeddings, 2 layers, the head
        assert 1.5 < row["sent_mib"] < 1.7 and row["sync_s"] > 0 and row["rank0_rss_growth_mib"] >= 0
    assert rows["object_store"]["time_vs_object_store"] == 1.0 and rows["collective"]["time_vs_object_store"] > 0

def test_async_steps(bench):
    """One setting (two steps ahead, two steps) keeps the script working; the table compares 0, 1 and 2."""
    report = bench("async_steps.py", "--model", "tiny", "--engine", "hf", "--ks", "2", "--steps", "3")
    (row,) = report["rows"]
    assert row["async_steps"] == 2 and row["staleness"] == 2.0 and row["step_s"] > 0 and row["is_weight"] > 0
