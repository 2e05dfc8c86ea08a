"""Each study's --quick smoke (the tiny model, 2 steps, 1 seed), all in one process through studies/smoke.py: it
runs from the command line and writes the JSON fields and the PNG its README row is built from. The claims are not
checked here (studies/results/ holds the committed full runs)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = {"position_swap": {"arms", "summary", "welch_t", "reproduced", "seconds"},
          "remax_ppo_grpo": {"arms", "summary", "verdict", "welch_t_gain_remax_vs_ppo", "seconds"},
          "overoptimisation": {"runs", "proxy_gain_mean", "gold_gain_mean", "proxy_outgrew_gold", "seconds"},
          "robust_dpo": {"runs", "summary", "training_pairs", "held_out_pairs", "start_gold_reward", "seconds"},
          "repeat_ranking": {"runs", "labels", "summary", "held_out_pairs", "seconds"},
          "rlaif_variants": {"runs", "summary", "welch_t_direct_vs_canonical", "welch_t_sft_vs_direct", "seconds"},
          "tool_learning": {"runs", "verdict", "seconds"}}


def test_every_study_runs_quick_and_writes_its_results(tmp_path, model_cache, tiny_model):
    env = dict(os.environ, OPENRLAIF_CACHE=model_cache)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "studies", "smoke.py"), "--out", str(tmp_path)],
                         cwd=os.path.join(ROOT, "studies"), capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for name, fields in FIELDS.items():
        report = json.load(open(tmp_path / f"{name}.json"))
        assert fields <= report.keys() and report["quick"] is True and report["steps"] == 2, name
        assert os.path.getsize(tmp_path / f"{name}.png") > 1000
        arms = report.get("arms") or {"runs": report["runs"]}
        for items in arms.values():
            for item in items:
                assert item["seconds"] > 0 and {"curve", "points", "held_out_accuracy", "gold_win_rate"} & item.keys()
    remax = json.load(open(tmp_path / "remax_ppo_grpo.json"))
    assert set(remax["summary"]["ppo"]["peak_gib_by_role"]) >= {"actor", "critic", "reference", "rollout"}
    noisy = json.load(open(tmp_path / "robust_dpo.json"))
    for item in noisy["runs"]:   # exactly round(ε·N) labels flipped; both gold measures present
        assert item["flipped"] == round(item["eps"] * item["pairs"]) and 0 <= item["gold_win_rate"] <= 1
        assert 0 <= item["held_out_accuracy"] <= 1
    ranking = json.load(open(tmp_path / "repeat_ranking.json"))
    assert {entry["subset"] for entry in ranking["labels"]} == {"all", "top50"}
    assert all(item["nested"] for item in ranking["runs"])   # the top half is a subset of all, same rankings
    top, every = ([e["pairs"] for e in ranking["labels"] if e["subset"] == name] for name in ("top50", "all"))
    assert top[0] < every[0]
    tools = json.load(open(tmp_path / "tool_learning.json"))["runs"][0]
    assert [step for step, _ in tools["curve"]] == [0, 2] and len(tools["tool_call_share"]) == 2   # held-out evals
    variants = json.load(open(tmp_path / "rlaif_variants.json"))
    assert {item["arm"] for item in variants["runs"]} == {"d_rlaif", "canonical", "best_of_n_sft"}
    tokens = [item["judge_tokens"] for item in variants["runs"]]
    assert min(tokens) > 0 and max(tokens) < 1.1 * min(tokens)   # the same judge budget in every arm
