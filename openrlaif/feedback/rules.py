"""Rule rewards and user functions. A function takes (prompts, responses, **kwargs) and returns one float per
sample, or None where it has no verdict (that sample is masked and counted, like a judge failure)."""
from __future__ import annotations

import importlib
import re

from openrlaif.config import ConfigError
from openrlaif.feedback.base import FeedbackResult


def brevity(prompts: list[str], responses: list[str], target_words: int = 20) -> list[float]:
    """1 for a response of at most `target_words` words, falling linearly to 0 at twice that."""
    scores = []
    for response in responses:
        words = len(response.split())
        scores.append(max(0.0, min(1.0, 2.0 - words / target_words)))
    return scores


def keyword(prompts: list[str], responses: list[str], words: tuple[str, ...] = ("please", "thanks")) -> list[float]:
    """Share of `words` that appear in the response (case-insensitive, whole words)."""
    patterns = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in words]
    return [sum(bool(p.search(r)) for p in patterns) / len(patterns) for r in responses]


def load_function(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"feedback.function={spec!r}: cannot import module {module_name!r} ({err}). "
                          "Fix: make it importable (installed, or on PYTHONPATH) or correct the name.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"feedback.function={spec!r}: module {module_name!r} has no callable {attr!r}.")
    return fn


class FunctionFeedback:
    def __init__(self, spec: str, kwargs: dict) -> None:
        self.spec, self.fn, self.kwargs = spec, load_function(spec), dict(kwargs)

    def score(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
              conversations: list[list[dict]] | None = None) -> FeedbackResult:
        """The user function keeps its (prompts, responses, **kwargs) signature; groups and conversations are not
        passed to it."""
        scores = list(self.fn(prompts, responses, **self.kwargs))
        if len(scores) != len(responses):
            raise ValueError(f"feedback.function={self.spec!r} returned {len(scores)} scores for "
                             f"{len(responses)} responses; it must return one per response (None = no verdict).")
        return FeedbackResult.from_scores(scores)
