"""Real DeepSpeed ZeRO-2 and ZeRO-3 engines, world size 2, inside Ray actors on the gloo backend; one worker
asked for ZeRO-2 runs stage 0 and matches them, and refuses to load the world-size-2 state."""
import math

import pytest
import ray
import torch

from openrlaif.config import ActorConfig, AlgorithmConfig, RoleResources
from openrlaif.workers.actor import ActorWorker
from openrlaif.workers.group import WorkerGroup
from tests.integration.helpers import synthetic_batch


def train_three_steps(tiny_model, stage: int, port: int, workers: int = 2, save_to=None, load_from=None,
                      dtype: str = "float32"):
    cfg = ActorConfig(zero_stage=stage, lr=1e-3, micro_batch_size=2,
                      resources=RoleResources(num_workers=workers, num_cpus=1))
    algo = AlgorithmConfig(kl_coef=0.0)
    group = WorkerGroup(f"actor-z{stage}-w{workers}", ActorWorker, cfg.resources, lambda rank: dict(
        model_path=tiny_model, cfg=cfg, algo=algo, rank=rank, world_size=workers, master_addr="127.0.0.1",
        master_port=port, backend="gloo", dtype=dtype, step_batch_size=8, temperature=1.0, threads=1, seed=0))
    try:
        layout = ray.get(group.call(lambda w: w.layout.remote()))[0]
        load_error = None
        if load_from is not None:
            with pytest.raises(ray.exceptions.RayTaskError) as raised:
                ray.get(group.call(lambda w: w.load_state.remote(str(load_from))))
            load_error = str(raised.value)
        before = ray.get(group.call(lambda w: w.full_state_dict.remote()))[0]
        batch = synthetic_batch(8)
        # Fixed log π_old from the initial policy: the PPO surrogate then really moves as the policy trains
        # (on-policy, its value is constant: the ratio is exactly 1 at every step).
        shards = batch.split(workers)
        batch["old_logprobs"] = torch.cat(ray.get(group.map(lambda w, s: w.logprobs.remote(s), shards)))
        losses = []
        for _ in range(3):
            per_rank = ray.get(group.map(lambda w, shard: w.train_step.remote(shard), batch.split(workers)))
            losses.append(sum(r["loss"] for r in per_rank))
        after = ray.get(group.call(lambda w: w.full_state_dict.remote()))[0]
        if save_to is not None:
            ray.get(group.call(lambda w: w.save_state.remote(str(save_to))))
    finally:
        group.shutdown()
    return before, after, losses, layout, load_error


@pytest.fixture(scope="module")
def zero_runs(ray_cluster, tiny_model, tmp_path_factory):
    state = tmp_path_factory.mktemp("zero2-state")
    runs = {stage: train_three_steps(tiny_model, stage, 29510 + stage, save_to=state if stage == 2 else None)
            for stage in (2, 3)}
    runs["one worker"] = train_three_steps(tiny_model, 2, 29520, workers=1, load_from=state)
    runs["bf16"] = train_three_steps(tiny_model, 3, 29530, dtype="bfloat16")
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_and_changes_every_weight_tensor(zero_runs, stage):
    before, after, losses, layout, _ = zero_runs[stage]
    assert layout == {"zero_stage": stage, "world_size": 2}
    assert all(math.isfinite(loss) for loss in losses)
    assert before.keys() == after.keys() and len(before) > 5
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"ZeRO-{stage}: weights did not change: {unchanged}"


def test_zero2_and_zero3_agree(zero_runs):
    """Same data, seed and optimizer: the sharding strategy must not change the maths."""
    (before2, after2, losses2, *_), (_, after3, losses3, *_) = zero_runs[2], zero_runs[3]
    assert losses2 == pytest.approx(losses3, rel=1e-4, abs=1e-5)
    for name in after2:
        diff = (after2[name] - after3[name]).abs()
        moved = (after2[name] - before2[name]).abs()
        # Adam divides by sqrt(v): gradients that differ only in summation order can flip the sign of a
        # near-zero update, so a few elements differ by up to ~2·lr·steps (which bounds any two runs, so it is no
        # test). What is one: nearly every element agrees to far less than it moved.
        disagree = float((diff > 1e-6).float().mean())   # measured: at most 6e-5 of a tensor's elements
        assert float(moved.max()) > 1e-3 and float(diff.mean()) < 1e-5 and disagree < 1e-3, (name, disagree)


def test_the_step_in_bf16_keeps_the_losses_to_a_bf16_tolerance(zero_runs):
    """model.dtype=bfloat16: DeepSpeed bf16 compute with fp32 master weights, here under ZeRO-3, gives the losses
    of the float32 ZeRO-2 run to bf16's precision (8 bits of mantissa: ~0.4% per rounding), and moves every weight
    matrix as the float32 run does. (The module's weights are bf16 copies of the fp32 masters: a norm weight near 1
    moves by less than bf16's step there, 2^-8, so only the matrices, ~0.02 in size, are compared.)"""
    (before, after32, losses32, *_), (_, after16, losses16, *_) = zero_runs[2], zero_runs["bf16"]
    assert losses16 == pytest.approx(losses32, rel=3e-2, abs=3e-3)
    assert losses16 != pytest.approx(losses32, rel=1e-6, abs=1e-7)   # it really ran in bf16
    for name in [name for name in after32 if after32[name].dim() == 2]:
        moved = (after32[name] - before[name]).abs().mean()
        assert float((after16[name] - before[name]).abs().mean()) > 0.5 * float(moved), name
        assert float((after16[name] - after32[name]).abs().mean()) < 0.25 * float(moved), name


def test_loss_goes_down_on_a_fixed_batch(zero_runs):
    """With positive-advantage-weighted log-likelihood on a fixed batch, the surrogate keeps falling."""
    _, _, losses, *_ = zero_runs[2]
    assert losses[-1] < losses[0]


def test_one_worker_runs_stage_0_with_the_same_maths_and_refuses_a_zero2_state(zero_runs):
    """ZeRO has nothing to partition over one rank: the worker asked for stage 2 runs stage 0, trains to the
    weights of ZeRO-2 on two workers (same global batch and gradient), and names both layouts when asked to
    load the two-worker state."""
    _, after1, losses1, layout, load_error = zero_runs["one worker"]
    _, after2, losses2, *_ = zero_runs[2]
    assert layout == {"zero_stage": 0, "world_size": 1}
    assert losses1 == pytest.approx(losses2, rel=1e-4, abs=1e-5)
    for name in after2:
        diff = (after1[name] - after2[name]).abs()
        disagree = float((diff > 1e-6).float().mean())   # see test_zero2_and_zero3_agree
        assert float(diff.mean()) < 1e-5 and disagree < 1e-3, (name, float(diff.mean()), disagree)
    assert "ZeRO stage 2 on 2 worker(s)" in load_error and "stage 0 on 1" in load_error, load_error


@pytest.fixture(scope="module")
def dropout_model(tiny_model, tmp_path_factory):
    """The tiny Llama with attention dropout 0.5: in train mode its log-probs change from forward to forward."""
    import json
    import shutil
    folder = tmp_path_factory.mktemp("dropout-model") / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.5}))
    return str(folder)


def train_and_report(model_path, cfg: ActorConfig, port: int, steps: int = 3):
    """Three PPO-clip steps on a batch whose first two samples are masked (rank 0's first micro-batch holds no
    valid token), against log π_old from the actor's own log-prob pass. Returns weights before and after, and per
    step the loss, ratio mean and clip fraction as the driver computes them."""
    workers = cfg.resources.num_workers
    group = WorkerGroup(f"actor-{cfg.zero_stage}-{workers}-{cfg.offload}-{cfg.keep_dropout}", ActorWorker,
                        cfg.resources, lambda rank: dict(
                            model_path=model_path, cfg=cfg, algo=AlgorithmConfig(kl_coef=0.0), rank=rank,
                            world_size=workers, master_addr="127.0.0.1", master_port=port, backend="gloo",
                            dtype="float32", step_batch_size=8, temperature=1.0, threads=1, seed=0))
    try:
        before = ray.get(group.call(lambda w: w.full_state_dict.remote()))[0]
        batch = synthetic_batch(8)
        batch["sample_mask"] = torch.tensor([0.0, 0.0, 1, 1, 1, 1, 1, 1])
        batch["old_logprobs"] = torch.cat(ray.get(group.map(lambda w, s: w.logprobs.remote(s), batch.split(workers))))
        steps_out = []
        for _ in range(steps):
            per_rank = ray.get(group.map(lambda w, shard: w.train_step.remote(shard), batch.split(workers)))
            total = {key: sum(r[key] for r in per_rank) for key in per_rank[0]}
            steps_out.append({"loss": total["loss"], "ratio": total["ratio_x_tokens"] / total["valid_tokens"],
                              "clip": total["clip_fraction_x_tokens"] / total["valid_tokens"],
                              "valid_tokens": total["valid_tokens"]})
        after = ray.get(group.call(lambda w: w.full_state_dict.remote()))[0]
    finally:
        group.shutdown()
    return before, after, steps_out


@pytest.mark.parametrize("stage,workers", [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_offload_really_trains_every_weight(ray_cluster, dropout_model, stage, workers):
    """actor.offload=true starts (DeepSpeed refused a client optimizer under ZeRO-Offload) and trains: one worker
    keeps its ZeRO stage, whose gradient all-reduce is what flushes the last bucket. Dropout is off, so the first
    step's ratio against the log-prob pass is exactly 1; the ratio and clip fraction are means over valid tokens."""
    cfg = ActorConfig(zero_stage=stage, offload=True, lr=1e-3, micro_batch_size=2,
                      resources=RoleResources(num_workers=workers, num_cpus=1))
    before, after, steps = train_and_report(dropout_model, cfg, 29530 + 2 * stage + workers)
    assert all(math.isfinite(s["loss"]) for s in steps) and steps[-1]["loss"] < steps[0]["loss"]
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"ZeRO-{stage} offload, {workers} worker(s): weights did not move: {unchanged}"
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and steps[0]["clip"] == 0.0
    assert steps[0]["valid_tokens"] == float(synthetic_batch(8)["response_mask"][2:].sum())


def test_keep_dropout_is_what_breaks_the_on_policy_ratio(ray_cluster, dropout_model):
    cfg = ActorConfig(zero_stage=0, lr=1e-3, micro_batch_size=2, keep_dropout=True,
                      resources=RoleResources(num_workers=1, num_cpus=1))
    _, _, steps = train_and_report(dropout_model, cfg, 29545, steps=1)
    assert abs(steps[0]["ratio"] - 1.0) > 1e-3


def test_a_non_finite_loss_stops_before_the_update_and_nan_weights_are_never_saved(ray_cluster, tiny_model,
                                                                                     tmp_path):
    """kl_coef=inf (refused at start-up from the CLI; here straight to the workers): every rank refuses the step
    before its backward, so the weights are untouched; weights made NaN are refused by the checkpoint writers."""
    from openrlaif.workers.engine import NonFiniteUpdate
    cfg = ActorConfig(zero_stage=2, lr=1e-3, micro_batch_size=2, resources=RoleResources(num_workers=2, num_cpus=1))
    group = WorkerGroup("actor-nonfinite", ActorWorker, cfg.resources, lambda rank: dict(
        model_path=tiny_model, cfg=cfg, algo=AlgorithmConfig(kl_coef=float("inf")), rank=rank, world_size=2,
        master_addr="127.0.0.1", master_port=29571, backend="gloo", dtype="float32", step_batch_size=8,
        temperature=1.0, threads=1, seed=0))
    try:
        before = ray.get(group.call(lambda w: w.full_state_dict.remote()))[0]
        batch = synthetic_batch(8)
        batch["ref_logprobs"] = torch.full_like(batch["response_mask"], -30.0)
        with pytest.raises(ray.exceptions.RayTaskError) as raised:
            ray.get(group.map(lambda w, shard: w.train_step.remote(shard), batch.split(2)))
        assert isinstance(raised.value.cause, NonFiniteUpdate) and "update was not applied" in str(raised.value.cause)
        after = ray.get(group.call(lambda w: w.full_state_dict.remote()))[0]
        assert all(torch.equal(before[name], after[name]) for name in before)
        ray.get(group.call(lambda w: w.save_state.remote(str(tmp_path / "ok"))))   # finite weights save
        ray.get(group.workers[1].__ray_call__.remote(poison_one_weight))
        with pytest.raises(ray.exceptions.RayTaskError, match="weights are not finite"):
            ray.get(group.call(lambda w: w.save_hf.remote(str(tmp_path / "hf"), tiny_model)))
        assert not (tmp_path / "hf").exists()
    finally:
        group.shutdown()


def poison_one_weight(worker) -> None:
    """Run inside a worker (Ray's __ray_call__): one element of this rank's weight partition becomes NaN."""
    param = next(iter(worker.engine.module.parameters()))
    with torch.no_grad():
        getattr(param, "ds_tensor", param).data.view(-1)[0] = float("nan")
