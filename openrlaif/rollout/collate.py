"""Completions -> Batch. Pure: unit-tested without any engine."""
from __future__ import annotations

import torch

from openrlaif.batch import Batch
from openrlaif.rollout.types import Completion


def completions_to_batch(prompt_ids: list[list[int]], prompt_texts: list[str], completions: list[Completion],
                         responses: list[str], pad_id: int) -> Batch:
    """Left-pad prompts to P, right-pad responses to R; group_ids = index of the prompt answered."""
    prompt_width = max(len(prompt_ids[c.prompt_index]) for c in completions)
    response_width = max(max(len(c.token_ids) for c in completions), 1)
    size = len(completions)
    input_ids = torch.full((size, prompt_width + response_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((size, response_width), dtype=torch.float32)
    rollout_logprobs = torch.zeros((size, response_width), dtype=torch.float32)
    for row, completion in enumerate(completions):
        prompt = prompt_ids[completion.prompt_index]
        n = len(completion.token_ids)
        input_ids[row, prompt_width - len(prompt):prompt_width] = torch.tensor(prompt)
        attention_mask[row, prompt_width - len(prompt):prompt_width + n] = 1
        if n:
            input_ids[row, prompt_width:prompt_width + n] = torch.tensor(completion.token_ids)
            rollout_logprobs[row, :n] = torch.tensor(completion.logprobs)
        response_mask[row, :n] = 1.0
    return Batch(
        {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
         "rollout_logprobs": rollout_logprobs,
         "group_ids": torch.tensor([c.prompt_index for c in completions], dtype=torch.long),
         "finished": torch.tensor([c.finished for c in completions], dtype=torch.bool)},
        {"prompt": [prompt_texts[c.prompt_index] for c in completions], "response": list(responses)})
