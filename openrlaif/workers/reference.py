"""The reference role: the frozen starting policy, inference only."""
from __future__ import annotations

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
