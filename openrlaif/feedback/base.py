"""The feedback interface. A failed judgement masks its sample and is counted; it never silently becomes 0."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import torch


class JudgeFailure(Exception):
    """A verdict that could not be turned into a score. `kind` is the metric name it is counted under."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class FeedbackResult:
    rewards: torch.Tensor                 # (B,) float; 0 where valid is False (never used: the sample is masked)
    valid: torch.Tensor                   # (B,) bool
    failures: Counter = field(default_factory=Counter)    # failure kind -> count
    metrics: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def from_scores(scores: list[float | None], failure_kinds: list[str | None] | None = None,
                    metrics: dict[str, float] | None = None) -> FeedbackResult:
        valid = torch.tensor([s is not None for s in scores], dtype=torch.bool)
        rewards = torch.tensor([0.0 if s is None else float(s) for s in scores], dtype=torch.float32)
        failures = Counter(kind for kind in (failure_kinds or []) if kind)
        missing = int((~valid).sum()) - sum(failures.values())
        if missing > 0:
            failures["no_score"] += missing
        return FeedbackResult(rewards, valid, failures, metrics or {})


class Feedback(Protocol):
    def score(self, prompts: list[str], responses: list[str]) -> FeedbackResult: ...
