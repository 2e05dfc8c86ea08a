"""Completions -> Batch. Pure: unit-tested without any engine."""
from __future__ import annotations

import torch

from openrlaif.batch import Batch, prompt_response_layout
from openrlaif.rollout.types import Completion


def completions_to_batch(prompt_ids: list[list[int]], prompt_texts: list[str], completions: list[Completion],
                         responses: list[str], pad_id: int) -> Batch:
    """Left-pad prompts to P, right-pad responses to R; group_ids = index of the prompt answered."""
    layout = prompt_response_layout([prompt_ids[c.prompt_index] for c in completions],
                                    [c.token_ids for c in completions], pad_id)
    rollout_logprobs = torch.zeros_like(layout["response_mask"])
    for row, completion in enumerate(completions):
        rollout_logprobs[row, :len(completion.logprobs)] = torch.tensor(completion.logprobs)
    return Batch(
        {**layout, "rollout_logprobs": rollout_logprobs,
         "group_ids": torch.tensor([c.prompt_index for c in completions], dtype=torch.long),
         "finished": torch.tensor([c.finished for c in completions], dtype=torch.bool)},
        {"prompt": [prompt_texts[c.prompt_index] for c in completions], "response": list(responses)})
