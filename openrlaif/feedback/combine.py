"""Several reward objectives on the same samples: each scored, optionally LSC-transformed against its per-prompt
reference reward, then weighted and summed. A sample is valid only if every objective gave it a verdict."""
from __future__ import annotations

from collections import Counter

import torch

from openrlaif.algorithms.rewards import lsc_transform, reference_reward
from openrlaif.feedback.base import Feedback, FeedbackResult


class CombinedFeedback:
    def __init__(self, objectives: dict[str, Feedback], weights: list[float], transform: str = "none",
                 quantile: float = 0.5) -> None:
        self.objectives, self.transform, self.quantile = objectives, transform, quantile
        self.weights = dict(zip(objectives, weights or [1.0] * len(objectives)))
        self.references: dict[str, dict[str, float]] = {name: {} for name in objectives}   # objective -> prompt -> r_ref

    def calibrate(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
                  conversations: list[list[dict]] | None = None) -> dict[str, float]:
        """Score the starting policy's samples (several per prompt) and keep each objective's per-prompt quantile.
        Returns metrics: the mean reference reward per objective and the samples that had no verdict."""
        metrics = {}
        for name, feedback in self.objectives.items():
            result = feedback.score(prompts, responses, group_ids=group_ids, conversations=conversations)
            by_prompt: dict[str, list[float]] = {}
            for prompt, reward, ok in zip(prompts, result.rewards.tolist(), result.valid.tolist()):
                if ok:
                    by_prompt.setdefault(prompt, []).append(reward)
            self.references[name] = {p: reference_reward(torch.tensor(r), self.quantile) for p, r in by_prompt.items()}
            metrics[f"reference/{name}_mean"] = sum(self.references[name].values()) / max(len(by_prompt), 1)
            metrics[f"reference/{name}_failures"] = float((~result.valid).sum())
        return metrics

    def score(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
              conversations: list[list[dict]] | None = None) -> FeedbackResult:
        total = torch.zeros(len(prompts))
        valid = torch.ones(len(prompts), dtype=torch.bool)
        failures: Counter = Counter()
        metrics: dict[str, float] = {}
        consistency: dict[int, float] = {}
        details: dict[str, str] = {}
        for name, feedback in self.objectives.items():
            result = feedback.score(prompts, responses, group_ids=group_ids, conversations=conversations)
            consistency |= result.consistency
            rewards = result.rewards
            if self.transform == "lsc":
                known = torch.tensor([p in self.references[name] for p in prompts])
                reference = torch.tensor([self.references[name].get(p, 0.0) for p in prompts])
                rewards = lsc_transform(rewards, reference)
                missing = result.valid & ~known   # no reference sample of this prompt got a verdict
                failures[f"{name}/no_reference"] += int(missing.sum())
                result.valid &= known
            total += self.weights[name] * torch.where(result.valid, rewards, torch.zeros_like(rewards))
            valid &= result.valid
            failures.update({f"{name}/{kind}" if len(self.objectives) > 1 else kind: count
                             for kind, count in result.failures.items() if count})
            details |= {f"{name}/{kind}" if len(self.objectives) > 1 else kind: detail
                        for kind, detail in result.details.items()}
            metrics |= result.metrics
            if len(self.objectives) > 1 or self.transform != "none":
                raw = result.rewards[result.valid]
                metrics[f"objective/{name}_raw_mean"] = float(raw.mean()) if len(raw) else float("nan")
        failures = Counter({k: v for k, v in failures.items() if v})
        return FeedbackResult(torch.where(valid, total, torch.zeros_like(total)), valid, failures, metrics, consistency,
                              details)
