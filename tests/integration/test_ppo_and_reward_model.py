"""pipeline=reward_model, then its checkpoint as the reward-model role and the critic's start in a PPO run."""
import json
import math

import pytest
import torch

from openrlaif.config import (ActorConfig, AlgorithmConfig, ClusterConfig, Config, CriticConfig, DataConfig,
                              EvalConfig, FeedbackConfig, ModelConfig, OutputConfig, RewardModelConfig, RoleResources,
                              RolloutConfig, validate)
from openrlaif.pipelines import run

PAIRS = [{"prompt": f"question {i}", "chosen": "the sun is a star", "rejected": "blue blue cat dog"}
         for i in range(10)]


@pytest.fixture(scope="module")
def reward_model(ray_cluster, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    cfg = Config(pipeline="reward_model", steps=6, seed=0, model=ModelConfig(path=tiny_model),
                 data=DataConfig(pairs=str(pairs), prompts_per_step=8, eval_fraction=0.2, eval_every=3),
                 actor=ActorConfig(zero_stage=3, lr=1e-3, micro_batch_size=2, resources=RoleResources(num_workers=2)),
                 algorithm=AlgorithmConfig(margin=0.5),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(out / "run")))
    validate(cfg)
    result = run(cfg)
    rows = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    return result["checkpoint"], rows


def test_reward_model_learns_and_is_accurate_on_held_out_pairs(reward_model, tiny_model):
    checkpoint, rows = reward_model
    losses = [row["train/loss"] for row in rows]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    evals = [row for row in rows if "eval/accuracy" in row]
    assert [row["step"] for row in evals] == [3, 6] and evals[0]["eval/pairs"] == 2
    assert evals[-1]["eval/accuracy"] == 1.0 and evals[-1]["eval/margin"] > 0
    # a plain transformers folder: scores chosen above rejected with transformers' own pooling
    scores = transformers_scores(checkpoint, [("question 99", "the sun is a star"), ("question 99", "blue blue cat dog")])
    assert scores[0] > scores[1]


def transformers_scores(checkpoint: str, rows: list[tuple[str, str]]) -> list[float]:
    """The reward model's score of each (prompt, answer), computed by transformers alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    scores = []
    for prompt, answer in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        ids = tokenizer(text.rstrip("\n"), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            scores.append(float(model(**ids).logits[0, 0]))
    return scores


def test_openrlaif_eval_measures_with_the_reward_model(reward_model, tiny_model, tmp_path):
    """eval.feedback.source=reward_model: each held-out answer's measured reward is the reward model's own score."""
    checkpoint, _ = reward_model
    cfg = Config(pipeline="eval", seed=0, model=ModelConfig(path=tiny_model),
                 rollout=RolloutConfig(engine="hf", max_new_tokens=6),
                 eval=EvalConfig(prompts="demo", name="rm", feedback=FeedbackConfig(
                     source="reward_model", reward_model=RewardModelConfig(path=checkpoint))),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(tmp_path)))
    validate(cfg)
    report = run(cfg)["metrics"]
    answers = [json.loads(line) for line in open(tmp_path / "eval_samples.jsonl")]
    expected = transformers_scores(checkpoint, [(a["prompt"], a["response"]) for a in answers])
    assert len(answers) == 12 and [a["rm_reward"] for a in answers] == pytest.approx(expected, abs=1e-4)
    assert report["rm_reward"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert report["failure_rate"] == 0


def test_ppo_with_the_reward_model_and_a_critic_started_from_it(reward_model, tiny_model, tmp_path):
    checkpoint, _ = reward_model
    cfg = Config(steps=2, seed=1, model=ModelConfig(path=tiny_model),
                 data=DataConfig(prompts="demo", prompts_per_step=4),
                 rollout=RolloutConfig(engine="hf", samples_per_prompt=2, max_new_tokens=12),
                 actor=ActorConfig(lr=1e-3, micro_batch_size=4),
                 critic=CriticConfig(model=checkpoint, lr=1e-3, micro_batch_size=2,
                                     resources=RoleResources(num_workers=2)),
                 algorithm=AlgorithmConfig(advantage="gae", kl_coef=0.05, kl_estimator="k1", kl_in_reward=True,
                                           lam=0.95),
                 feedback=FeedbackConfig(source="reward_model", reward_model=RewardModelConfig(path=checkpoint)),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(tmp_path)))
    validate(cfg)
    result = run(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for row in rows:
        for key in ("train/loss", "critic/value_loss", "critic/explained_variance", "reward/mean"):
            assert math.isfinite(row[key]), key
        assert row["feedback/failures"] == 0
    assert rows[1]["critic/value_loss"] < rows[0]["critic/value_loss"]   # lr 1e-3 on nearly the same targets
    assert result["checkpoint"] and (tmp_path / "critic" / "model.safetensors").exists()
    from transformers import AutoModelForSequenceClassification
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic")


def test_critic_value_clip_fraction_is_a_mean_over_valid_tokens(ray_cluster, tiny_model):
    """V_old = V + 1 and returns = V − 1: every valid token's clipped term wins, so the clip fraction is exactly 1,
    also when a whole micro-batch is masked (it used to count the masked tokens in the denominator)."""
    import ray

    from openrlaif.workers.critic import CriticWorker
    from openrlaif.workers.group import WorkerGroup
    from tests.integration.helpers import synthetic_batch
    cfg = CriticConfig(zero_stage=0, lr=1e-4, micro_batch_size=2, value_clip=0.2,
                       resources=RoleResources(num_workers=1, num_cpus=1))
    group = WorkerGroup("critic-clip", CriticWorker, cfg.resources, lambda rank: dict(
        model_path=tiny_model, cfg=cfg, pad_token_id=0, rank=rank, world_size=1, master_addr="127.0.0.1",
        master_port=29561, backend="gloo", dtype="float32", step_batch_size=8, threads=1, seed=0))
    try:
        batch = synthetic_batch(8)
        batch["sample_mask"] = torch.tensor([0.0, 0.0, 1, 1, 1, 1, 1, 1])
        values = ray.get(group.workers[0].values.remote(batch))
        batch["values"], batch["returns"] = values + 1.0, values - 1.0
        out = ray.get(group.workers[0].train_step.remote(batch))
    finally:
        group.shutdown()
    assert out["valid_tokens"] == float(batch["response_mask"][2:].sum())
    assert out["value_clip_x_tokens"] / out["valid_tokens"] == pytest.approx(1.0)
