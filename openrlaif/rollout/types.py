from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingSpec:
    n: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None   # one seed per generate() call; sample k of prompt i is still distinct


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]      # response tokens, EOS included when the model stopped
    logprobs: list[float]     # log π(token) per response token, as the engine computed it (before temperature)
    finished: bool            # stopped on EOS (False: cut at max_new_tokens)
