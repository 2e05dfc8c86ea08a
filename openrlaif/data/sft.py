"""SFT data: jsonl rows of {"prompt", "response"} or {"messages": [...]} (the last message is the assistant's
answer, the earlier ones the prompt). The loss is on answer tokens only; short samples can be packed."""
from __future__ import annotations

import os

import torch

from openrlaif.batch import Batch
from openrlaif.config import ConfigError
from openrlaif.data.jsonl import check_prompt_length
from openrlaif.data.rows import read_rows
from openrlaif.data.pairs import encode_response, split_conversation

DEMO_SFT = os.path.join(os.path.dirname(__file__), "demo_sft.jsonl")


def load_sft(path: str, tokenizer, max_prompt_tokens: int, max_response_tokens: int,
             columns: dict | None = None) -> Batch:
    """A Batch of examples with per-sample token lists in meta: prompt_ids, response_ids."""
    path = DEMO_SFT if path == "demo" else path
    prompts, responses = [], []
    for where, row in read_rows(path, "data.sft", '{"prompt", "response"} or {"messages": [...]}', columns):
        if isinstance(row, dict) and "messages" in row:
            prompt_messages, response = split_conversation(row["messages"], where, "messages")
        elif isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip()
                                           for k in ("prompt", "response")):
            prompt_messages, response = [{"role": "user", "content": row["prompt"]}], row["response"]
        else:
            raise ConfigError(f"{where}: each row needs non-empty \"prompt\" and \"response\" strings, or a "
                              "\"messages\" list ending with the assistant's answer.")
        prompt_ids, response_ids = encode_response(tokenizer, prompt_messages, response)
        check_prompt_length(where, len(prompt_ids), max_prompt_tokens)
        prompts.append(prompt_ids)
        responses.append(response_ids[:max_response_tokens])
    if not prompts:
        raise ConfigError(f"data.sft={path!r} holds no examples. Fix: add {{\"prompt\", \"response\"}} rows.")
    return Batch({}, {"prompt_ids": prompts, "response_ids": responses})


def pack_examples(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                  pack_length: int = 0) -> dict[str, torch.Tensor]:
    """Lay examples out in rows for one forward pass, shape (rows, width):

    input_ids, position_ids (restart at 0 for every example), segment_ids (1, 2, ... per example in a row,
    0 on padding) and loss_mask (1 where the *next* token is an answer token, aligned with logits[:, t]).
    pack_length = 0: one example per row. pack_length > 0: first-fit, several examples per row up to
    pack_length tokens (an example longer than that gets a row of its own).
    """
    sequences = [p + r for p, r in zip(prompt_ids, response_ids)]
    rows: list[list[int]] = []                       # indices of the examples in each row
    if pack_length > 0:
        lengths = []
        for index, sequence in enumerate(sequences):
            slot = next((k for k, used in enumerate(lengths) if used + len(sequence) <= pack_length), None)
            if slot is None:
                rows.append([index])
                lengths.append(len(sequence))
            else:
                rows[slot].append(index)
                lengths[slot] += len(sequence)
    else:
        rows = [[index] for index in range(len(sequences))]
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    out = {"input_ids": torch.full(shape, pad_id, dtype=torch.long), "position_ids": torch.zeros(shape, dtype=torch.long),
           "segment_ids": torch.zeros(shape, dtype=torch.long), "loss_mask": torch.zeros(shape)}
    for row_index, row in enumerate(rows):
        offset = 0
        for segment, example in enumerate(row, 1):
            prompt_len, total = len(prompt_ids[example]), len(sequences[example])
            span = slice(offset, offset + total)
            out["input_ids"][row_index, span] = torch.tensor(sequences[example])
            out["position_ids"][row_index, span] = torch.arange(total)
            out["segment_ids"][row_index, span] = segment
            # logits at position t predict token t+1: answer tokens are predicted from t = prompt_len-1 .. total-2
            out["loss_mask"][row_index, offset + prompt_len - 1:offset + total - 1] = 1.0
            offset += total
    return out


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1, T, T) bool: attend causally within the same example only; padding attends to itself (no NaN)."""
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    causal = torch.ones(segment_ids.shape[-1], segment_ids.shape[-1], dtype=torch.bool).tril()
    real = (segment_ids > 0).unsqueeze(-1)
    diagonal = torch.eye(segment_ids.shape[-1], dtype=torch.bool)
    return ((same & causal & real) | diagonal).unsqueeze(1)
