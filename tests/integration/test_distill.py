"""algorithm=distill: a teacher role scores the student's own samples token by token; with no other feedback the
student's reverse KL to the teacher, measured on its samples, falls."""
import json

import pytest

from openrlaif.config import (ActorConfig, ClusterConfig, Config, DataConfig, ModelConfig, OutputConfig, RoleResources,
                              RolloutConfig, TeacherConfig, validate)
from openrlaif.pipelines.online_rl import train


def sharpened(tiny_model: str, folder: str, factor: float) -> str:
    """The tiny model with its head's logits multiplied by `factor`: a peaked next-token distribution."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_the_student_s_reverse_kl_to_the_teacher_falls(ray_cluster, tiny_model, tmp_path):
    """Student: the tiny model with its logits ×10; teacher: ×20, as peaked again (the random model itself is nearly
    uniform over 512 tokens, where a one-sample-per-token estimate is all noise: two random models are ~0.04 nats
    apart, and measured there the KL did not move). ~1.1 nats per token apart at the start."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from openrlaif.config import register_configs
    from tests.unit.test_config import CONFIG_DIR
    import os
    register_configs()
    with initialize_config_dir(config_dir=os.path.abspath(CONFIG_DIR), version_base=None):
        cfg: Config = OmegaConf.to_object(compose(config_name="config", overrides=[
            "algorithm=distill", "feedback=none", f"teacher.model={sharpened(tiny_model, str(tmp_path / 't'), 20)}",
            f"model.path={sharpened(tiny_model, str(tmp_path / 's'), 10)}", "steps=12", "seed=1", "data.prompts_per_step=4", "rollout.samples_per_prompt=4", "rollout.engine=hf",
            "rollout.max_new_tokens=12", "actor.lr=1e-4", "actor.micro_batch_size=4",
            "actor.resources.num_workers=2", "cluster.threads_per_worker=1", f"output.dir={tmp_path / 'run'}",
            "output.save_final=false"]))
    validate(cfg)
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    kl = [row["distill/reverse_kl_per_token"] for row in rows]
    assert all(row["reward/mean"] == 0.0 for row in rows)   # no feedback: the teacher is the whole signal
    assert kl[0] > 0.5
    first, last = sum(kl[:3]) / 3, sum(kl[-3:]) / 3
    assert last < 0.8 * first, kl
