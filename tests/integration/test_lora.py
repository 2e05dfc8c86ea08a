"""actor.lora: only the adapters train (ZeRO-3, two ranks), the reference is the base model with the adapters off,
and the policy reaches vLLM as adapters alone or as merged weights, sampling the same tokens either way."""
import os
import types

import pytest
import ray
import torch

from openrlaif.config import (ActorConfig, AlgorithmConfig, Config, LoraSettings, ModelConfig, RoleResources,
                              RolloutConfig, validate)
from openrlaif.rollout.types import SamplingSpec
from openrlaif.rollout.weight_sync import sync_weights
from openrlaif.workers.actor import ActorWorker
from openrlaif.workers.group import WorkerGroup
from openrlaif.workers.rollout import RolloutWorker
from tests.integration.helpers import synthetic_batch

LORA = LoraSettings(rank=8, alpha=16.0)


def raw_parameters(worker) -> dict | None:
    """Every parameter of the trainer's module as it is named there (adapters apart), whole (collective)."""
    out = {}
    for name, param in worker.engine.module.named_parameters():
        with worker.gathered([param]):
            out[name] = param.data.detach().clone()
    return out if worker.rank == 0 else None


def test_only_adapters_train_and_reach_vllm_alone_or_merged_alike(ray_cluster, tiny_model):
    from openrlaif.roles import rendezvous_port
    cfg = ActorConfig(zero_stage=3, lr=1e-2, micro_batch_size=2, lora=LORA,
                      resources=RoleResources(num_workers=2, num_cpus=1))
    port = rendezvous_port()
    actor = WorkerGroup("lora-actor", ActorWorker, cfg.resources, lambda rank: dict(
        model_path=tiny_model, cfg=cfg, algo=AlgorithmConfig(kl_coef=0.0), rank=rank, world_size=2,
        master_addr="127.0.0.1", master_port=port, backend="gloo", dtype="float32", step_batch_size=8,
        temperature=1.0, threads=1, seed=0))
    rollout_cfg = RolloutConfig(kv_cache_gib=0.05, resources=RoleResources(num_workers=1))
    engines = {sync: WorkerGroup(f"lora-rollout-{sync}", RolloutWorker, rollout_cfg.resources, lambda rank, sync=sync: dict(
        model_path=tiny_model, cfg=rollout_cfg, max_model_len=64, threads=1, seed=0,
        lora_rank=LORA.rank if sync == "adapter" else 0)) for sync in ("adapter", "merged")}
    spec = SamplingSpec(n=2, max_new_tokens=8, seed=7)
    prompts = [[1, 5, 6, 7], [1, 9, 3]]

    def samples(sync: str) -> list:
        completions = ray.get(engines[sync].call(lambda w: w.generate.remote(prompts, spec)))[0]
        return [(c.token_ids, c.logprobs) for c in completions]

    try:
        batch = synthetic_batch(8)
        shards = batch.split(2)
        start_logprobs = torch.cat(ray.get(actor.map(lambda w, s: w.logprobs.remote(s), shards)))
        before = ray.get(actor.call(lambda w: w.__ray_call__.remote(raw_parameters)))[0]
        initial = samples("adapter")
        assert initial == samples("merged")   # the same starting model
        batch["old_logprobs"] = start_logprobs
        for _ in range(2):
            ray.get(actor.map(lambda w, shard: w.train_step.remote(shard), batch.split(2)))
        after = ray.get(actor.call(lambda w: w.__ray_call__.remote(raw_parameters)))[0]
        reference = torch.cat(ray.get(actor.map(lambda w, s: w.reference_logprobs.remote(s), shards)))
        policy = torch.cat(ray.get(actor.map(lambda w, s: w.logprobs.remote(s), shards)))
        metrics = {}
        for sync in ("adapter", "merged"):
            run_cfg = Config(model=ModelConfig(path=tiny_model), actor=ActorConfig(lora=LoraSettings(
                rank=8, sync=sync)), rollout=RolloutConfig(engine="vllm", sync_bucket_mb=0))
            validate(run_cfg)
            roles = types.SimpleNamespace(actor=actor, rollout=engines[sync], judge=None, judge_client=None,
                                          sync_plan=None, sync_group_size=0)
            metrics[sync] = sync_weights(roles, run_cfg, step=1)
        synced = {sync: samples(sync) for sync in engines}
    finally:
        for group in [actor, *engines.values()]:
            group.shutdown()

    adapters = {name for name in before if ".lora_" in name}
    assert len(adapters) == 4 * 7   # A and B of the 7 linear layers of each of the 2 decoder layers
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == adapters, f"frozen weights moved: {sorted(changed - adapters)}"
    # the reference is the starting policy (adapters off), the policy has moved away from it
    assert torch.allclose(reference, start_logprobs, atol=1e-5)
    assert float((policy - start_logprobs).abs().max()) > 1e-2
    # the engines: adapters alone and merged weights sample the same tokens with the same log-probs
    assert metrics["adapter"]["sync/adapter"] == 1.0 and "sync/adapter" not in metrics["merged"]
    assert metrics["adapter"]["sync/mib"] < 0.1 * metrics["merged"]["sync/mib"]
    (adapter_tokens, adapter_lps), (merged_tokens, merged_lps) = zip(*synced["adapter"]), zip(*synced["merged"])
    assert list(adapter_tokens) == list(merged_tokens)
    difference = max(abs(a - b) for lps_a, lps_b in zip(adapter_lps, merged_lps) for a, b in zip(lps_a, lps_b))
    assert difference < 1e-4
    assert synced["adapter"] != initial   # the adapter is what the engine now samples with


def test_grpo_with_lora_saves_adapters_and_resumes_them(ray_cluster, tiny_model, tmp_path):
    """GRPO through the driver with LoRA: no reference role (the actor's base model gives log π_ref), the engines
    take adapters, the final checkpoint is a peft adapter folder (and, asked for, a merged HF folder that equals
    base + adapter), and a run resumed from step 2's checkpoint (adapters and optimizer) repeats step 3 exactly."""
    import json
    import shutil

    from openrlaif.config import ClusterConfig, DataConfig, FeedbackConfig, OutputConfig
    from openrlaif.pipelines.online_rl import train
    from openrlaif.roles import needs_reference

    def config(out_dir, resume=False) -> Config:
        cfg = Config(steps=3, seed=1, resume=resume, model=ModelConfig(path=tiny_model),
                     data=DataConfig(prompts="demo", prompts_per_step=4),
                     rollout=RolloutConfig(engine="vllm", samples_per_prompt=4, max_new_tokens=12, kv_cache_gib=0.05),
                     actor=ActorConfig(zero_stage=2, lr=1e-2, micro_batch_size=4,
                                       lora=LoraSettings(rank=8, alpha=16.0, save_merged=True),
                                       resources=RoleResources(num_workers=2, num_cpus=1)),
                     algorithm=AlgorithmConfig(kl_coef=0.05),
                     feedback=FeedbackConfig(source="function", function="openrlaif.feedback.rules:brevity",
                                             function_kwargs={"target_words": 2}),
                     cluster=ClusterConfig(threads_per_worker=1),
                     output=OutputConfig(dir=str(out_dir), checkpoint_every=2))
        validate(cfg)
        return cfg

    cfg = config(tmp_path / "run")
    assert not needs_reference(cfg)   # one model copy less
    result = train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [row["sync/adapter"] for row in rows] == [1.0, 1.0, 1.0]
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-7)   # the policy starts as the base model
    assert rows[2]["train/kl"] > 1e-5                             # and has moved from it by step 3
    assert all(row["rollout/logprob_mismatch_max"] < 1e-3 for row in rows)   # the engine samples the trainer's policy

    adapter, merged = result["checkpoint"], str(tmp_path / "run" / "checkpoint-merged")
    assert os.path.exists(os.path.join(adapter, "adapter_config.json"))
    assert not os.path.exists(os.path.join(adapter, "model.safetensors"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from openrlaif.workers.common import response_logprobs
    batch = synthetic_batch(4)
    with torch.no_grad():
        via_peft = response_logprobs(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                                               adapter), batch)
        via_merged = response_logprobs(AutoModelForCausalLM.from_pretrained(merged), batch)
        base = response_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model), batch)
        # the adapter folder passed where a model is expected (model.path, openrlaif eval) is merged once
        from openrlaif.models import resolve_model_path
        resolved = resolve_model_path(adapter, str(tmp_path / "cache"))
        assert resolved == resolve_model_path(adapter, str(tmp_path / "cache"))
        via_resolved = response_logprobs(AutoModelForCausalLM.from_pretrained(resolved), batch)
    assert float((via_peft - via_merged).abs().max()) < 1e-4 < float((via_merged - base).abs().max())
    assert float((via_resolved - via_merged).abs().max()) < 1e-5

    resumed = tmp_path / "resumed"   # the run as it was after step 2's checkpoint
    shutil.copytree(tmp_path / "run", resumed)
    for folder in ("checkpoint", "checkpoint-merged", "checkpoints/step_000003"):
        shutil.rmtree(resumed / folder, ignore_errors=True)
    train(config(resumed, resume=True))
    again = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [row["step"] for row in again] == [1, 2, 3]
    for key in ("train/loss", "train/kl", "reward/mean", "train/grad_norm"):
        assert again[2][key] == pytest.approx(rows[2][key], rel=1e-4, abs=1e-6), key
