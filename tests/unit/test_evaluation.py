"""Evaluation: the win rate and its Wilson interval, eval.* checks at start-up, the train-vs-eval plot panel, and
the demo's closing line (a paired change over the held-out prompts)."""
import json

import pytest
from PIL import Image

from openrlaif.config import ConfigError, validate
from openrlaif.demo import what_rose
from openrlaif.pipelines.evaluation import outcome, win_rate, wilson_interval
from openrlaif.plot import COLOURS, default_keys, main as plot, read_series
from tests.unit.test_config import composed


def test_wilson_interval_matches_hand_computed_values():
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)   # no zero-width interval at 100%
    assert wilson_interval(0, 0) != wilson_interval(0, 0)           # nothing compared: NaN, no number


def test_win_rate_counts_ties_as_half_and_leaves_out_unjudged():
    report = win_rate([1.0, 1.0, 0.5, 0.0, None])
    assert report["win_rate"] == pytest.approx(2.5 / 4) and report["compared"] == 4 and report["not_judged"] == 1
    assert (report["wins"], report["ties"], report["losses"]) == (2, 1, 1)
    assert report["ci95_low"] < report["win_rate"] < report["ci95_high"]
    assert [outcome(p) for p in (0.9, 0.5, 0.1, None, float("nan"))] == [1.0, 0.5, 0.0, None, None]


@pytest.mark.parametrize("overrides,needle", [
    (["eval.feedback.source=function", "eval.feedback.function=openrlaif.feedback.gold:concise"],
     "eval.prompts is empty"),
    (["eval.prompts=demo", "eval.samples_per_prompt=4"], "eval.greedy=false"),
    (["eval.prompts=demo", "eval.feedback.source=function", "eval.feedback.function=concise"],
     "eval.feedback.function='concise'"),
    (["eval.prompts=demo", "eval.feedback.source=rule"], "eval.feedback.source='rule'"),
    (["eval.prompts=demo", "eval.baseline=smollm2-135m-instruct"], "openrlaif eval"),
    (["eval.prompts=demo", "eval.name=gold reward"], "eval.name"),
    (["eval.prompts=demo", "eval.feedback.source=judge", "eval.feedback.judge.follow_policy=true"],
     "itself"),
    (["pipeline=eval", "eval.prompts=demo"], "eval.feedback.source"),
    (["pipeline=sft", "eval.prompts=demo"], "openrlaif eval <checkpoint>"),
    (["eval.pairs=demo"], "pipeline=online_rl"),                                   # pairs are for preference
    (["pipeline=preference", "algorithm=kto", "eval.pairs=demo"], "algorithm.loss=kto"),
])
def test_bad_eval_settings_name_the_key_and_the_fix(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        validate(composed(*overrides))
    assert needle in str(err.value)


def test_good_eval_settings_pass():
    validate(composed("eval.prompts=demo", "eval.every=2", "eval.feedback.source=function",
                      "eval.feedback.function=openrlaif.feedback.gold:concise"))
    validate(composed("pipeline=eval", "eval.prompts=demo", "eval.baseline=smollm2-135m-instruct",
                      "eval.feedback.source=judge", "eval.feedback.judge.backend=http",
                      "eval.feedback.judge.base_url=http://127.0.0.1:8000/v1", "eval.feedback.judge.model=labeller"))
    validate(composed("pipeline=preference", "algorithm=robust_dpo", "eval.pairs=demo", "eval.every=2"))
    with pytest.raises(ConfigError, match="eval.feedback.judge.base_url"):
        validate(composed("eval.prompts=demo", "eval.feedback.source=judge", "eval.feedback.judge.backend=http"))


def test_a_run_with_eval_gets_a_train_vs_eval_panel(tmp_path):
    rows = [{"step": 0, "eval/gold_reward": 0.4, "eval/train_reward": 0.5}]
    rows += [{"step": s, "reward/mean": 0.5 + s / 20, "train/kl": 0.01 * s} for s in range(1, 5)]
    rows += [{"step": 4, "eval/gold_reward": 0.3, "eval/train_reward": 0.7, "reward/mean": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = default_keys(read_series(str(tmp_path / "metrics.jsonl")))
    assert keys[0] == "reward/mean+eval/train_reward+eval/gold_reward"
    assert plot([str(tmp_path)]) == 0
    pixels = set(Image.open(tmp_path / "metrics.png").convert("RGB").getdata())
    assert set(COLOURS[:3]) <= pixels                  # three series drawn in their colours on one panel


def test_the_demo_line_is_a_paired_change_in_standard_errors(tmp_path):
    metrics = [{"step": 0, "eval/gold_reward": 0.5, "eval/finished_fraction": 0.5, "eval/response_length": 30},
               {"step": 8, "eval/gold_reward": 0.75, "eval/finished_fraction": 1.0, "eval/response_length": 20}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    before, after = [0.5, 0.5, 0.5, 0.5], [0.7, 0.8, 0.7, 0.8]
    samples = [{"step": 0, "prompt": f"p{i}", "gold_reward": g} for i, g in enumerate(before)]
    samples += [{"step": 8, "prompt": f"p{i}", "gold_reward": g} for i, g in enumerate(after)]
    (tmp_path / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    line = what_rose(str(tmp_path))
    # differences 0.2, 0.3, 0.2, 0.3: mean 0.25, sd 0.0577, se 0.0289 -> 8.7 standard errors
    assert "rose 0.500 -> 0.750" in line and "+0.250 = 8.7 standard errors over 4 prompts" in line
