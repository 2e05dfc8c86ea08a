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
