"""Rule rewards and user functions. A function takes (prompts, responses, **kwargs) and returns one float per
sample, or None where it has no verdict (that sample is masked and counted, like a judge failure)."""
from __future__ import annotations

import importlib
import inspect
import numbers
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


def load_function(spec: str, kwargs: dict | None = None):
    """The callable `spec` names, checked (at start-up) to accept (prompts, responses, **kwargs)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"feedback.function={spec!r}: cannot import module {module_name!r} ({err}). "
                          "Fix: make it importable (installed, or on PYTHONPATH) or correct the name.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"feedback.function={spec!r}: module {module_name!r} has no callable {attr!r}.")
    try:
        inspect.signature(fn).bind([], [], **(kwargs or {}))
    except TypeError as err:
        raise ConfigError(f"feedback.function={spec!r} cannot be called as {attr}(prompts, responses"
                          f"{''.join(f', {k}=...' for k in kwargs or {})}): {err}. Its signature is "
                          f"{attr}{inspect.signature(fn)}. Fix: make it take (prompts, responses, **kwargs), or pass "
                          "only the keyword arguments it takes in feedback.function_kwargs.") from None
    except ValueError:   # a builtin without a signature: nothing to check
        pass
    return fn


def as_score(value) -> float | None:
    """A real number (not a bool) as a float, None as None; anything else raises TypeError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:   # a numpy or torch scalar
            return as_score(value.item())
        raise TypeError(f"{value!r} ({type(value).__name__})")
    return float(value)


class NoReward:
    """feedback.source=none: every sample scored 0 and valid (on-policy distillation alone: the teacher's per-token
    term is the whole advantage)."""

    def score(self, prompts: list[str], responses: list[str], group_ids=None, conversations=None) -> FeedbackResult:
        return FeedbackResult.from_scores([0.0] * len(responses))


class FunctionFeedback:
    def __init__(self, spec: str, kwargs: dict) -> None:
        self.spec, self.fn, self.kwargs = spec, load_function(spec, kwargs), dict(kwargs)

    def score(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
              conversations: list[list[dict]] | None = None) -> FeedbackResult:
        """The user function keeps its (prompts, responses, **kwargs) signature; groups and conversations are not
        passed to it. It must return a list (or tuple, array) of one real number or None per response. Anything
        else is a typed failure naming the function and what it returned, masked and counted like a failed
        verdict: `bad_score` for a value that is no number ("0.5", True), `function_error` when the call raised
        or returned no list of the right length. The run goes on."""
        size = len(responses)
        try:
            returned = self.fn(prompts, responses, **self.kwargs)
            if isinstance(returned, (str, bytes, dict)) or not hasattr(returned, "__len__"):
                raise TypeError(f"returned a {type(returned).__name__}, not a list of scores")
            if len(returned) != size:
                raise TypeError(f"returned {len(returned)} scores for {size} responses; it must return one per "
                                "response (None = no verdict)")
        except Exception as err:   # the user's code: its failure is this step's verdicts failing, not the run's
            detail = f"feedback.function={self.spec!r}: {type(err).__name__}: {err}"[:300]
            return FeedbackResult.from_scores([None] * size, ["function_error"] * size,
                                              details={"function_error": detail})
        scores, kinds, details = [], [], {}
        for index, value in enumerate(returned):
            try:
                scores.append(as_score(value))
                kinds.append(None)
            except TypeError as err:
                scores.append(None)
                kinds.append("bad_score")
                details.setdefault("bad_score", f"feedback.function={self.spec!r} returned {err} for sample {index}; "
                                                "return a float, or None for no verdict")
        return FeedbackResult.from_scores(scores, kinds, details=details)
