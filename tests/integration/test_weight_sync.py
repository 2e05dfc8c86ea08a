"""rollout.weight_sync: the object store and a collective group of their own (gloo) put the same weights into
two vLLM engines, from a ZeRO-2 and a ZeRO-3 trainer of two ranks each, a bucket of whole layers at a time."""
import types

import ray
import torch

from openrlaif.config import (ActorConfig, AlgorithmConfig, Config, ModelConfig, RoleResources, RolloutConfig,
                              validate)
from openrlaif.rollout.types import SamplingSpec
from openrlaif.rollout.weight_sync import sync_weights
from openrlaif.workers.actor import ActorWorker
from openrlaif.workers.group import WorkerGroup
from openrlaif.workers.rollout import RolloutWorker


def perturbed_copy(tiny_model: str, path, seed: int) -> str:
    """The tiny model with every weight moved by a little noise: a trainer whose weights the engines lack."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


def start_actor(model_path: str, stage: int) -> WorkerGroup:
    cfg = ActorConfig(zero_stage=stage, micro_batch_size=2, resources=RoleResources(num_workers=2, num_cpus=1))
    from openrlaif.roles import free_port
    port = free_port()
    return WorkerGroup(f"sync-actor-z{stage}", ActorWorker, cfg.resources, lambda rank: dict(
        model_path=model_path, cfg=cfg, algo=AlgorithmConfig(), rank=rank, world_size=2, master_addr="127.0.0.1",
        master_port=port, backend="gloo", dtype="float32", step_batch_size=4, temperature=1.0, threads=1, seed=0))


def test_object_store_and_collective_sync_load_the_same_weights(ray_cluster, tiny_model, tmp_path):
    rollout_cfg = RolloutConfig(kv_cache_gib=0.05, sync_bucket_mb=0.3, resources=RoleResources(num_workers=2))
    rollout = WorkerGroup("sync-rollout", RolloutWorker, rollout_cfg.resources, lambda rank: dict(
        model_path=tiny_model, cfg=rollout_cfg, max_model_len=64, threads=1, seed=0))
    actors = {stage: start_actor(perturbed_copy(tiny_model, tmp_path / f"z{stage}", seed=stage), stage)
              for stage in (2, 3)}
    roles = {stage: types.SimpleNamespace(actor=group, rollout=rollout, judge=None, judge_client=None,
                                          sync_plan=None, sync_group_size=0) for stage, group in actors.items()}
    spec = SamplingSpec(n=2, max_new_tokens=8, seed=7)

    def samples():   # both engines, same seed: the same tokens and log-probs when they hold the same weights
        per_engine = ray.get(rollout.call(lambda w: w.generate.remote([[1, 5, 6, 7], [1, 9, 3]], spec)))
        return [[(c.token_ids, c.logprobs) for c in completions] for completions in per_engine]

    def sync(stage: int, path: str) -> tuple[list, dict]:
        cfg = Config(model=ModelConfig(path=tiny_model), rollout=RolloutConfig(
            engine="vllm", sync_bucket_mb=0.3, weight_sync=path))
        validate(cfg)
        metrics = sync_weights(roles[stage], cfg, step=1)
        # the collective path formed its group: trainer rank 0 and the two engines
        assert path != "collective" or roles[stage].sync_group_size == 3
        return samples(), metrics

    try:
        initial = samples()
        # each sync changes the engines' weights (the trainers alternate), so a sync that loads nothing fails
        runs = {("collective", 2): sync(2, "collective"), ("object_store", 3): sync(3, "object_store"),
                ("object_store", 2): sync(2, "object_store"), ("collective", 3): sync(3, "collective")}
    finally:
        for group in [rollout, *actors.values()]:
            group.shutdown()

    def logprobs(outputs):
        return torch.tensor([lp for engine in outputs for _, lps in engine for lp in lps])

    for (path, stage), (outputs, metrics) in runs.items():
        assert outputs[0] == outputs[1], f"{path} from ZeRO-{stage}: the two engines disagree"
        # the tiny model's 1.6 MiB in 4 buckets (embeddings, layer 0, layer 1, norm + head): rank 0 held one
        assert metrics["sync/buckets"] == 4 and 0.4 < metrics["sync/gathered_mib_peak"] < 0.6
        assert 1.5 < metrics["sync/mib"] < 1.7 and metrics["sync/collective"] == (path == "collective")
    for stage in (2, 3):
        collective, store = runs[("collective", stage)][0], runs[("object_store", stage)][0]
        assert [[t for t, _ in e] for e in collective] == [[t for t, _ in e] for e in store]
        torch.testing.assert_close(logprobs(collective), logprobs(store), atol=1e-6, rtol=0)
        assert logprobs(collective).shape != logprobs(initial).shape or \
            not torch.allclose(logprobs(collective), logprobs(initial), atol=1e-3)
    assert runs[("collective", 2)][0] != runs[("collective", 3)][0]

