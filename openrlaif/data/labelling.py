"""From scored groups of responses to preference data: which pairs a prompt's group yields, and the jsonl rows
the preference and reward-model pipelines read. Pure: unit-tested without any model."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from itertools import combinations


@dataclass
class LabelledPair:
    group: int       # index of the prompt in the step
    chosen: int      # row of the chosen response in the rollout batch
    rejected: int
    gap: float       # reward(chosen) − reward(rejected) > 0


def select_pairs(group_ids: list[int], rewards: list[float], valid: list[bool], responses: list[str],
                 mode: str = "best_worst", min_gap: float = 0.0) -> tuple[list[LabelledPair], Counter]:
    """Pairs from each group's valid (scored) responses, and why groups or pairs were skipped.

    best_worst: the highest- against the lowest-rewarded response of the group (ties: earliest vs latest row), as in
    iterative / self-rewarding DPO. best_vs_rest: the highest-rewarded response against each of the others.
    all: every two responses of different text, the higher-rewarded one chosen.
    A pair is kept only if the rewards differ by more than `min_gap`: equal rewards say nothing about which is
    better. Skip reasons: too_few_scored (under 2 valid responses), tie (gap <= min_gap), identical (same text).
    """
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids):
        groups.setdefault(group, []).append(row)
    pairs: list[LabelledPair] = []
    skipped: Counter = Counter()
    for group, rows in groups.items():
        scored = [row for row in rows if valid[row]]
        if len(scored) < 2:
            skipped["too_few_scored"] += 1
            continue
        if mode == "best_worst":
            best = max(scored, key=lambda row: (rewards[row], -row))
            worst = min(scored, key=lambda row: (rewards[row], -row))   # ties: the latest row
            candidates = [(best, worst)]
        elif mode == "best_vs_rest":
            best = max(scored, key=lambda row: (rewards[row], -row))
            candidates = [(best, row) for row in scored if row != best]
        else:
            candidates = [(a, b) if rewards[a] >= rewards[b] else (b, a) for a, b in combinations(scored, 2)]
        for chosen, rejected in candidates:
            gap = rewards[chosen] - rewards[rejected]
            if responses[chosen] == responses[rejected]:
                skipped["identical"] += 1
            elif gap <= min_gap:
                skipped["tie"] += 1
            else:
                pairs.append(LabelledPair(group, chosen, rejected, gap))
    return pairs, skipped


def pair_row(prompt_text: str, prompt_messages: list[dict] | None, chosen: str, rejected: str,
             chosen_score: float, rejected_score: float) -> dict:
    """One line of a pairs file: {"prompt", "chosen", "rejected"} for a single user message, TRL's conversational
    form ({"chosen": messages, "rejected": messages}) when the prompt has more turns or a system prompt."""
    scores = {"chosen_score": round(chosen_score, 6), "rejected_score": round(rejected_score, 6)}
    if prompt_messages is None or len(prompt_messages) == 1:
        return {"prompt": prompt_text, "chosen": chosen, "rejected": rejected, **scores}
    return {"chosen": prompt_messages + [{"role": "assistant", "content": chosen}],
            "rejected": prompt_messages + [{"role": "assistant", "content": rejected}], **scores}


def most_consistent(consistency: dict[int, float], fraction: float) -> set[int]:
    """Repeat Ranking's filter (Devine 2024): of the n groups with a Kendall's W, the ceil(fraction × n) with the
    highest W (ties: the lower id first). The paper keeps the top 25, 50 or 75% of prompts; 50% was best."""
    ranked = sorted(consistency, key=lambda group: (-consistency[group], group))
    return set(ranked[:math.ceil(fraction * len(ranked) - 1e-9)])
