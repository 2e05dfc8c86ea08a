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
