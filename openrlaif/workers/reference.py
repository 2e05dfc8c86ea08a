"""The reference role: the frozen starting policy, inference only (iterative DPO refreshes it to the policy)."""
from __future__ import annotations

import os
import time

import torch

from openrlaif.batch import Batch
from openrlaif.workers.common import batched_response_logprobs, load_causal_lm, setup_process
from openrlaif.workers.remote import remote


@remote
class ReferenceWorker:
    def __init__(self, model_path: str, *, dtype: str, micro_batch_size: int, temperature: float, threads: int,
                 seed: int, trust_remote_code: bool = False) -> None:
        setup_process(threads, seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_path, dtype, trust_remote_code).to(device).eval()
        self.device, self.micro_batch_size, self.temperature = device, micro_batch_size, temperature

    def ready(self) -> bool:
        return True

    def logprobs(self, batch: Batch) -> torch.Tensor:
        return batched_response_logprobs(self.model, batch, self.micro_batch_size, self.device, self.temperature)

    def update_weights(self, weights) -> float:
        """Take the policy's weights in place (reference.update_every: iterative DPO's refreshed reference)."""
        from openrlaif.workers.weights import named_tensors
        start = time.perf_counter()
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors(weights):
                state[name].copy_(tensor.to(state[name].device, state[name].dtype))
        return time.perf_counter() - start

    def save_state(self, path: str) -> None:
        """Its weights into a resumable checkpoint (every worker holds the same: each writes, the last rename wins)."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        staging = os.path.join(path, f"model.safetensors.{os.getpid()}")
        state = {name: t.detach().to("cpu").contiguous() for name, t in self.model.state_dict().items()}
        save_file(dict(_untied(state)), staging)
        os.replace(staging, os.path.join(path, "model.safetensors"))

    def load_state(self, path: str) -> None:
        from safetensors.torch import load_file
        self.update_weights(load_file(os.path.join(path, "model.safetensors")))


def _untied(state: dict[str, torch.Tensor]):
    """safetensors refuses tensors that share memory (a tied LM head): save each shared one once more, copied."""
    seen = set()
    for name, tensor in state.items():
        key = tensor.data_ptr()
        yield name, tensor.clone() if key in seen else tensor
        seen.add(key)
