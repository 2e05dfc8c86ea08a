"""Scalar heads on a decoder backbone: the critic (one value per token) and the reward model (one score per
sequence). Both are transformers' `AutoModelForSequenceClassification` with one label, the format TRL's
RewardTrainer and OpenRLHF write, so a reward model trained here loads there, and theirs load here (as the
reward-model role, or to initialise the critic)."""
from __future__ import annotations

import torch
from torch import nn


def load_scalar_model(path: str, dtype: str = "float32", trust_remote_code: bool = False, pad_token_id=None):
    """A one-label sequence-classification model. From a causal-LM checkpoint the backbone loads and the `score`
    head starts random (seeded by the worker); from a reward-model checkpoint everything loads."""
    import transformers
    from transformers import AutoModelForSequenceClassification
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()   # "score.weight newly initialized" is expected from an LM
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    finally:
        transformers.logging.set_verbosity(level)
    if model.config.pad_token_id is None:   # TRL and transformers pool on it when they load the model back
        model.config.pad_token_id = pad_token_id
    return model


class TokenValues(nn.Module):
    """forward -> (B, L): the head applied to every position's hidden state (DeepSpeed wraps this module)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return self.model.score(hidden).squeeze(-1).float()


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left padding does not shift them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_values(values_model, batch) -> torch.Tensor:
    """V(s_t) for each response token t: the value of the prefix before it, (B, R), zero past a response's end.
    Aligned like response_logprobs: the hidden state at position p scores the state that emits token p + 1."""
    response_len = batch["response_mask"].shape[1]
    values = values_model(batch["input_ids"], batch["attention_mask"], position_ids_of(batch["attention_mask"]))
    return values[:, -response_len - 1:-1] * batch["response_mask"]


def sequence_scores(values_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head at each row's last real token, (B,): the reward-model score. Rows may be padded on either side."""
    values = values_model(input_ids, attention_mask, position_ids_of(attention_mask))
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)
    return values.gather(-1, last.unsqueeze(-1)).squeeze(-1)
