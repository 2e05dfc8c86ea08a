"""The rollout role: one generation engine (vLLM or HF) per Ray worker."""
from __future__ import annotations

import time


from openrlaif.config import RolloutConfig
from openrlaif.rollout.collective import WeightReceiver
from openrlaif.rollout.types import Completion, SamplingSpec
from openrlaif.workers.common import setup_process
from openrlaif.workers.weights import Weights, named_tensors
from openrlaif.workers.remote import remote


@remote
class RolloutWorker(WeightReceiver):
    def __init__(self, model_path: str, cfg: RolloutConfig, *, max_model_len: int, threads: int, seed: int,
                 trust_remote_code: bool = False, lora_rank: int = 0) -> None:
        setup_process(threads, seed)
        if cfg.engine == "vllm":
            from openrlaif.rollout.vllm_engine import VLLMEngine
            self.engine = VLLMEngine(model_path, dtype=cfg.dtype, max_model_len=max_model_len, seed=seed,
                                     kv_cache_gib=cfg.kv_cache_gib, gpu_memory_utilization=cfg.gpu_memory_utilization,
                                     enforce_eager=cfg.enforce_eager, trust_remote_code=trust_remote_code,
                                     tensor_parallel_size=cfg.tensor_parallel_size,
                                     sleep_level=cfg.sleep_between_steps, lora_rank=lora_rank)
        else:
            from openrlaif.rollout.hf_engine import HFEngine
            self.engine = HFEngine(model_path, dtype=cfg.dtype, trust_remote_code=trust_remote_code)
        self.dtype = cfg.dtype

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        """Before the actor is killed: stop the engine's own processes (tensor parallelism), if it has any."""
        getattr(self.engine, "close", lambda: None)()

    def sleep(self) -> bool:
        """rollout.sleep_between_steps: free the engine's GPU memory until wake_up (vLLM sleep mode)."""
        self.engine.sleep()
        return True

    def wake_up(self) -> bool:
        self.engine.wake_up()
        return True

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        return self.engine.generate(prompt_ids, spec)

    def update_adapter(self, adapter: tuple) -> float:
        """Load the policy's LoRA adapters (packed weights, adapter_config) as its new version; the seconds it took."""
        start = time.perf_counter()
        weights, config = adapter
        self.engine.load_adapter(named_tensors(weights), config)
        return time.perf_counter() - start

    def update_weights(self, weights: Weights) -> float:
        """Load new weights in place (no restart); returns the seconds it took."""
        start = time.perf_counter()
        self.engine.update_weights(named_tensors(weights))
        return time.perf_counter() - start
