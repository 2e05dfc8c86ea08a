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
          "overoptimisation": {"runs", "proxy_gain_mean", "gold_gain_mean", "proxy_outgrew_gold", "seconds"}}


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
                assert item["seconds"] > 0 and ("curve" in item or "points" in item)
    remax = json.load(open(tmp_path / "remax_ppo_grpo.json"))
    assert set(remax["summary"]["ppo"]["peak_gib_by_role"]) >= {"actor", "critic", "reference", "rollout"}
