"""Which pairs of a group to compare, and what the verdicts say about the group (pure logic, unit-tested).

Strategies (`feedback.judge.pairwise_strategy`), for a group of n responses:
    all        every pair: n(n-1)/2 pairs (both orders are always judged: n(n-1) requests)
    anchor     every response against the group's first sample: n-1 pairs
    k_random   k random opponents per response (`pairwise_k`): between nk/2 and nk pairs, no pair twice
    adaptive   a random cycle (n pairs, every response twice), then, round by round, the not yet compared pairs
               whose Bradley–Terry order is least certain (closest fitted scores), disjoint within a round, until
               `pairwise_budget` comparisons per response on average (round(budget·n/2) pairs)

Rewards (`feedback.judge.pairwise_reward`): `win_rate`, the mean of P(i ≻ j) over i's comparisons, or
`bradley_terry`: the group's log-strengths fitted to the (soft) verdicts by minorise-maximise iterations (Hunter
2004), with `bt_prior` pseudo-wins and as many pseudo-losses against a virtual opponent of strength 1, so a response
that wins every comparison stays finite; centred per group.
"""
from __future__ import annotations

import math
import random
from itertools import combinations

STRATEGIES = ("all", "anchor", "k_random", "adaptive")


def initial_pairs(size: int, strategy: str, rng: random.Random, k: int = 2) -> list[tuple[int, int]]:
    """The first (for `adaptive`, the only non-adaptive) pairs of a group of `size`, as member positions."""
    if size < 2:
        return []
    if strategy == "all":
        return list(combinations(range(size), 2))
    if strategy == "anchor":
        return [(0, j) for j in range(1, size)]
    if strategy == "k_random":
        chosen: set[tuple[int, int]] = set()
        for i in range(size):
            others = [j for j in range(size) if j != i]
            for j in rng.sample(others, min(k, len(others))):
                chosen.add((min(i, j), max(i, j)))
        return sorted(chosen)
    if strategy == "adaptive":
        order = list(range(size))
        rng.shuffle(order)
        cycle = {(min(a, b), max(a, b)) for a, b in zip(order, order[1:] + order[:1])}
        return sorted(cycle)
    raise ValueError(f"unknown pairwise strategy {strategy!r}")


def adaptive_budget(size: int, budget: float) -> int:
    """Pairs an adaptive group may use in all: round(budget·n/2), at least the cycle, at most every pair."""
    return min(size * (size - 1) // 2, max(size if size > 2 else 1, round(budget * size / 2)))


def least_certain_pairs(scores: list[float], done: set[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Up to `limit` disjoint, not yet compared pairs with the closest Bradley–Terry scores (the least certain
    order), closest first."""
    candidates = sorted((abs(scores[i] - scores[j]), i, j) for i, j in combinations(range(len(scores)), 2)
                        if (i, j) not in done)
    used: set[int] = set()
    out = []
    for _, i, j in candidates:
        if len(out) >= limit:
            break
        if i in used or j in used:
            continue
        out.append((i, j))
        used.update((i, j))
    return out


def bradley_terry(size: int, comparisons: list[tuple[int, int, float]], prior: float = 0.1,
                  iterations: int = 500, tol: float = 1e-10) -> list[float]:
    """Log-strengths s (mean 0) maximising Σ p·log σ(s_i − s_j) + (1 − p)·log σ(s_j − s_i) over the comparisons
    (i, j, p = P(i ≻ j)), plus, per response, `prior` wins and `prior` losses against a virtual opponent of strength
    1 (log-strength 0). Responses without a comparison get 0. MM updates of θ = exp(s) (Hunter 2004, soft wins)."""
    if size == 0:
        return []
    wins = [prior] * size
    pairs: dict[tuple[int, int], float] = {}
    compared = [False] * size
    for i, j, p in comparisons:
        wins[i] += p
        wins[j] += 1.0 - p
        key = (min(i, j), max(i, j))
        pairs[key] = pairs.get(key, 0.0) + 1.0
        compared[i] = compared[j] = True
    theta = [1.0] * size
    for _ in range(iterations):
        denominators = [2.0 * prior / (theta[i] + 1.0) for i in range(size)]
        for (i, j), count in pairs.items():
            share = count / (theta[i] + theta[j])
            denominators[i] += share
            denominators[j] += share
        new = [wins[i] / denominators[i] if compared[i] and denominators[i] > 0 else 1.0 for i in range(size)]
        new = [max(value, 1e-300) for value in new]
        change = max(abs(math.log(a) - math.log(b)) for a, b in zip(new, theta))
        theta = new
        if change < tol:
            break
    logs = [math.log(value) for value in theta]
    known = [logs[i] for i in range(size) if compared[i]]
    centre = sum(known) / len(known) if known else 0.0
    return [logs[i] - centre if compared[i] else 0.0 for i in range(size)]


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's τ-b between two score lists (ties allowed); 1.0 for fewer than two items."""
    concordant = discordant = ties_a = ties_b = 0
    for i, j in combinations(range(len(a)), 2):
        x, y = a[i] - a[j], b[i] - b[j]
        if x == 0 and y == 0:
            continue
        if x == 0:
            ties_a += 1
        elif y == 0:
            ties_b += 1
        elif (x > 0) == (y > 0):
            concordant += 1
        else:
            discordant += 1
    total = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / total if total else 1.0
