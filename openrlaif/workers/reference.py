"""The reference role: the frozen starting policy, inference only."""
from __future__ import annotations

import ray
import torch

from openrlaif.batch import Batch
from openrlaif.workers.common import load_causal_lm, response_logprobs, setup_process, trim_to_content


@ray.remote
class ReferenceWorker:
    def __init__(self, model_path: str, *, dtype: str, micro_batch_size: int, temperature: float, threads: int,
                 seed: int, trust_remote_code: bool = False) -> None:
        setup_process(threads, seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_path, dtype, trust_remote_code).to(device).eval()
        self.device, self.micro_batch_size, self.temperature = device, micro_batch_size, temperature

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> torch.Tensor:
        out = torch.zeros_like(batch["response_mask"])
        for start in range(0, len(batch), self.micro_batch_size):
            index = list(range(start, min(start + self.micro_batch_size, len(batch))))
            micro = trim_to_content(batch.select(index)).to(self.device)
            values = response_logprobs(self.model, micro, self.temperature).float().cpu()
            out[start:start + len(index), :values.shape[1]] = values
        return out
