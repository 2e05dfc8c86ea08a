"""A feedback cascade (`feedback.cascade`): a cheap source (a rule or user function, a reward model) scores every
sample; the expensive one (the judge, `feedback.source`) is asked only where the cheap verdict is uncertain.

    pointwise judge          a sample is escalated when its cheap score lies inside `band` (or it has none)
    pairwise/listwise judge  a group is escalated (the judge compares within groups) when two of its cheap scores
                             are too close to order: |σ(r_i − r_j) − 0.5| < `delta`, or one has no score

Escalated samples take the judge's reward, the others keep the cheap one, so the cheap source should score on the
judge's reward scale ([0, 1]). `feedback/cascade_escalated_fraction` is logged every step.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from openrlaif.feedback.base import Feedback, FeedbackResult, score_rows
from openrlaif.feedback.judge import group_rows


class CascadeFeedback:
    def __init__(self, cheap: Feedback, expensive: Feedback, mode: str, band: list[float], delta: float) -> None:
        self.cheap, self.expensive, self.mode = cheap, expensive, mode
        self.band, self.delta = (float(band[0]), float(band[1])), delta

    def escalated(self, result: FeedbackResult, prompts: list[str], group_ids: list[int] | None) -> list[int]:
        """The rows the expensive source is asked about, in order."""
        scores = [float(r) if bool(ok) else None for r, ok in zip(result.rewards, result.valid)]
        low, high = self.band
        if self.mode == "pointwise":
            return [i for i, s in enumerate(scores) if s is None or low <= s <= high]
        rows = []
        for members in group_rows(prompts, group_ids).values():
            values = [scores[i] for i in members]
            unsure = any(v is None for v in values) or any(
                abs(1 / (1 + math.exp(min(max(values[b] - values[a], -700.0), 700.0))) - 0.5) < self.delta
                for a in range(len(values)) for b in range(a + 1, len(values)))
            if unsure:
                rows += members
        return sorted(rows)

    def score(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
              conversations: list[list[dict]] | None = None) -> FeedbackResult:
        cheap = self.cheap.score(prompts, responses, group_ids=group_ids, conversations=conversations)
        rows = self.escalated(cheap, prompts, group_ids)
        rewards, valid = cheap.rewards.clone(), cheap.valid.clone()
        # a sample without a cheap score is always escalated: the sample's failures are the judge's
        failures: Counter = Counter()
        details: dict[str, str] = {}
        metrics = {f"cascade_cheap_failures/{k}": float(v) for k, v in cheap.failures.items()}
        consistency: dict[int, float] = {}
        if rows:
            judged = score_rows(self.expensive.score, rows, prompts, responses, group_ids, conversations,
                                (rewards, valid))
            failures, details, consistency = judged.failures, judged.details, judged.consistency
            metrics |= judged.metrics
        metrics["cascade_escalated_fraction"] = len(rows) / max(len(prompts), 1)
        failures = Counter({k: v for k, v in failures.items() if v})
        return FeedbackResult(torch.where(valid, rewards, torch.zeros_like(rewards)), valid, failures, metrics,
                              consistency, {k: v for k, v in details.items() if k in failures})
