import pytest

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
