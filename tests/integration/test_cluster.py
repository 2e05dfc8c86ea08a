"""The local Ray cluster: on loopback, and left as it was when a role fails to start."""
import time

import ray


def test_local_cluster_is_on_loopback(ray_cluster):
    addresses = {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
    assert addresses == {"127.0.0.1"}


def test_a_role_that_fails_to_start_is_named_and_the_started_roles_are_freed(ray_cluster, tiny_model, tmp_path):
    """The judge's folder has a config but unreadable weights: the actor, rollout and reference groups were already
    started when the judge fails. The error names the judge; every group and placement group is gone afterwards."""
    import os
    import shutil

    import pytest

    from openrlaif.checkpointing import RunError
    from openrlaif.config import (ActorConfig, ClusterConfig, Config, DataConfig, FeedbackConfig, JudgeConfig,
                                  ModelConfig, OutputConfig, RolloutConfig, validate)
    from openrlaif.roles import prepare_run, start_roles

    broken = tmp_path / "broken-judge"
    shutil.copytree(tiny_model, broken)
    for name in os.listdir(broken):
        if name.endswith(".safetensors"):
            (broken / name).write_bytes(b"not a safetensors file")
    cfg = Config(model=ModelConfig(path=tiny_model), data=DataConfig(prompts="demo", prompts_per_step=2),
                 rollout=RolloutConfig(engine="hf", samples_per_prompt=2, max_new_tokens=4),
                 actor=ActorConfig(micro_batch_size=2),
                 feedback=FeedbackConfig(source="judge", judge=JudgeConfig(model=str(broken))),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(tmp_path / "run")))
    validate(cfg)
    run = prepare_run(cfg)
    assert set(run.plan) == {"actor", "rollout", "reference", "judge"}
    cpus_before = ray.available_resources().get("CPU", 0)
    with pytest.raises(RunError, match=r"(?s)role 'judge' \(worker 0\) failed to start: .*SafetensorError.*Fix:"):
        start_roles(cfg, run)
    for role in run.plan:
        with pytest.raises(ValueError):       # killed: its name no longer resolves
            ray.get_actor(f"openrlaif-{role}-0")
    deadline = time.monotonic() + 30         # the placement groups' CPUs come back once Ray has removed them
    while ray.available_resources().get("CPU", 0) < cpus_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == cpus_before


def test_grpo_across_a_multi_node_cluster_equals_one_node(tmp_path, tiny_model, model_cache):
    """A head and three worker nodes on this machine (Ray's own test cluster: a raylet each, on loopback), two
    labelled pool=train and one pool=rollout: the actor's two workers go one per train node (STRICT_SPREAD), so its
    DeepSpeed group spans two nodes; the reference goes to a train node and the engine to the rollout node. Two GRPO
    steps there give the same losses, rewards, KL and gradient norms (to 1e-5) as the same run on one node. The
    rollout node, removed at step 2, is named by the run's error as down, with the role and rank it held; resumed
    on the two nodes that remain, the run ends with the same 3 steps as the uninterrupted one-node run."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OPENRLAIF_CACHE=model_cache, PYTHONPATH=root)
    results = {}
    for mode in ("multi", "one"):
        out = subprocess.run([sys.executable, os.path.join(root, "tests", "integration", "multinode.py"), tiny_model,
                              str(tmp_path / mode)] + (["--one-node"] if mode == "one" else []),
                             capture_output=True, text=True, timeout=600, env=env, cwd=root)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        assert out.returncode == 0 and lines, out.stderr[-3000:]
        results[mode] = json.loads(lines[-1][len("RESULT "):])
    multi, one = results["multi"], results["one"]
    assert multi["nodes"] == 4 and multi["addresses"] == ["127.0.0.1"]
    placed = multi["placed"]
    assert [p.split("@")[0] for p in placed["actor"]] == ["train", "train"] and len(set(placed["actor"])) == 2
    assert placed["reference"][0].startswith("train@") and placed["rollout"][0].startswith("rollout@")
    assert one["nodes"] == 1 and len(set(one["placed"]["actor"])) == 1
    # the rollout node removed at step 2: the run stops naming the role, the rank and the node, and that it is down
    rollout_node = placed["rollout"][0].split("@")[1]
    assert f"role 'rollout' (worker 0 of 1, on node 127.0.0.1 {rollout_node}, which is down) died" in multi["error"]
    assert "during the rollout phase of step 2" in multi["error"] and "resume=true" in multi["error"]
    assert [row["step"] for row in multi["rows"]] == [1, 2, 3]   # step 1 as run, steps 2-3 after the resume
    for a, b in zip(multi["rows"], one["rows"], strict=True):
        assert a["step"] == b["step"]
        for key in ("train/loss", "reward/mean", "train/kl", "train/grad_norm", "reward/std"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    assert multi["rows"][-1]["train/grad_norm"] > 0 and multi["rows"][0]["reward/std"] > 0
