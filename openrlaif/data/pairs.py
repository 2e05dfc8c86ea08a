"""Preference pairs: jsonl rows of {"prompt", "chosen", "rejected"} (strings) or TRL's conversational form
{"chosen": [messages...], "rejected": [messages...]} whose last message is the assistant's answer and whose
earlier messages are the shared prompt. Rendered with the model's chat template."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from openrlaif.batch import Batch, prompt_response_layout
from openrlaif.config import ConfigError
from openrlaif.data.jsonl import check_prompt_length
from openrlaif.data.rows import read_rows

DEMO_PAIRS = os.path.join(os.path.dirname(__file__), "demo_pairs.jsonl")


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen_logp: float = 0.0      # Σ log π_ref(chosen), filled once by the reference role
    ref_rejected_logp: float = 0.0
    margin: float = 0.0               # pipeline=reward_model: Bradley–Terry margin (a row's "margin", or the config's)


def split_conversation(messages, where: str, key: str) -> tuple[list[dict], str]:
    if (not isinstance(messages, list) or len(messages) < 2
            or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
            or messages[-1]["role"] != "assistant"):
        raise ConfigError(f"{where}: \"{key}\" must be a list of {{\"role\", \"content\"}} messages ending with the "
                          "assistant's answer.")
    return messages[:-1], messages[-1]["content"]


def encode_response(tokenizer, prompt_messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    """Prompt ids (with the generation prompt) and response ids (the answer plus the end-of-turn token)."""
    prompt = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    full = tokenizer.apply_chat_template(prompt_messages + [{"role": "assistant", "content": response}],
                                         tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    if full[:len(prompt)] != prompt:   # templates that rewrite earlier turns: fall back to plain concatenation
        full = prompt + tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    response_ids = full[len(prompt):]
    # keep the answer through its end-of-turn token; drop trailing newlines some templates add after it
    if tokenizer.eos_token_id in response_ids:
        response_ids = response_ids[:response_ids.index(tokenizer.eos_token_id) + 1]
    return prompt, response_ids


def load_pairs(path: str, tokenizer, max_prompt_tokens: int, max_response_tokens: int,
               default_margin: float = 0.0, key: str = "data.pairs", columns: dict | None = None) -> list[Pair]:
    path = DEMO_PAIRS if path == "demo" else path
    pairs, identical = [], []
    for where, row in read_rows(path, key, '{"prompt", "chosen", "rejected"}', columns):
        if not isinstance(row, dict) or not {"chosen", "rejected"} <= row.keys():
            raise ConfigError(f"{where}: each row needs \"chosen\" and \"rejected\" (and \"prompt\" unless they "
                              "are message lists).")
        if isinstance(row["chosen"], list):
            prompt_messages, chosen = split_conversation(row["chosen"], where, "chosen")
            rejected_prompt, rejected = split_conversation(row["rejected"], where, "rejected")
            if rejected_prompt != prompt_messages:
                raise ConfigError(f"{where}: \"chosen\" and \"rejected\" must share the same prompt messages.")
        else:
            if not all(isinstance(row.get(k), str) and row[k].strip() for k in ("prompt", "chosen", "rejected")):
                raise ConfigError(f"{where}: \"prompt\", \"chosen\" and \"rejected\" must be non-empty strings.")
            prompt_messages, chosen, rejected = [{"role": "user", "content": row["prompt"]}], row["chosen"], row["rejected"]
        if chosen == rejected:   # no preference to learn: every loss of the family would only add noise
            identical.append(where.rsplit(":", 1)[1])
            continue
        prompt_ids, chosen_ids = encode_response(tokenizer, prompt_messages, chosen)
        _, rejected_ids = encode_response(tokenizer, prompt_messages, rejected)
        check_prompt_length(where, len(prompt_ids), max_prompt_tokens)
        margin = row.get("margin", default_margin)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise ConfigError(f"{where}: \"margin\" must be a number, got {margin!r}.")
        pairs.append(Pair(prompt_ids, chosen_ids[:max_response_tokens], rejected_ids[:max_response_tokens],
                          margin=float(margin)))
    if identical:
        print(f"[openrlaif] warning: {key}={path}: skipped {len(identical)} pair(s) whose chosen and rejected "
              f"answers are the same (line(s) {', '.join(identical[:10])}{' ...' if len(identical) > 10 else ''})")
    if not pairs:
        raise ConfigError(f"{key}={path!r} holds no pairs. Fix: add {{\"prompt\", \"chosen\", \"rejected\"}} rows.")
    return pairs


def pairs_to_batch(pairs: list[Pair], pad_id: int) -> Batch:
    """One row per pair; chosen and rejected share the column layout [left-padded prompt | right-padded answer]
    so a worker can run them through the model in one concatenated forward pass."""
    prompt_width = max(len(p.prompt_ids) for p in pairs)
    response_width = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    tensors = {}
    for side in ("chosen", "rejected"):
        layout = prompt_response_layout([p.prompt_ids for p in pairs], [getattr(p, f"{side}_ids") for p in pairs],
                                        pad_id, prompt_width, response_width)
        tensors |= {f"{side}_{name}": value for name, value in layout.items()}
    tensors["ref_chosen_logps"] = torch.tensor([p.ref_chosen_logp for p in pairs])
    tensors["ref_rejected_logps"] = torch.tensor([p.ref_rejected_logp for p in pairs])
    tensors["margin"] = torch.tensor([p.margin for p in pairs])
    tensors["pair_mask"] = torch.ones(len(pairs))
    return Batch(tensors)


def both_sides(batch: Batch) -> Batch:
    """Chosen rows then rejected rows, as one model batch (input_ids, attention_mask, response_mask)."""
    return Batch({name: torch.cat([batch[f"chosen_{name}"], batch[f"rejected_{name}"]])
                  for name in ("input_ids", "attention_mask", "response_mask")})
