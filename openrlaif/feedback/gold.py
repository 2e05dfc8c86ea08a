"""Gold rewards: deterministic functions of (prompt, response) that a person can read, for measuring a policy
(`eval.feedback`) and for the simulated labeller (`openrlaif serve-labeller`), which sees them through noise.

`concise` is the studies' and the demo's gold: a short, finished answer without filler. It is something
SmolLM2-135M-Instruct can be trained toward within tens of steps (its answers run long and are cut at
`rollout.max_new_tokens`), and every part of it can be checked by reading the response."""
from __future__ import annotations

import re

FILLER = ("i'm sorry", "i am sorry", "as an ai", "i cannot", "i can't")
_FINISHED = re.compile(r"[.!?)\"'`]\s*$")


def concise(prompts: list[str], responses: list[str], max_words: int = 20,
            banned: tuple[str, ...] | list[str] = FILLER) -> list[float]:
    """Per response, in [0, 1]: 0 if it contains a `banned` phrase (case-insensitive) or is empty; else a length
    score (1 up to `max_words` words, falling linearly to 0 at twice that) times 1 for a finished last sentence
    (ends in . ! ? or a closing quote/bracket) or 0.5 for one cut off."""
    scores = []
    for response in responses:
        text = response.strip()
        words = len(text.split())
        if not words or any(phrase in text.lower() for phrase in banned):
            scores.append(0.0)
            continue
        length = max(0.0, min(1.0, 2.0 - words / max_words))
        scores.append(length * (1.0 if _FINISHED.search(text) else 0.5))
    return scores
