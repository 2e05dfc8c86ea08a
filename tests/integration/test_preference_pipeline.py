"""pipeline=preference through the real driver: reference role, DeepSpeed actor (2 workers), each loss family."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from openrlaif.config import (ActorConfig, AlgorithmConfig, ClusterConfig, Config, DataConfig, EvalConfig,
                              ModelConfig, OutputConfig, RoleResources, validate)
from openrlaif.pipelines import run

PAIRS = [{"prompt": f"question {i}", "chosen": "the sun is a star", "rejected": "blue blue cat dog"}
         for i in range(8)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    return str(path)


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory):
    """The same preference under prompts the actor never trains on (eval.pairs)."""
    path = tmp_path_factory.mktemp("held_out") / "held_out.jsonl"
    path.write_text("".join(json.dumps(dict(row, prompt=f"other thing {i}")) + "\n" for i, row in enumerate(PAIRS[:5])))
    return str(path)


@pytest.mark.parametrize("loss,beta,smoothing,stage", [("dpo", 0.1, 0.0, 2), ("robust_dpo", 0.1, 0.1, 3),
                                                       ("ipo", 0.1, 0.0, 2), ("simpo", 2.0, 0.0, 2),
                                                       ("orpo", 0.1, 0.0, 2)])
def test_loss_falls_on_a_fixed_set_of_pairs(ray_cluster, tiny_model, pairs_file, held_out_file, tmp_path, loss, beta,
                                            smoothing, stage):
    cfg = Config(pipeline="preference", steps=4, seed=0, model=ModelConfig(path=tiny_model),
                 eval=EvalConfig(pairs=held_out_file, every=2),
                 data=DataConfig(pairs=pairs_file, prompts_per_step=8, shuffle=False),
                 actor=ActorConfig(zero_stage=stage, lr=1e-3, micro_batch_size=2,
                                   resources=RoleResources(num_workers=2)),
                 algorithm=AlgorithmConfig(loss=loss, beta=beta, label_smoothing=smoothing),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(tmp_path)))
    validate(cfg)
    result = run(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    # eval.pairs: the loss's implicit reward on the held-out pairs before the first step, at step 2 and at the end
    held_out = [row for row in rows if "eval/reward_accuracy" in row]
    assert [row["step"] for row in held_out] == [0, 2, 4] and held_out[0]["eval/pairs"] == 5
    assert held_out[-1]["eval/reward_margin"] > held_out[0]["eval/reward_margin"]
    assert held_out[-1]["eval/reward_accuracy"] == 1.0
    if loss in ("dpo", "robust_dpo", "ipo"):   # policy == reference at step 0: every implicit reward is ~0, a tie
        assert abs(held_out[0]["eval/reward_margin"]) < 1e-4 and held_out[0]["eval/reward_accuracy"] == 0.5
    rows = [row for row in rows if row["step"] >= 1]
    losses = [row["train/loss"] for row in rows]
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < losses[0], losses
    assert rows[-1]["train/reward_margin"] > rows[0]["train/reward_margin"]
    if loss == "dpo":   # policy == reference at step 1: margin 0, loss ln 2 exactly
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
        assert rows[-1]["train/reward_accuracy"] == 1.0
    trained = load_file(os.path.join(result["checkpoint"], "model.safetensors"))
    initial = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert any(not torch.equal(initial[name], trained[name]) for name in initial)


RANKED = [{"prompt": f"question {i}", "responses": ["the sun is a star", "the sun is hot", "blue blue cat dog"],
           "scores": [2, 1, 0]} for i in range(8)]


@pytest.mark.parametrize("loss,stage", [("kto", 2), ("bco", 3), ("lipo", 2)])
def test_unpaired_and_listwise_losses_fall_on_a_fixed_set(ray_cluster, tiny_model, pairs_file, tmp_path, loss, stage):
    if loss == "lipo":
        data_file = tmp_path / "ranked.jsonl"
        data_file.write_text("".join(json.dumps(row) + "\n" for row in RANKED))
        data_file, per_step = str(data_file), 8
    else:
        data_file, per_step = pairs_file, 16   # 8 pairs -> 8 desirable and 8 undesirable samples
    cfg = Config(pipeline="preference", steps=4, seed=0, model=ModelConfig(path=tiny_model),
                 data=DataConfig(pairs=data_file, prompts_per_step=per_step, shuffle=False),
                 actor=ActorConfig(zero_stage=stage, lr=1e-3, micro_batch_size=2,
                                   resources=RoleResources(num_workers=2)),
                 algorithm=AlgorithmConfig(loss=loss, beta=0.1),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(tmp_path / "run")))
    validate(cfg)
    run(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [row["train/loss"] for row in rows]
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < losses[0], losses
    if loss == "kto":   # policy == reference at step 1: every implicit reward and z0 are 0, loss = 1 − σ(0)
        assert losses[0] == pytest.approx(0.5, abs=1e-5)
    if loss == "bco":   # δ starts at the first batch's mean reward (0): −log σ(0)
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    if loss == "lipo":
        assert rows[-1]["train/ranking_accuracy"] > rows[0]["train/ranking_accuracy"]
    else:
        assert rows[-1]["train/reward_margin"] > rows[0]["train/reward_margin"]
