"""Synthetic batches for the tiny model, shaped like what the rollout produces."""
import torch

from openrlaif.batch import Batch


def synthetic_batch(size: int = 8, prompt_len: int = 6, response_len: int = 10, vocab: int = 500,
                    seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (size, prompt_len + response_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.ones(size, response_len)
    for row in range(size):              # ragged lengths: some left padding and some short responses
        attention_mask[row, :row % 3] = 0
        cut = response_len - row % 4
        response_mask[row, cut:] = 0
        attention_mask[row, prompt_len + cut:] = 0
    advantages = torch.randn(size, generator=generator)
    return Batch({"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
                  "sample_mask": torch.ones(size), "advantages": advantages})
