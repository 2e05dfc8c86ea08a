"""Pair strategies and the Bradley–Terry fit (feedback/comparisons.py) against hand-computed cases, and the Judge's
request counts and rankings per strategy over a judge whose verdicts follow known qualities."""
import math
import random
import re

import pytest

from openrlaif.config import JudgeConfig
from openrlaif.feedback.backends import Reply
from openrlaif.feedback.comparisons import (adaptive_budget, bradley_terry, initial_pairs, kendall_tau,
                                            least_certain_pairs)
from openrlaif.feedback.judge import Judge


def test_bradley_terry_two_responses_is_the_logit_of_the_verdict():
    s = bradley_terry(2, [(0, 1, 0.75)], prior=0.0)
    assert s[0] - s[1] == pytest.approx(math.log(3), abs=1e-6) and sum(s) == pytest.approx(0, abs=1e-9)


def test_bradley_terry_a_chain_fits_each_edge_exactly():
    s = bradley_terry(3, [(0, 1, 0.8), (1, 2, 0.8)], prior=0.0)
    assert s == pytest.approx([math.log(4), 0.0, -math.log(4)], abs=1e-6)
    # the order of a comparison's sides does not matter
    assert bradley_terry(3, [(1, 0, 0.2), (2, 1, 0.2)], prior=0.0) == pytest.approx(s, abs=1e-6)


def test_bradley_terry_recovers_qualities_from_exact_verdicts_on_every_pair():
    quality = [0.3, -1.2, 2.0, 0.0, 0.9]
    made = [(i, j, 1 / (1 + math.exp(quality[j] - quality[i]))) for i in range(5) for j in range(i + 1, 5)]
    mean = sum(quality) / 5
    assert bradley_terry(5, made, prior=0.0) == pytest.approx([q - mean for q in quality], abs=1e-5)


def test_bradley_terry_prior_keeps_a_clean_sweep_finite():
    """Response 0 wins its one comparison with certainty. Without a prior its strength would run off to infinity;
    with prior a against a virtual opponent of strength 1, by symmetry θ0 = t, θ1 = 1/t, and θ0's MM fixed point
    is t = (1 + a) / (1/(t + 1/t) + 2a/(t + 1)), solved here by bisection."""
    a = 0.1

    def gap(t):
        return (1 + a) / (1 / (t + 1 / t) + 2 * a / (t + 1)) - t

    lo, hi = 1.0, 1e6
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
    s = bradley_terry(2, [(0, 1, 1.0)], prior=a)
    assert all(math.isfinite(x) for x in s)
    assert s[0] - s[1] == pytest.approx(2 * math.log(lo), rel=1e-5)
    assert bradley_terry(3, [(0, 1, 0.6)], prior=a)[2] == 0.0   # never compared: no score


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


def test_each_strategy_picks_its_pairs():
    rng = random.Random(0)
    assert len(initial_pairs(8, "all", rng)) == 28
    assert initial_pairs(4, "anchor", rng) == [(0, 1), (0, 2), (0, 3)]
    pairs = initial_pairs(8, "k_random", rng, k=2)
    assert len(set(pairs)) == len(pairs) and 8 <= len(pairs) <= 16
    assert all(sum(i in pair for pair in pairs) >= 2 for i in range(8))
    cycle = initial_pairs(8, "adaptive", rng)
    assert len(cycle) == 8 and all(sum(i in pair for pair in cycle) == 2 for i in range(8))
    assert initial_pairs(2, "adaptive", rng) == [(0, 1)] and initial_pairs(1, "all", rng) == []
    assert adaptive_budget(8, 2.5) == 10 and adaptive_budget(2, 2.5) == 1 and adaptive_budget(3, 10) == 3
    # the least certain pairs: closest scores first, disjoint, never one already compared
    assert least_certain_pairs([0.0, 0.1, 5.0, 5.3], {(0, 1)}, 2) == [(2, 3)]
    assert least_certain_pairs([0.0, 0.1, 5.0, 5.3], set(), 2) == [(0, 1), (2, 3)]


class LatentJudge:
    """Pairwise label probabilities that follow each response's known quality ("q=1.5"): P(A) = σ(q_A − q_B),
    whatever the order, so swap-debiased P(x ≻ y) = σ(q_x − q_y)."""

    name, identity = "latent", {"backend": "latent"}

    def __init__(self):
        self.requests = []

    def complete(self, requests):
        self.requests += requests
        replies = []
        for request in requests:
            a, b = (float(x) for x in re.findall(r"q=(-?[\d.]+)", request.messages[0]["content"]))
            p = 1 / (1 + math.exp(b - a))
            replies.append(Reply(label_probs={"A": p, "B": 1 - p}, prompt_tokens=10))
        return replies


QUALITY = [0.4, -1.0, 2.2, 0.1, 1.3, -0.5, 0.8, -2.0]


def judge_groups(strategy, reward="win_rate", groups=3, **extra):
    backend = LatentJudge()
    judge = Judge(backend, JudgeConfig(mode="pairwise", pairwise_strategy=strategy, pairwise_reward=reward,
                                       min_label_mass=0.0, cache=False, **extra))
    prompts = [f"prompt {g}" for g in range(groups) for _ in QUALITY]
    responses = [f"answer {g}.{k} q={q}" for g in range(groups) for k, q in enumerate(QUALITY)]
    result = judge.score(prompts, responses, group_ids=[g for g in range(groups) for _ in QUALITY])
    return result, backend.requests


def test_request_counts_per_strategy_at_n_8():
    counts = {}
    for strategy in ("all", "anchor", "k_random", "adaptive"):
        result, requests = judge_groups(strategy, groups=1)
        counts[strategy] = len(requests)
        assert result.metrics["judge_comparisons"] == len(requests) / 2     # both orders of every pair
        assert result.metrics["judge_comparisons_per_response"] == pytest.approx(len(requests) / 8)
        assert bool(result.valid.all())
    assert counts["all"] == 56 and counts["anchor"] == 14 and counts["adaptive"] == 20
    assert 16 <= counts["k_random"] <= 32
    assert counts["adaptive"] <= 0.4 * counts["all"]


def test_all_pairs_win_rate_is_unchanged_and_bradley_terry_recovers_the_qualities():
    win, _ = judge_groups("all", groups=1)
    by_hand = [sum(1 / (1 + math.exp(QUALITY[j] - QUALITY[i])) for j in range(8) if j != i) / 7 for i in range(8)]
    assert win.rewards.tolist() == pytest.approx(by_hand, abs=1e-6)
    bt, _ = judge_groups("all", "bradley_terry", groups=1, bt_prior=1e-9)
    mean = sum(QUALITY) / 8
    assert bt.rewards.tolist() == pytest.approx([q - mean for q in QUALITY], abs=1e-3)


@pytest.mark.parametrize("strategy", ["anchor", "k_random", "adaptive"])
def test_fewer_comparisons_still_rank_the_group(strategy):
    """Kendall's τ of each group's Bradley–Terry ranking with the true qualities."""
    result, _ = judge_groups(strategy, "bradley_terry")
    for g in range(3):
        tau = kendall_tau(result.rewards[g * 8:(g + 1) * 8].tolist(), QUALITY)
        assert tau >= 0.8, (strategy, g, tau)
