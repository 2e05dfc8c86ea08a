"""Evaluation for real on the tiny model: eval.* in a GRPO loop whose judge is the simulated labeller behind the
HTTP judge path, then `pipeline=eval` (openrlaif eval) on its checkpoint against the starting model, by a rule and
by a local judge in its own worker group; judge-eval of a pointwise judge."""
import json

import pytest

from openrlaif.config import (ActorConfig, ClusterConfig, Config, DataConfig, EvalConfig, FeedbackConfig,
                              JudgeConfig, ModelConfig, OutputConfig, RolloutConfig, validate)
from openrlaif.feedback.gold import concise
from openrlaif.labeller import Labeller, LabellerServer, NoiseModel
from openrlaif.pipelines import run
from openrlaif.pipelines.evaluation import outcome, win_rate

GOLD = "openrlaif.feedback.gold:concise"


@pytest.fixture(scope="module")
def labeller():
    server = LabellerServer(Labeller(noise=NoiseModel(accuracy=0.9))).start()
    yield server
    server.stop()


def http_labeller(server, **settings) -> JudgeConfig:
    return JudgeConfig(**(dict(backend="http", base_url=server.base_url, model="labeller", api_key_env="",
                               min_label_mass=0.5, top_logprobs=20) | settings))


def rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_eval_in_the_loop_then_openrlaif_eval_against_the_start(ray_cluster, tiny_model, labeller, tmp_path):
    cfg = Config(steps=2, seed=0, model=ModelConfig(path=tiny_model),
                 data=DataConfig(prompts_per_step=2),
                 rollout=RolloutConfig(engine="hf", samples_per_prompt=2, max_new_tokens=6),
                 actor=ActorConfig(lr=1e-3, micro_batch_size=4),
                 feedback=FeedbackConfig(source="judge", judge=http_labeller(labeller)),
                 eval=EvalConfig(prompts="demo", every=1, feedback=FeedbackConfig(source="function", function=GOLD)),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(tmp_path / "run")))
    validate(cfg)
    result = run(cfg)
    metrics = rows(tmp_path / "run" / "metrics.jsonl")
    evals = {r["step"]: r for r in metrics if "eval/gold_reward" in r}
    assert sorted(evals) == [0, 1, 2]                 # before the first step, every step, after the last
    samples = rows(tmp_path / "run" / "eval_samples.jsonl")
    assert len(samples) == 3 * 12                     # 12 held-out prompts (not the training ones), greedy
    for step, row in evals.items():
        answers = [s for s in samples if s["step"] == step]
        gold = concise([s["prompt"] for s in answers], [s["response"] for s in answers])
        assert row["eval/gold_reward"] == pytest.approx(sum(gold) / len(gold))
        assert [s["gold_reward"] for s in answers] == pytest.approx(gold)
        assert 0 <= row["eval/train_reward"] <= 1 and row["eval/train_failure_rate"] == 0
        assert row["eval/reward_gap"] == pytest.approx(row["eval/train_reward"] - row["eval/gold_reward"])
        assert row["eval/response_length"] > 0
    assert abs(evals[0]["eval/kl"]) < 1e-4 < abs(evals[2]["eval/kl"])   # the start is the reference; then drift

    checkpoint = result["checkpoint"]
    by_rule = Config(pipeline="eval", seed=0, model=ModelConfig(path=checkpoint),
                     rollout=RolloutConfig(engine="hf", max_new_tokens=6),
                     eval=EvalConfig(prompts="demo", baseline=tiny_model,
                                     feedback=FeedbackConfig(source="function", function=GOLD)),
                     cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(tmp_path / "eval")))
    validate(by_rule)
    report = run(by_rule)["metrics"]
    answers = rows(tmp_path / "eval" / "eval_samples.jsonl")
    mine = concise([""] * 12, [a["response"] for a in answers])
    theirs = concise([""] * 12, [a["baseline_response"] for a in answers])
    expected = win_rate([outcome(0.5 + 0.5 * ((m > t) - (m < t))) for m, t in zip(mine, theirs)])
    assert report["win_rate_by"] == "score" and report["win_rate"] == pytest.approx(expected["win_rate"])
    assert report["ci95_low"] <= report["win_rate"] <= report["ci95_high"] and report["compared"] == 12
    assert [a["response"] for a in answers[:3]] == [s["response"] for s in samples if s["step"] == 2][:3]
    assert json.load(open(tmp_path / "eval" / "eval.json"))["win_rate"] == report["win_rate"]

    by_judge = Config(pipeline="eval", seed=0, model=ModelConfig(path=checkpoint),
                      rollout=RolloutConfig(engine="hf", max_new_tokens=6),
                      eval=EvalConfig(prompts="demo", baseline=tiny_model, feedback=FeedbackConfig(
                          source="judge", judge=JudgeConfig(engine="hf", min_label_mass=0.0, mode="pairwise"))),
                      cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(tmp_path / "judged")))
    validate(by_judge)
    report = run(by_judge)["metrics"]
    assert report["win_rate_by"] == "judge" and report["compared"] + report["not_judged"] == 12
    assert 0 <= report["ci95_low"] <= report["win_rate"] <= report["ci95_high"] <= 1


def test_judge_eval_of_a_pointwise_judge_scores_each_answer(ray_cluster, labeller, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    data = [("q1", "Paris.", "Well " * 30), ("q2", "Four.", "I'm sorry, four."), ("q3", "Blue.", "Blue.")]
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in data))
    cfg = Config(pipeline="judge_eval", data=DataConfig(pairs=str(pairs)),
                 feedback=FeedbackConfig(source="judge", judge=http_labeller(labeller, mode="pointwise")),
                 output=OutputConfig(dir=str(tmp_path / "out")))
    validate(cfg)
    before = labeller.labeller.requests["pointwise"]
    report = run(cfg)["metrics"]
    assert labeller.labeller.requests["pointwise"] - before == 6          # each answer once, not pairs
    assert report["mode"] == "pointwise" and report["judged"] == 3
    assert report["agreement"] == pytest.approx(2 / 3) and report["ties"] == pytest.approx(1 / 3)
    assert report["mean_score_chosen"] > report["mean_score_rejected"] and report["score_std"] > 0
