"""HF `generate` engine: the fallback when vLLM is not installed, and a reference for the vLLM engine."""
from __future__ import annotations

import torch

from openrlaif.batch import left_pad
from openrlaif.rollout.types import Completion, SamplingSpec


class HFEngine:
    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 batch_size: int = 64) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                          trust_remote_code=trust_remote_code).eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # a GPU of the rollout role's
        self.model.to(self.device)
        self.eos_ids = set(_as_list(self.model.generation_config.eos_token_id) or [self.tokenizer.eos_token_id])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        if spec.seed is not None:
            torch.manual_seed(spec.seed)
        jobs = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(spec.n)]
        completions = []
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            completions += self._generate_chunk(chunk, spec)
        return completions

    def _generate_chunk(self, jobs: list[tuple[int, list[int]]], spec: SamplingSpec) -> list[Completion]:
        input_ids, attention_mask = (t.to(self.device) for t in left_pad([ids for _, ids in jobs], self.pad_id))
        width = input_ids.shape[1]
        greedy = spec.temperature == 0
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=spec.max_new_tokens,
            do_sample=not greedy, temperature=None if greedy else spec.temperature,
            top_p=None if greedy else spec.top_p, top_k=None, pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids), output_logits=True, return_dict_in_generate=True)
        new_tokens = out.sequences[:, width:]
        # Raw logits (before temperature), to match vLLM's default raw_logprobs.
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        token_logprobs = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        completions = []
        for row, (prompt_index, _) in enumerate(jobs):
            tokens = new_tokens[row].tolist()
            length = next((k + 1 for k, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
            completions.append(Completion(prompt_index, tokens[:length], token_logprobs[row, :length].tolist(),
                                          finished=tokens[length - 1] in self.eos_ids))
        return completions

    @torch.no_grad()
    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        state = self.model.state_dict()
        for name, tensor in named_tensors:
            state[name].copy_(tensor.to(state[name].device, state[name].dtype))


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
