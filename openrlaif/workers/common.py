"""Helpers every model-holding worker uses: process set-up, model loading, response log-probs."""
from __future__ import annotations

import os

import torch

from openrlaif.batch import Batch


def setup_process(threads: int, seed: int) -> None:
    """Ray sets OMP_NUM_THREADS=1 in actors; roles run one after another, so each may use several cores."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)


def load_causal_lm(path: str, dtype: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                trust_remote_code=trust_remote_code)


def response_logprobs(model, batch: Batch, temperature: float = 1.0, with_entropy: bool = False):
    """log π(response token | prefix) for every response position, (B, R); zeros past the end of a response.
    with_entropy=True also returns the entropy of π at each response position, (B, R).

    input_ids is [left-padded prompt | right-padded response]; position ids count real tokens only, so a
    padded row sees the same positions as the unpadded sequence (and as the rollout engine did). Only the
    response positions go through the LM head (`logits_to_keep`), and log π is x_target − logsumexp(x), so the
    (B, R, vocab) log-softmax is never materialised unless the entropy needs it.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    response_len = batch["response_mask"].shape[1]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": response_len + 1} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, **kwargs).logits
    logits = logits[:, -response_len - 1:-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, -response_len:].unsqueeze(-1)
    if not with_entropy:
        logprobs = logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)
        return logprobs * batch["response_mask"]
    all_logprobs = logits.log_softmax(-1)
    logprobs = all_logprobs.gather(-1, targets).squeeze(-1) * batch["response_mask"]
    entropy = -(all_logprobs.exp() * all_logprobs).sum(-1) * batch["response_mask"]
    return logprobs, entropy


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (transformers' own models do; some remote-code
    models do not). `model` may be a DeepSpeed engine around it."""
    import inspect
    return "logits_to_keep" in inspect.signature(getattr(model, "module", model).forward).parameters


def trim_to_content(batch: Batch) -> Batch:
    """Drop columns that are padding in every row (left of the longest prompt, right of the longest response)."""
    mask = batch["attention_mask"]
    response_len = batch["response_mask"].shape[1]
    prompt_len = mask.shape[1] - response_len
    first = int((mask[:, :prompt_len].sum(0) > 0).nonzero()[0]) if prompt_len else 0
    last_response = int(batch["response_mask"].sum(1).max())
    keep_response = max(last_response, 1)
    trimmed = Batch(dict(batch.tensors), dict(batch.meta))
    for name in ("input_ids", "attention_mask"):
        trimmed[name] = batch[name][:, first:prompt_len + keep_response]
    for name, value in batch.tensors.items():
        if value.dim() == 2 and value.shape[1] == response_len and name not in ("input_ids", "attention_mask"):
            trimmed[name] = value[:, :keep_response]
    return trimmed


@torch.no_grad()
def batched_response_logprobs(model, batch: Batch, micro_batch_size: int, device, temperature: float = 1.0):
    """response_logprobs over micro-batches with their padding columns trimmed; (B, R) on the CPU."""
    out = torch.zeros_like(batch["response_mask"])
    for start in range(0, len(batch), micro_batch_size):
        index = list(range(start, min(start + micro_batch_size, len(batch))))
        micro = trim_to_content(batch.select(index)).to(device)
        values = response_logprobs(model, micro, temperature).float().cpu()
        out[start:start + len(index), :values.shape[1]] = values
    return out
