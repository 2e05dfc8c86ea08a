"""The feedback interface. A failed judgement masks its sample and is counted; it never silently becomes 0."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import math

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
    # pairwise / listwise judges: how consistent the judge was on each group (Kendall's W for listwise), by group id
    consistency: dict[int, float] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)   # failure kind -> the first failure's detail, for the log

    def mean(self) -> float:
        """The mean reward over the samples that were scored; NaN when none was."""
        rewards = self.rewards[self.valid]
        return float(rewards.mean()) if len(rewards) else float("nan")

    def sem(self) -> float:
        """The standard error of that mean; NaN below two scored samples."""
        rewards = self.rewards[self.valid]
        return float(rewards.std() / math.sqrt(len(rewards))) if len(rewards) > 1 else float("nan")

    @staticmethod
    def from_scores(scores: list[float | None], failure_kinds: list[str | None] | None = None,
                    metrics: dict[str, float] | None = None, details: dict[str, str] | None = None) -> FeedbackResult:
        """None is no verdict; NaN or ±inf (a user function, a reward model gone wrong) is a `non_finite` failure:
        left in, one such value would poison its group's baseline and, through whitening, the whole batch."""
        kinds = list(failure_kinds) if failure_kinds else [None] * len(scores)
        scores, details = list(scores), dict(details or {})
        for index, score in enumerate(scores):
            if score is not None and not math.isfinite(float(score)):
                details.setdefault("non_finite", f"sample {index} was scored {score}")
                scores[index], kinds[index] = None, "non_finite"
        valid = torch.tensor([s is not None for s in scores], dtype=torch.bool)
        rewards = torch.tensor([0.0 if s is None else float(s) for s in scores], dtype=torch.float32)
        failures = Counter(kind for kind in kinds if kind)
        missing = int((~valid).sum()) - sum(failures.values())
        if missing > 0:
            failures["no_score"] += missing
        return FeedbackResult(rewards, valid, failures, metrics or {}, details={k: v for k, v in details.items()
                                                                              if k in failures})


def score_rows(score, rows: list[int], prompts: list[str], responses: list[str], group_ids: list[int] | None,
               conversations: list[list[dict]] | None, into: tuple[torch.Tensor, torch.Tensor]) -> FeedbackResult:
    """`score` (a Feedback's score) on the given rows only; their rewards and validity are written into the
    full-size (rewards, valid) tensors of `into`. Returns the rows' own result (failures, metrics, details)."""
    def pick(values):
        return [values[i] for i in rows] if values is not None else None
    part = score(pick(prompts), pick(responses), group_ids=pick(group_ids), conversations=pick(conversations))
    index = torch.tensor(rows, dtype=torch.long)
    into[0][index], into[1][index] = part.rewards, part.valid
    return part


class Feedback(Protocol):
    """`prompts[i]` is the last user message sample i answers; `group_ids[i]` the rollout group it belongs to (the
    samples of one prompt; two rows of the same prompt text in a step are two groups); `conversations[i]` the whole
    prompt conversation (system prompt and earlier turns). Sources that compare samples group by `group_ids`;
    judges show the whole conversation."""

    def score(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
              conversations: list[list[dict]] | None = None) -> FeedbackResult: ...
