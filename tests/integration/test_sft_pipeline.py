"""pipeline=sft through the real driver (DeepSpeed, 2 workers): packing changes the layout, not the loss."""
import json

import pytest

from openrlaif.config import (ActorConfig, ClusterConfig, Config, DataConfig, ModelConfig, OutputConfig,
                              RoleResources, validate)
from openrlaif.pipelines import run


def sft_losses(tiny_model, out_dir, pack_length):
    cfg = Config(pipeline="sft", steps=3, seed=0, model=ModelConfig(path=tiny_model),
                 data=DataConfig(sft="demo", prompts_per_step=8, shuffle=False, pack_length=pack_length),
                 actor=ActorConfig(zero_stage=2, lr=1e-3, micro_batch_size=4, resources=RoleResources(num_workers=2)),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(out_dir), save_final=False))
    validate(cfg)
    run(cfg)
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return [r["train/loss"] for r in rows], [r["train/padding_fraction"] for r in rows]


def test_sft_learns_and_packing_is_loss_invariant(ray_cluster, tiny_model, tmp_path):
    plain, plain_padding = sft_losses(tiny_model, tmp_path / "plain", 0)
    packed, packed_padding = sft_losses(tiny_model, tmp_path / "packed", 256)
    assert plain[-1] < plain[0]
    assert packed == pytest.approx(plain, rel=1e-4)      # same examples, same maths, fewer padded slots
    assert packed_padding[0] < plain_padding[0]
