"""Unpaired and listwise preference data: one prompt with K scored responses per example.

- KTO / BCO (unpaired): TRL's {"prompt", "completion", "label": true|false} rows; preference pairs are also
  accepted and split into one desirable and one undesirable sample (as TRL's unpairing does).
- LiPO (listwise): {"prompt", "responses": [...], "scores": [...]} rows; pairs are read as K = 2 lists.

Each example's responses become K consecutive rows of one batch, so a worker reshapes its log-probs to (B, K).
KTO's examples carry a second, mismatched response (another example's) for the z₀ estimate: K = 2, label -1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from openrlaif.batch import Batch, prompt_response_layout
from openrlaif.config import ConfigError
from openrlaif.data.jsonl import check_prompt_length
from openrlaif.data.rows import read_rows
from openrlaif.data.pairs import DEMO_PAIRS, encode_response, load_pairs

DEMO_RANKED = os.path.join(os.path.dirname(__file__), "demo_ranked.jsonl")
MISMATCHED = -1.0   # the label of KTO's mismatched (x, y') row


@dataclass
class ListExample:
    prompt_ids: list[int]
    responses: list[list[int]]
    labels: list[float]                                   # 1/0 desirable (KTO, BCO); relevance scores (LiPO)
    ref_logps: list[float] = field(default_factory=list)  # Σ log π_ref per response, filled by the reference role


def _number(value, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}.")
    return float(value)


def load_unpaired(path: str, tokenizer, max_prompt_tokens: int, max_response_tokens: int,
                  with_mismatched: bool, columns: dict | None = None) -> list[ListExample]:
    """KTO/BCO samples. Rows with "chosen"/"rejected" give two samples each; rows with "completion" one."""
    path = DEMO_PAIRS if path == "demo" else path
    rows = list(read_rows(path, "data.pairs", '{"prompt", "completion", "label"}', columns))
    if rows and isinstance(rows[0][1], dict) and "chosen" in rows[0][1]:
        samples = []
        for pair in load_pairs(path, tokenizer, max_prompt_tokens, max_response_tokens, columns=columns):
            samples += [ListExample(pair.prompt_ids, [pair.chosen_ids], [1.0]),
                        ListExample(pair.prompt_ids, [pair.rejected_ids], [0.0])]
    else:
        samples = []
        for where, row in rows:
            if not isinstance(row, dict) or not {"prompt", "completion", "label"} <= row.keys():
                raise ConfigError(f"{where}: each unpaired row needs \"prompt\", \"completion\" and \"label\" "
                                  "(true = desirable), or use {\"prompt\", \"chosen\", \"rejected\"} pairs.")
            if not isinstance(row["label"], bool):
                raise ConfigError(f"{where}: \"label\" must be true or false, got {row['label']!r}.")
            if not all(isinstance(row[k], str) and row[k].strip() for k in ("prompt", "completion")):
                raise ConfigError(f"{where}: \"prompt\" and \"completion\" must be non-empty strings.")
            prompt_ids, response_ids = encode_response(tokenizer, [{"role": "user", "content": row["prompt"]}],
                                                       row["completion"])
            check_prompt_length(where, len(prompt_ids), max_prompt_tokens)
            samples.append(ListExample(prompt_ids, [response_ids[:max_response_tokens]], [float(row["label"])]))
    if not samples:
        raise ConfigError(f"data.pairs={path!r} holds no samples.")
    labels = {s.labels[0] for s in samples}
    if labels != {0.0, 1.0}:
        raise ConfigError(f"data.pairs={path!r}: KTO/BCO need both desirable and undesirable samples; all are "
                          f"{'desirable' if labels == {1.0} else 'undesirable'}.")
    if with_mismatched:   # KTO's z₀: each prompt with the next sample's response (a different prompt's, if any)
        for index, sample in enumerate(samples):
            other = next((samples[(index + k) % len(samples)] for k in range(1, len(samples))
                          if samples[(index + k) % len(samples)].prompt_ids != sample.prompt_ids),
                         samples[(index + 1) % len(samples)])
            sample.responses.append(other.responses[0])
            sample.labels.append(MISMATCHED)
    return samples


def load_ranked(path: str, tokenizer, max_prompt_tokens: int, max_response_tokens: int,
                columns: dict | None = None) -> list[ListExample]:
    """LiPO lists; every example must have the same number of responses K (>= 2)."""
    path = DEMO_RANKED if path == "demo" else path
    examples = []
    for where, row in read_rows(path, "data.pairs", '{"prompt", "responses", "scores"}', columns):
        if isinstance(row, dict) and {"chosen", "rejected"} <= row.keys():   # a pair is a list of two
            if not all(isinstance(row.get(k), str) and row[k].strip() for k in ("prompt", "chosen", "rejected")):
                raise ConfigError(f"{where}: listwise losses read pairs only as {{\"prompt\", \"chosen\", "
                                  "\"rejected\"} strings. Fix: convert the row, or write it as {\"prompt\", "
                                  "\"responses\", \"scores\"}.")
            row = {"prompt": row["prompt"], "responses": [row["chosen"], row["rejected"]], "scores": [1.0, 0.0]}
        if not isinstance(row, dict) or not {"prompt", "responses", "scores"} <= row.keys():
            raise ConfigError(f"{where}: each listwise row needs \"prompt\", \"responses\" (a list of strings) and "
                              "\"scores\" (one number per response, higher = better).")
        responses, scores = row["responses"], row["scores"]
        if (not isinstance(responses, list) or len(responses) < 2
                or not all(isinstance(r, str) and r.strip() for r in responses)):
            raise ConfigError(f"{where}: \"responses\" must be a list of at least 2 non-empty strings.")
        if not isinstance(scores, list) or len(scores) != len(responses):
            raise ConfigError(f"{where}: \"scores\" must have one number per response ({len(responses)}).")
        messages = [{"role": "user", "content": row["prompt"]}]
        encoded = [encode_response(tokenizer, messages, r) for r in responses]
        check_prompt_length(where, len(encoded[0][0]), max_prompt_tokens)
        examples.append(ListExample(encoded[0][0], [ids[:max_response_tokens] for _, ids in encoded],
                                    [_number(s, where, "each score") for s in scores]))
    if not examples:
        raise ConfigError(f"data.pairs={path!r} holds no lists.")
    sizes = {len(e.responses) for e in examples}
    if len(sizes) > 1:
        raise ConfigError(f"data.pairs={path!r}: lists have different lengths {sorted(sizes)}; LiPO needs the same "
                          "number of responses per prompt. Fix: keep the top-K of each list.")
    return examples


def lists_to_batch(examples: list[ListExample], pad_id: int) -> Batch:
    """K consecutive rows per example: input_ids/attention_mask/response_mask, and per row its label and
    reference log-prob (0 until the reference role fills them in)."""
    prompts = [e.prompt_ids for e in examples for _ in e.responses]
    responses = [r for e in examples for r in e.responses]
    tensors = prompt_response_layout(prompts, responses, pad_id)
    tensors["labels"] = torch.tensor([label for e in examples for label in e.labels])
    tensors["ref_logps"] = torch.tensor([v for e in examples for v in (e.ref_logps or [0.0] * len(e.responses))])
    return Batch(tensors)
