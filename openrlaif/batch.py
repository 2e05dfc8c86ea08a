"""The one container that crosses role boundaries: named tensors with a shared first dim, plus per-sample lists.

Fields used by the online loop (B samples, P prompt positions, R response positions):
    input_ids        (B, P+R) long   prompt left-padded to P, response right-padded to R
    attention_mask   (B, P+R) long   1 on real tokens
    response_mask    (B, R)   float  1 on real response tokens
    sample_mask      (B,)     float  0 where the sample takes no part in the loss (e.g. judge failure)
    group_ids        (B,)     long   which prompt a sample answers (GRPO groups)
    rollout_logprobs (B, R)   float  log π of each sampled token as the rollout engine saw it
    ref_logprobs     (B, R)   float  log π_ref
    old_logprobs     (B, R)   float  log π_old as the trainer computes it
    rewards          (B,)     float
    advantages       (B,)     float
Lists in `meta` (length B): prompt, response text, ...
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def split_evenly(total: int, parts: int) -> list[slice]:
    """Contiguous near-equal slices of range(total) over at most `parts` workers (none empty when total > 0)."""
    parts = max(1, min(parts, total))
    bounds = [round(i * total / parts) for i in range(parts + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token rows left-padded to a common width (every row ends at the last column): input_ids, attention_mask."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row):] = 1
    return input_ids, attention_mask


def prompt_response_layout(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                           prompt_width: int | None = None, response_width: int | None = None) -> dict[str, Tensor]:
    """[left-padded prompt | right-padded response] rows: input_ids, attention_mask (B, P+R), response_mask (B, R).
    Widths default to the longest prompt and response (at least 1 response column)."""
    prompt_width = prompt_width or max(len(p) for p in prompts)
    response_width = response_width or max(max(len(r) for r in responses), 1)
    input_ids = torch.full((len(prompts), prompt_width + response_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((len(prompts), response_width), dtype=torch.float32)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, prompt_width - len(prompt):prompt_width] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, prompt_width:prompt_width + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[row, prompt_width - len(prompt):prompt_width + len(response)] = 1
        response_mask[row, :len(response)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


@dataclass
class Batch:
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.tensors.items()} | {k: len(v) for k, v in self.meta.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Batch fields disagree on the number of samples: {sizes}")

    def __len__(self) -> int:
        for value in self.tensors.values():
            return value.shape[0]
        for value in self.meta.values():
            return len(value)
        return 0

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __setitem__(self, name: str, value: Tensor) -> None:
        if len(self) and value.shape[0] != len(self):
            raise ValueError(f"field {name!r} has {value.shape[0]} rows, the batch has {len(self)}")
        self.tensors[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.meta

    def select(self, indices: Tensor | list[int]) -> Batch:
        index = torch.as_tensor(indices, dtype=torch.long)
        return Batch({k: v[index] for k, v in self.tensors.items()},
                     {k: [v[i] for i in index.tolist()] for k, v in self.meta.items()})

    def split(self, num_chunks: int) -> list[Batch]:
        """Contiguous, near-equal chunks (the first len % n chunks get one extra sample)."""
        if num_chunks < 1 or num_chunks > max(len(self), 1):
            raise ValueError(f"cannot split a batch of {len(self)} samples into {num_chunks} chunks")
        return [self.select(list(range(span.start, span.stop))) for span in split_evenly(len(self), num_chunks)]

    def chunks_of(self, size: int) -> list[Batch]:
        return [self.select(list(range(lo, min(lo + size, len(self))))) for lo in range(0, len(self), size)]

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        batches = [b for b in batches if b is not None]
        tensor_keys, meta_keys = batches[0].tensors.keys(), batches[0].meta.keys()
        return Batch({k: torch.cat([b.tensors[k] for b in batches]) for k in tensor_keys},
                     {k: [x for b in batches for x in b.meta[k]] for k in meta_keys})

    def to(self, device: str | torch.device) -> Batch:
        return Batch({k: v.to(device) for k, v in self.tensors.items()}, dict(self.meta))


def concat_rollouts(batches: list[Batch], pad_id: int) -> Batch:
    """Batch.concat for rollout batches of different widths: each is re-padded to the widest prompt P (on the
    left) and response R (on the right). (B, P+R) fields are split where the prompt ends; (B, R) fields are
    padded with 0 on the right; (B,) fields and meta lists are joined as they are."""
    prompt_width = max(b["input_ids"].shape[1] - b["response_mask"].shape[1] for b in batches)
    response_width = max(b["response_mask"].shape[1] for b in batches)
    padded = []
    for batch in batches:
        r = batch["response_mask"].shape[1]
        p = batch["input_ids"].shape[1] - r
        tensors = {}
        for name, value in batch.tensors.items():
            fill = pad_id if name == "input_ids" else 0
            if value.dim() == 2 and value.shape[1] == p + r:
                left = torch.full((len(batch), prompt_width - p), fill, dtype=value.dtype)
                right = torch.full((len(batch), response_width - r), fill, dtype=value.dtype)
                value = torch.cat([left, value[:, :p], value[:, p:], right], dim=1)
            elif value.dim() == 2 and value.shape[1] == r:
                value = torch.cat([value, torch.full((len(batch), response_width - r), fill, dtype=value.dtype)], 1)
            tensors[name] = value
        padded.append(Batch(tensors, batch.meta))
    return Batch.concat(padded)
