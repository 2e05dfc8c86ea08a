import pytest
import torch

from openrlaif.feedback.base import FeedbackResult, JudgeFailure
from openrlaif.feedback.judge_prompts import expected_score, normalise, parse_score, pointwise_messages


@pytest.mark.parametrize("reply,score", [("7", 7.0), ("Score: 8", 8.0), ("8/9", 8.0), (" 6.5 ", 6.5),
                                         ("I would rate it 3.", 3.0), ("9\nBecause it is correct.", 9.0)])
def test_good_replies_parse(reply, score):
    assert parse_score(reply, 1, 9) == score


@pytest.mark.parametrize("reply", ["", "great answer", "eight", "Score: N/A"])
def test_malformed_replies_are_typed_failures(reply):
    with pytest.raises(JudgeFailure) as err:
        parse_score(reply, 1, 9)
    assert err.value.kind == "unparseable"


@pytest.mark.parametrize("reply", ["12", "0", "-3", "9.5"])
def test_out_of_range_replies_are_typed_failures(reply):
    with pytest.raises(JudgeFailure) as err:
        parse_score(reply, 1, 9)
    assert err.value.kind == "out_of_range"


def test_expected_score_is_probability_weighted_and_renormalised():
    assert expected_score({1: 0.25, 9: 0.25}, min_label_mass=0.1) == 5.0
    assert expected_score({3: 0.1, 4: 0.0}, min_label_mass=0.05) == pytest.approx(3.0)


def test_expected_score_with_too_little_mass_on_score_tokens_fails():
    with pytest.raises(JudgeFailure) as err:
        expected_score({1: 0.001, 2: 0.002}, min_label_mass=0.01)
    assert err.value.kind == "unparseable"


def test_normalise_maps_scale_to_unit_interval():
    assert normalise(1, 1, 9) == 0.0 and normalise(9, 1, 9) == 1.0 and normalise(5, 1, 9) == 0.5


def test_rubric_prompt_contains_everything_the_judge_needs():
    messages = pointwise_messages("Rate {score_min}-{score_max}.", "What is 2+2?", "4", 1, 9)
    text = messages[0]["content"]
    assert "Rate 1-9." in text and "What is 2+2?" in text and "[Response]\n4" in text


def test_failed_verdicts_are_masked_and_counted_not_scored_zero():
    result = FeedbackResult.from_scores([0.5, None, 1.0, None], [None, "unparseable", None, "out_of_range"])
    assert result.valid.tolist() == [True, False, True, False]
    assert result.failures == {"unparseable": 1, "out_of_range": 1}
    assert FeedbackResult.from_scores([None]).failures == {"no_score": 1}


def test_parse_choice_reads_the_first_standalone_letter():
    from openrlaif.feedback.judge_prompts import parse_choice
    assert parse_choice("A") == "A" and parse_choice("**B** is better") == "B"
    assert parse_choice("Response B.") == "B"
    with pytest.raises(JudgeFailure) as err:
        parse_choice("Both are fine")     # the "B" inside "Both" is not a verdict
    assert err.value.kind == "unparseable"


def test_choice_probability_renormalises_over_a_and_b():
    from openrlaif.feedback.judge_prompts import choice_probability
    assert choice_probability({"A": 0.3, "B": 0.1}, 0.01) == pytest.approx(0.75)
    with pytest.raises(JudgeFailure):
        choice_probability({"A": 0.0, "B": 0.0}, 0.0)


@pytest.mark.parametrize("p_first,p_second,prob,flipped", [
    (1.0, 1.0, 0.5, True),       # always "A": debiased to 0.5, a flip
    (0.9, 0.1, 0.9, False),      # consistent preference for the first response
    (0.2, 0.6, 0.3, False),      # consistent preference for the second
    (0.7, 0.6, 0.55, True),
])
def test_swap_debiasing(p_first, p_second, prob, flipped):
    from openrlaif.feedback.judge_prompts import swap_debiased
    out_prob, out_flipped = swap_debiased(p_first, p_second)
    assert out_prob == pytest.approx(prob) and out_flipped == flipped


# ---------------------------------------------------------------------------------------------- verdict format
@pytest.mark.parametrize("reply,score", [
    ("The response makes 2 small mistakes, so: 6", 6.0),      # the verdict comes after the reasoning
    ("Rating (1-9): 8", 8.0),                                  # the scale in the marker is not the score
    ("It has 3 errors.\nScore: 4", 4.0),
    ("**Score:** 7/9", 7.0),
    ("On a scale of 1 to 9, I would give it 5.", 5.0),
    ("7 (on a 1-9 scale)", 7.0),
    ("Score: 3 out of 9", 3.0),
    ("Two points are fine, one is wrong. Final score = 5", 5.0),
])
def test_a_reasoned_reply_gives_its_marked_or_last_score(reply, score):
    assert parse_score(reply, 1, 9) == score


@pytest.mark.parametrize("reply", ["Score: 3\nOn reflection, Score: 7", "Rating: 2. Score: 8"])
def test_two_different_marked_scores_are_unparseable(reply):
    with pytest.raises(JudgeFailure) as err:
        parse_score(reply, 1, 9)
    assert err.value.kind == "unparseable"


@pytest.mark.parametrize("reply,choice", [
    ("Response A rambles; Response B answers directly. B", "B"),   # the final letter after both are named
    ("Verdict: B", "B"),
    ("A is long-winded, B is direct.\nVerdict: B", "B"),
    ("Both are correct, but B is shorter. [[B]]", "B"),
    ("Answer: (A)", "A"),
    ("Better response: Response A", "A"),
    ("**A**", "A"),
])
def test_a_reasoned_pairwise_reply_gives_its_marked_or_final_verdict(reply, choice):
    from openrlaif.feedback.judge_prompts import parse_choice
    assert parse_choice(reply) == choice


@pytest.mark.parametrize("reply", ["Both A and B are fine", "A and B tie.", "Verdict: A. Verdict: B",
                                   "Neither response is good"])
def test_an_ambiguous_pairwise_reply_is_unparseable(reply):
    from openrlaif.feedback.judge_prompts import parse_choice
    with pytest.raises(JudgeFailure) as err:
        parse_choice(reply)
    assert err.value.kind == "unparseable"


def test_the_prompt_asks_for_the_verdict_format_the_parser_reads():
    from openrlaif.feedback.judge_prompts import pairwise_messages
    assert "single number" in pointwise_messages("r", "q", "a", 1, 9, "probs")[0]["content"]
    assert '"Score: N"' in pointwise_messages("r", "q", "a", 1, 9, "generate")[0]["content"]
    cot = pointwise_messages("r", "q", "a", 1, 9, "cot")[0]["content"]
    assert "First explain" in cot and '"Score: N"' in cot
    assert "Do not give a score yet" in pointwise_messages("r", "q", "a", 1, 9, "rationale")[0]["content"]
    assert '"Verdict: A" or "Verdict: B"' in pairwise_messages("r", "q", "a", "b", "cot")[0]["content"]


def test_the_judge_sees_the_whole_conversation():
    conversation = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "And the capital?"}]
    text = pointwise_messages("r", "And the capital?", "Paris", 1, 9, conversation=conversation)[0]["content"]
    assert "System: Answer in French." in text and "Assistant: Bonjour" in text and "User: And the capital?" in text
    single = pointwise_messages("r", "Hi", "Hello", 1, 9, conversation=[{"role": "user", "content": "Hi"}])
    assert "[User message]\nHi" in single[0]["content"]


# ---------------------------------------------------------------------------------------------- listwise
@pytest.mark.parametrize("reply,ranking", [
    ("Ranking: 2 > 1 > 3", [1, 0, 2]),
    ("Response 3 is best, then 1.\nRanking: 3 > 1 > 2", [2, 0, 1]),
    ("[2] > [3] > [1]", [1, 2, 0]),
])
def test_parse_ranking_reads_a_permutation(reply, ranking):
    from openrlaif.feedback.judge_prompts import parse_ranking
    assert parse_ranking(reply, 3) == ranking


@pytest.mark.parametrize("reply,kind", [("All are good.", "unparseable"), ("Ranking: 1 > 1 > 2", "invalid_ranking"),
                                        ("Ranking: 1 > 2", "invalid_ranking"),
                                        ("Ranking: 1 > 2 > 4", "invalid_ranking")])
def test_a_reply_that_is_no_ranking_is_a_typed_failure(reply, kind):
    from openrlaif.feedback.judge_prompts import parse_ranking
    with pytest.raises(JudgeFailure) as err:
        parse_ranking(reply, 3)
    assert err.value.kind == kind


def test_kendalls_w_hand_computed():
    """W = 12 S / (R² (K³ − K)): 1 for identical rankings, 0 for a Latin square (each item gets each rank once)."""
    from openrlaif.feedback.judge_prompts import kendalls_w
    assert kendalls_w([[1, 2, 3]] * 5) == pytest.approx(1.0)
    assert kendalls_w([[1, 2, 3], [2, 3, 1], [3, 1, 2]]) == pytest.approx(0.0)
    # R = 2, K = 3: rank sums 3, 5, 4 -> mean 4, S = 2 -> W = 24 / (4 · 24) = 0.25
    assert kendalls_w([[1, 2, 3], [2, 3, 1]]) == pytest.approx(0.25)
    # R = 3, K = 4: rank sums 4, 8, 9, 9 -> mean 7.5, S = 12.25 + 0.25 + 2.25 + 2.25 = 17 -> W = 204 / 540
    assert kendalls_w([[1, 2, 3, 4], [1, 3, 2, 4], [2, 3, 4, 1]]) == pytest.approx(204 / 540)


def test_non_finite_scores_are_typed_failures_not_rewards():
    result = FeedbackResult.from_scores([0.5, float("nan"), None, float("inf"), -float("inf")])
    assert result.valid.tolist() == [True, False, False, False, False]
    assert result.failures == {"non_finite": 3, "no_score": 1}
    assert torch.isfinite(result.rewards).all()
