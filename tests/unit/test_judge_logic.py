"""The driver-side Judge over a scripted backend (a deterministic stand-in for a judge model that records what it is
asked): grouping by rollout group, whole conversations, the chain-of-thought readouts, Repeat Ranking, the verdict
cache's keys and its cost accounting. The real backends are tested in tests/integration (JudgeWorker on Ray, the
HTTP server)."""
import math
import re
from dataclasses import replace

import pytest

from openrlaif.config import JudgeConfig
from openrlaif.feedback.backends import JudgeRequest, Reply
from openrlaif.feedback.judge import Judge


class ScriptedJudge:
    """Prefers the response with more "good" in it. Label requests get probabilities, generation requests text:
    a rationale, a "Verdict: X" / "Score: N" line, or a ranking. `position_bias` makes the ranking follow the
    presentation order instead (a maximally inconsistent listwise judge)."""

    def __init__(self, name: str = "scripted", position_bias: bool = False, tokens: int = 10, attempts: int = 1):
        self.name, self.identity = name, {"backend": "scripted", "name": name}
        self.position_bias, self.tokens, self.attempts = position_bias, tokens, attempts
        self.requests: list[JudgeRequest] = []

    @staticmethod
    def quality(text: str) -> int:
        return text.count("good")

    def _answer(self, request: JudgeRequest) -> Reply:
        content = request.messages[0]["content"]
        follow_up = len(request.messages) > 1   # step 2 of the two-step readout: the rationale came before
        responses = re.findall(r"\[Response(?: [AB]| \d+)?\]\n(.*?)(?:\n\n|$)", content, re.S)
        if "[Response 1]" in content:          # listwise
            order = list(range(len(responses)))
            if not self.position_bias:
                order.sort(key=lambda i: -self.quality(responses[i]))
            return Reply(text="Ranking: " + " > ".join(str(i + 1) for i in order))
        if "[Response A]" in content:
            a_better = self.quality(responses[0]) >= self.quality(responses[1])
            if request.labels:
                return Reply(label_probs={"A": 0.8 if a_better else 0.2, "B": 0.2 if a_better else 0.8})
            if "Do not give a verdict yet" in content and not follow_up:
                return Reply(text="A says more." if a_better else "B says more.")
            return Reply(text=f"Response A and Response B. Verdict: {'A' if a_better else 'B'}")
        score = min(9, 1 + 4 * self.quality(responses[0]))
        if request.labels:
            return Reply(label_probs={label: float(label == str(score)) for label in request.labels})
        if "Do not give a score yet" in content and not follow_up:
            return Reply(text=f"It is {'good' if score > 1 else 'bad'}; 2 issues.")
        return Reply(text=f"It has 2 issues, so: Score: {score}")

    def complete(self, requests: list[JudgeRequest]) -> list[Reply]:
        self.requests += requests
        replies = []
        for request in requests:
            reply = self._answer(request)
            reply.prompt_tokens, reply.completion_tokens, reply.attempts = 100, self.tokens, self.attempts
            replies.append(reply)
        return replies


def judge(backend=None, cache_path=None, **overrides) -> Judge:
    return Judge(backend or ScriptedJudge(), JudgeConfig(min_label_mass=0.0, **overrides),
                 str(cache_path) if cache_path else None)


def test_pairwise_groups_by_rollout_group_not_by_prompt_text():
    """The same prompt twice in a step is two groups: each sample is compared inside its own group only."""
    backend = ScriptedJudge()
    result = judge(backend, mode="pairwise").score(["p"] * 4, ["good", "bad", "good good", "x"], group_ids=[0, 0, 1, 1])
    assert result.metrics["judge_comparisons"] == 2 and len(backend.requests) == 4   # one pair per group, both orders
    assert result.rewards.tolist() == pytest.approx([0.8, 0.2, 0.8, 0.2])


def test_the_judge_is_shown_the_whole_conversation():
    backend = ScriptedJudge()
    conversation = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
                    {"role": "user", "content": "Another one?"}]
    judge(backend, mode="pairwise").score(["Another one?"] * 2, ["Red.", "Green."], group_ids=[0, 0],
                                          conversations=[conversation] * 2)
    judge(backend).score(["Another one?"], ["Red."], conversations=[conversation])
    for request in backend.requests:
        content = request.messages[0]["content"]
        assert "User: Name a color." in content and "Assistant: Blue." in content


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_generate_readout_with_chain_of_thought_parses_the_marked_verdict(mode):
    backend = ScriptedJudge()
    result = judge(backend, mode=mode, readout="generate", chain_of_thought=True, max_new_tokens=64).score(
        ["q", "q"], ["good", "bad"], group_ids=[0, 0])
    assert bool(result.valid.all())
    assert all("First " in r.messages[0]["content"] and r.max_tokens == 64 for r in backend.requests)
    assert result.rewards[0] > result.rewards[1]   # "It has 2 issues, so: Score: 5" is read as 5, not 2


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_probs_readout_with_chain_of_thought_is_the_two_step_form(mode):
    """RLAIF's two steps: generate a rationale without a verdict, append it as the judge's turn, then read the
    label probabilities after a follow-up question."""
    backend = ScriptedJudge()
    result = judge(backend, mode=mode, chain_of_thought=True, max_new_tokens=64).score(["q", "q"], ["good", "bad"],
                                                                                       group_ids=[0, 0])
    rationales = [r for r in backend.requests if r.labels is None]
    verdicts = [r for r in backend.requests if r.labels is not None]
    assert len(rationales) == len(verdicts) == 2     # two responses, or one pair in both orders
    rationale_texts = {"A says more.", "B says more.", "It is good; 2 issues.", "It is bad; 2 issues."}
    for rationale, verdict in zip(rationales, verdicts):
        assert "yet" in rationale.messages[0]["content"]
        assert verdict.messages[0] == rationale.messages[0]
        assert verdict.messages[1]["role"] == "assistant" and verdict.messages[1]["content"] in rationale_texts
        assert verdict.messages[2]["role"] == "user" and "Now give your" in verdict.messages[2]["content"]
    assert result.rewards[0] > result.rewards[1]


def test_cached_verdicts_cost_nothing_in_the_metrics(tmp_path):
    prompts, responses = ["a", "b", "c"], ["good", "bad", "x"]
    first = judge(ScriptedJudge(attempts=3), tmp_path / "cache.jsonl").score(prompts, responses)
    assert first.metrics["judge_requests"] == 3 and first.metrics["judge_retries"] == 6
    assert first.metrics["judge_prompt_tokens"] == 300 and first.metrics["judge_cache_hits"] == 0
    backend = ScriptedJudge(attempts=3)
    second = judge(backend, tmp_path / "cache.jsonl").score(prompts, responses)
    assert second.rewards.tolist() == first.rewards.tolist() and not backend.requests
    assert second.metrics["judge_cache_hits"] == 3
    for key in ("judge_requests", "judge_retries", "judge_prompt_tokens", "judge_generated_tokens"):
        assert second.metrics[key] == 0, key


def test_a_judge_that_follows_the_policy_never_reuses_another_runs_verdicts(tmp_path):
    """Policy version k of one run is not policy version k of another: the run id is in the key (and kept by a
    resume, which sets the saved one)."""
    cache = tmp_path / "cache.jsonl"
    old = judge(cache_path=cache)
    old.set_policy_version(3)
    old.score(["q"], ["good"])
    backend = ScriptedJudge()
    rerun = judge(backend, cache)
    rerun.set_policy_version(3)
    assert rerun.score(["q"], ["good"]).metrics["judge_cache_hits"] == 0 and len(backend.requests) == 1
    resumed = judge(ScriptedJudge(), cache)
    resumed.run_id = old.run_id
    resumed.set_policy_version(3)
    assert resumed.score(["q"], ["good"]).metrics["judge_cache_hits"] == 1


def test_the_cache_key_holds_the_backend_identity(tmp_path):
    cache = tmp_path / "cache.jsonl"
    judge(ScriptedJudge("m1"), cache).score(["q"], ["good"])
    assert judge(ScriptedJudge("m1"), cache).score(["q"], ["good"]).metrics["judge_cache_hits"] == 1
    assert judge(ScriptedJudge("m2"), cache).score(["q"], ["good"]).metrics["judge_cache_hits"] == 0
    from openrlaif.feedback.backends import HTTPBackend
    identities = {HTTPBackend("http://h/v1", "m", top_logprobs=k).identity["top_logprobs"] for k in (5, 20)}
    assert identities == {5, 20}


def test_model_fingerprint_follows_the_contents_not_the_path(tmp_path):
    from openrlaif.feedback.backends import model_fingerprint
    folder = tmp_path / "judge"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    before = model_fingerprint(str(folder))
    assert model_fingerprint(str(folder)) == before
    (folder / "model.safetensors").write_bytes(bytes(range(255, -1, -1)) * 4096)   # retrained in place
    assert model_fingerprint(str(folder)) != before
    changed = model_fingerprint(str(folder))
    (folder / "config.json").write_text('{"a": 2}')
    assert model_fingerprint(str(folder)) != changed


def test_repeat_ranking_rewards_mean_ranks_and_kendalls_w():
    backend = ScriptedJudge()
    responses = ["good good good", "bad", "good", "x", "good good", "good"]
    result = judge(backend, mode="listwise", readout="generate", max_new_tokens=32, rankings=4).score(
        ["p"] * 6, responses, group_ids=[0, 0, 0, 1, 1, 1])
    assert len(backend.requests) == 8                              # R rankings per group
    orders = {tuple(re.findall(r"\[Response \d\]\n(\S+(?: \S+)*)", r.messages[0]["content"]))
              for r in backend.requests[:4]}
    assert len(orders) > 1                                          # each ranking in a shuffled order
    assert result.rewards.tolist() == pytest.approx([1.0, 0.0, 0.5, 0.0, 1.0, 0.5])   # (K − mean rank) / (K − 1)
    assert result.consistency == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}
    biased = judge(ScriptedJudge(position_bias=True), mode="listwise", readout="generate", max_new_tokens=32,
                   rankings=8).score(["p"] * 3, responses[:3], group_ids=[0, 0, 0])
    assert biased.consistency[0] < 0.5                               # it followed the shuffled positions


def test_a_listwise_reply_that_does_not_parse_is_dropped_and_counted():
    class Broken(ScriptedJudge):
        def _answer(self, request):
            return Reply(text="They are all fine.")

    result = judge(Broken(), mode="listwise", readout="generate", max_new_tokens=32, rankings=2).score(
        ["p"] * 2, ["a", "b"], group_ids=[0, 0])
    assert result.failures == {"no_ranking": 2} and result.metrics["ranking_failures/unparseable"] == 2
    assert result.consistency == {}


def test_nothing_judged_gives_no_number_that_reads_as_a_result():
    class Failing(ScriptedJudge):
        def _answer(self, request):
            return Reply(failure="endpoint_error", detail="HTTP 500")

    result = judge(Failing()).score(["a", "b"], ["x", "y"])
    assert result.failures == {"endpoint_error": 2} and result.details == {"endpoint_error": "HTTP 500"}
    assert math.isnan(result.metrics["judge_score_mean"])


def test_a_step_budget_judges_the_groups_that_fit_and_masks_the_rest():
    """Every request of the scripted judge costs 100 prompt + 10 generated tokens. Budgeted, the judge first
    estimates a group's cost from its bytes (1 token per byte before any measurement): the first step judges
    fewer groups than a measured step does, none beyond the budget, and the rest are `over_budget`."""
    from openrlaif.config import JudgeBudget
    prompts = [f"question {g}" for g in range(6) for _ in range(2)]
    responses = [f"answer {k}" for k in range(12)]
    groups = [g for g in range(6) for _ in range(2)]
    cfg = JudgeConfig(readout="generate", min_label_mass=0.0, cache=False, budget=JudgeBudget(tokens_per_step=2000),
                      price_per_mtok_prompt=2.0, price_per_mtok_completion=8.0)
    backend = ScriptedJudge(tokens=10)
    judge = Judge(backend, cfg)
    first = judge.score(prompts, responses, group_ids=groups)
    judged = int(first.valid.sum())
    assert 0 < judged < 12 and judged % 2 == 0                # whole groups, in order
    assert first.valid.tolist() == [True] * judged + [False] * (12 - judged)
    assert first.failures == {"over_budget": 12 - judged} and "tokens_per_step" in first.details["over_budget"]
    assert first.metrics["judge_requests"] * 110 <= 2000
    assert first.metrics["judge_cost"] == pytest.approx(judged * (100 * 2.0 + 10 * 8.0) / 1e6)
    second = judge.score(prompts, responses, group_ids=groups)   # now measured: 100 tokens for ~200 bytes
    assert int(second.valid.sum()) > judged and second.metrics["judge_requests"] * 110 <= 2000
    assert second.metrics["judge_cost_total"] == pytest.approx((judged + second.metrics["judge_requests"])
                                                               * 280 / 1e6)
    assert judge.exhausted is None
    # a run's total: once it cannot fit the next group, the judge names the key for the driver to stop on
    total = Judge(ScriptedJudge(tokens=10), replace(cfg, budget=JudgeBudget(tokens_total=700)))
    total.score(prompts, responses, group_ids=groups)
    assert total.exhausted == "feedback.judge.budget.tokens_total"
    assert total.ledger["prompt_tokens"] + total.ledger["completion_tokens"] <= 700
    unbudgeted = Judge(ScriptedJudge(), replace(cfg, budget=JudgeBudget())).score(prompts, responses, group_ids=groups)
    assert bool(unbudgeted.valid.all())


def _cheap(scores):
    """A cheap source whose score for response "r<k>" is scores[k] (None: no verdict)."""
    from openrlaif.feedback.base import FeedbackResult

    class Cheap:
        def score(self, prompts, responses, group_ids=None, conversations=None):
            return FeedbackResult.from_scores([scores[int(r.split()[0][1:])] for r in responses])
    return Cheap()


def test_a_pointwise_cascade_asks_the_judge_only_inside_the_band():
    from openrlaif.feedback.cascade import CascadeFeedback
    backend = ScriptedJudge()
    judge = Judge(backend, JudgeConfig(readout="generate", min_label_mass=0.0, cache=False))
    cheap = [0.1, 0.5, 0.9, 0.3, None]
    cascade = CascadeFeedback(_cheap(cheap), judge, "pointwise", [0.25, 0.75], 0.1)
    responses = ["r0", "r1 good", "r2", "r3 good good", "r4"]
    result = cascade.score(["q"] * 5, responses, group_ids=[0] * 5)
    assert len(backend.requests) == 3 and result.metrics["cascade_escalated_fraction"] == pytest.approx(0.6)
    assert result.metrics["cascade_cheap_failures/no_score"] == 1
    asked = [r.messages[0]["content"] for r in backend.requests]
    assert all(any(f"[Response]\n{responses[i]}\n" in text for text in asked) for i in (1, 3, 4))
    # the judge's "Score: N" with N = 1 + 4·goods, normalised on 1..9; the confident samples keep the cheap score
    assert result.rewards.tolist() == pytest.approx([0.1, 0.5, 0.9, 1.0, 0.0])
    assert bool(result.valid.all())


def test_a_pairwise_cascade_escalates_groups_it_cannot_order():
    from openrlaif.feedback.cascade import CascadeFeedback
    backend = ScriptedJudge()
    judge = Judge(backend, JudgeConfig(mode="pairwise", min_label_mass=0.0, cache=False))
    # group 0: 0.1 vs 0.9 is sure (|σ(0.8) − 0.5| = 0.19); group 1: 0.5 vs 0.6 is not (0.025 < 0.1)
    cascade = CascadeFeedback(_cheap([0.1, 0.9, 0.5, 0.6]), judge, "pairwise", [0.25, 0.75], 0.1)
    result = cascade.score(["a", "a", "b", "b"], ["r0", "r1", "r2 good", "r3"], group_ids=[0, 0, 1, 1])
    assert len(backend.requests) == 2 and result.metrics["cascade_escalated_fraction"] == 0.5
    assert result.rewards.tolist()[:2] == pytest.approx([0.1, 0.9])
    assert result.rewards.tolist()[2:] == pytest.approx([0.8, 0.2])   # the judge's swap-debiased win rates


def test_requests_sharing_a_prefix_are_sent_together():
    """The local backend sends requests sorted by their messages: a group's requests (same rubric and prompt)
    become adjacent, so they land on one worker and its vLLM engine reuses their cached prefix."""
    from openrlaif.feedback.backends import prefix_order
    from openrlaif.feedback.judge_prompts import pointwise_messages
    asked = [("what is the sun", "a star"), ("say hi", "hi"), ("what is the sun", "hot"), ("say hi", "hello")]
    requests = [JudgeRequest(pointwise_messages("Rate it.", p, r, 1, 9), ["1"]) for p, r in asked]
    order = prefix_order(requests)
    assert sorted(order) == [0, 1, 2, 3]
    prompts = [asked[i][0] for i in order]
    assert prompts in (["say hi", "say hi", "what is the sun", "what is the sun"],
                       ["what is the sun", "what is the sun", "say hi", "say hi"])
