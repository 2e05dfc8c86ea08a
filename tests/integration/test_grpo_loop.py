"""Two full GRPO steps through the driver: rollout -> feedback -> reference -> advantages -> update -> sync."""
import json
import math
import os

import pytest
import ray
import torch
from safetensors.torch import load_file

from openrlaif.config import (ActorConfig, AlgorithmConfig, ClusterConfig, Config, DataConfig, FeedbackConfig,
                              JudgeConfig, LoraSettings, ModelConfig, OutputConfig, RoleResources, RolloutConfig,
                              validate)
from openrlaif.pipelines.online_rl import train
from openrlaif.rollout.types import SamplingSpec
from openrlaif.workers.group import WorkerGroup
from openrlaif.workers.rollout import RolloutWorker


def loop_config(tiny_model, out_dir, engine, zero_stage, feedback, algorithm, workers=2) -> Config:
    cfg = Config(
        steps=2, seed=1,
        model=ModelConfig(path=tiny_model),
        data=DataConfig(prompts="demo", prompts_per_step=4),
        # weight sync in buckets of whole layers: the tiny model's 1.6 MiB go as embeddings, layer 0, layer 1, head
        rollout=RolloutConfig(engine=engine, samples_per_prompt=4, max_new_tokens=12, kv_cache_gib=0.05,
                              sync_bucket_mb=0.3),
        actor=ActorConfig(zero_stage=zero_stage, lr=1e-3, micro_batch_size=4,
                          resources=RoleResources(num_workers=workers, num_cpus=1)),
        algorithm=algorithm,
        feedback=feedback,
        cluster=ClusterConfig(threads_per_worker=1),
        output=OutputConfig(dir=str(out_dir)))
    validate(cfg)
    return cfg


CASES = {
    "vllm-zero2-rule": ("vllm", 2, FeedbackConfig(source="function", function="openrlaif.feedback.rules:brevity",
                                                  function_kwargs={"target_words": 2}),
                        AlgorithmConfig(kl_coef=0.05)),
    "vllm-zero2-remax-cispo": ("vllm", 2, FeedbackConfig(source="function", function="openrlaif.feedback.rules:brevity",
                                                         function_kwargs={"target_words": 2}),
                               AlgorithmConfig(advantage="remax", policy_loss="cispo", clip_eps=1.0, clip_eps_high=4.0,
                                               kl_coef=0.05)),
    # PPO (critic, GAE, KL in the reward) on two objectives, each LSC-transformed against its reference reward
    "vllm-zero2-ppo-lsc": ("vllm", 2, FeedbackConfig(source="function", function="openrlaif.feedback.rules:brevity",
                                                     function_kwargs={"target_words": 2},
                                                     extra_functions=["openrlaif.feedback.rules:keyword"],
                                                     transform="lsc"),
                           AlgorithmConfig(advantage="gae", kl_coef=0.05, kl_estimator="k1", kl_in_reward=True)),
    # DAPO: clip-higher, no KL, dynamic sampling past the groups a gated rule leaves uninformative, overlong
    # shaping (filtering would mask every sample here: the random model never stops); GSPO's sequence loss
    "hf-zero2-dapo-gspo": ("hf", 2, FeedbackConfig(source="function", function="tests.integration.rewards:question_gated"),
                           AlgorithmConfig(advantage="grpo", policy_loss="gspo", clip_eps=3e-4, clip_eps_high=4e-4,
                                           kl_coef=0.0, loss_agg="seq_mean_token_mean", dynamic_sampling=True,
                                           max_resample_rounds=4, overlong_buffer=4)),
    # RLOO with every policy-loss option on: clip-higher, dual-clip, entropy bonus, sequence-mean aggregation
    "hf-zero3-judge": ("hf", 3, FeedbackConfig(source="judge", judge=JudgeConfig(min_label_mass=0.0)),
                       AlgorithmConfig(advantage="rloo", kl_coef=0.05, clip_eps_high=0.28, dual_clip=3.0,
                                       entropy_coef=0.01, loss_agg="seq_mean_token_mean", mismatch="mis")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_grpo_steps_update_the_policy(ray_cluster, tiny_model, tmp_path, case):
    engine, stage, feedback, algorithm = CASES[case]
    cfg = loop_config(tiny_model, tmp_path / case, engine, stage, feedback, algorithm)
    if algorithm.advantage == "gae":   # the critic with LoRA adapters on its backbone, its value head whole
        cfg.critic.lora = LoraSettings(rank=4, alpha=8.0)
        validate(cfg)
    result = train(cfg)

    rows = [json.loads(line) for line in open(tmp_path / case / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["train/loss"]) and math.isfinite(row["train/kl"])
        assert row["feedback/failures"] == 0
        for phase in ("rollout", "feedback", "logprobs", "update", "sync"):
            assert row[f"time/{phase}_s"] > 0
        # rank 0 held one bucket at a time: a decoder layer (0.5 MiB), never the whole model (1.6 MiB)
        assert row["sync/buckets"] == 4 and 0.4 < row["sync/gathered_mib_peak"] < 0.6
    if algorithm.kl_coef > 0:                # step 2 samples from the updated policy, the reference stayed put
        assert rows[1]["train/kl"] > 0
    for row in rows:                        # one epoch, one optimizer step: log π_old is log π_θ, the ratio is 1
        assert row["train/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        # float32 engines sample with the trainer's own log-probs; the gap is logged every step
        assert 0 <= row["rollout/logprob_mismatch_mean"] <= row["rollout/logprob_mismatch_max"] < 1e-3
        assert 0 <= row["rollout/logprob_mismatch_k3"] < 1e-6
        # the mismatch is corrected by default, on-policy too: truncated IS (weights ~1 in float32), or masked IS
        if algorithm.mismatch == "tis":
            assert row["train/is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and row["train/behaviour_kl"] < 1e-6
        else:   # every sequence's geometric-mean ratio is ~1: none is dropped
            assert row["train/mis_dropped_fraction"] == 0.0 and "train/is_weight_mean" not in row
    if feedback.transform == "lsc":           # log σ(·) of each objective, summed: never above 0
        assert all(row["reward/mean"] <= 0 and "feedback/objective/keyword_raw_mean" in row for row in rows)
    if algorithm.advantage == "gae":
        assert all(math.isfinite(row["critic/value_loss"]) for row in rows)
        critic = load_file(os.path.join(tmp_path / case / "critic", "model.safetensors"))   # written merged
        initial = load_file(os.path.join(tiny_model, "model.safetensors"))
        assert torch.equal(critic["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])   # frozen
        assert not torch.equal(critic["model.layers.0.self_attn.q_proj.weight"],
                               initial["model.layers.0.self_attn.q_proj.weight"])   # adapted, merged
    if algorithm.dynamic_sampling:   # every step trained on 4 groups, informative ones first (refilled as needed)
        assert all(row["rollout/informative_groups"] <= 4 and row["rollout/resample_rounds"] <= 4 for row in rows)
        assert any(row["rollout/resample_rounds"] >= 1 for row in rows), [r["rollout/informative_groups"] for r in rows]
        assert all(row["reward/std"] > 0 and "reward/overlong_penalty_mean" in row for row in rows)
    if algorithm.entropy_coef > 0:
        assert all(row["train/entropy"] > 0 for row in rows)
    else:
        assert "train/entropy" not in rows[0]

    checkpoint = result["checkpoint"]
    trained = load_file(os.path.join(checkpoint, "model.safetensors"))
    initial = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert trained.keys() == initial.keys()
    changed = [name for name in initial if not torch.equal(initial[name], trained[name])]
    assert len(changed) == len(initial), "every weight tensor should move after two updates at lr 1e-3"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(checkpoint)    # loads as a plain HF folder
    AutoTokenizer.from_pretrained(checkpoint)
    if engine == "vllm":                                 # and vLLM serves it
        group = WorkerGroup("checkpoint-vllm", RolloutWorker, RoleResources(), lambda rank: dict(
            model_path=checkpoint, cfg=RolloutConfig(kv_cache_gib=0.05), max_model_len=128, threads=1, seed=0))
        try:
            completions = ray.get(group.workers[0].generate.remote([[1, 5, 6]], SamplingSpec(n=2, max_new_tokens=4)))
        finally:
            group.shutdown()
        assert len(completions) == 2 and all(c.token_ids for c in completions)


def test_colocated_actor_reference_and_rollout_share_bundles_rank_by_rank(ray_cluster, tiny_model, tmp_path):
    """Two CPUs per worker for three roles of two workers: 12 CPUs apart, which the 6-CPU cluster refuses;
    colocated, they share one placement group of two 2-CPU bundles (4 CPUs), and two steps train as usual."""
    from openrlaif.pipelines.online_rl import one_step

    cfg = loop_config(tiny_model, tmp_path / "colocated", "hf", 2,
                      FeedbackConfig(source="function", function="openrlaif.feedback.rules:brevity"),
                      AlgorithmConfig(kl_coef=0.05))
    for resources in (cfg.actor.resources, cfg.reference.resources, cfg.rollout.resources):
        resources.num_workers, resources.num_cpus = 2, 2
    with pytest.raises(Exception, match="do not fit the Ray cluster.*cluster.colocate"):
        train(cfg)
    cfg.cluster.colocate = ["actor", "reference", "rollout"]
    cfg.output.overwrite = True
    validate(cfg)
    seen = {}

    def observe(cfg, run, roles, stream, step, metrics):
        one_step(cfg, run, roles, stream, step, metrics)
        for name in ("actor", "reference", "rollout"):
            seen[name] = ray.get([w.__ray_call__.remote(lambda self: (
                ray.get_runtime_context().get_placement_group_id(),
                ray.get_runtime_context().get_assigned_resources()["CPU"])) for w in roles.groups()[name].workers])
        seen["table"] = ray.util.placement_group_table()

    result = train(cfg, step_fn=observe)
    assert result["metrics"]["train/kl"] > 0
    groups = {group for name in ("actor", "reference", "rollout") for group, _ in seen[name]}
    assert len(groups) == 1                               # one placement group for the three roles
    shared = seen["table"][groups.pop()]
    assert shared["name"] == "openrlaif-colocated" and shared["bundles"] == {0: {"CPU": 2.0}, 1: {"CPU": 2.0}}
    assert all(cpus == pytest.approx(2 / 3, abs=1e-3) for name in ("actor", "reference", "rollout")
               for _, cpus in seen[name])                 # each takes a third of its bundle
    names = {entry["name"] for entry in ray.util.placement_group_table().values() if entry["state"] != "REMOVED"}
    assert not any(name.startswith("openrlaif-") for name in names)   # the shared group is gone after the run


def test_two_steps_ahead_trains_on_stale_samples_with_importance_weights_and_resumes_every_prompt_once(
        ray_cluster, tiny_model, tmp_path, monkeypatch):
    """rollout.async_steps=2: step 1 samples now and launches steps 2 and 3; each later step takes the oldest batch
    in flight and launches the one two steps ahead. So the batches are 0, 1, 2, 2 updates old, and
    KL(behaviour || π_old) is ~0 only at step 1 (same weights; engine and trainer agree). Step 2's checkpoint keeps
    the prompt stream before the two batches in flight, so a run resumed from it samples their prompts again: the
    resumed steps 3 and 4 train on exactly the prompts of the uninterrupted run's, none lost, none twice."""
    import shutil

    from openrlaif.pipelines import online_rl
    from openrlaif.rollout.launch import next_rollout
    trained: dict[str, list] = {}

    def recording(folder):
        def wrapped(roles, stream, cfg, tokenizer, step, metrics):
            batch = next_rollout(roles, stream, cfg, tokenizer, step, metrics)
            trained.setdefault(folder, []).append(sorted(set(batch.meta["prompt"])))
            return batch
        return wrapped

    def config(folder, resume=False):
        cfg = loop_config(tiny_model, tmp_path / folder, "hf", 2,
                          FeedbackConfig(source="function", function="openrlaif.feedback.rules:brevity",
                                         function_kwargs={"target_words": 2}),
                          AlgorithmConfig(kl_coef=0.05))
        cfg.steps, cfg.rollout.async_steps, cfg.output.checkpoint_every, cfg.resume = 4, 2, 2, resume
        validate(cfg)
        return cfg

    monkeypatch.setattr(online_rl, "next_rollout", recording("run"))
    train(config("run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [row["rollout/staleness"] for row in rows] == [0.0, 1.0, 2.0, 2.0]
    # KL(behaviour || π_old): ~0 where the engine had the trainer's weights, clearly above it once updates passed
    assert rows[0]["train/behaviour_kl"] < 1e-6
    assert all(row["train/behaviour_kl"] > 100 * max(rows[0]["train/behaviour_kl"], 1e-7) for row in rows[1:])
    assert all(0 < row["train/is_weight_mean"] <= 2.0 for row in rows)
    driver = json.load(open(tmp_path / "run" / "checkpoints" / "step_000002" / "driver.json"))
    assert driver["stream_position"] == 2 * 4      # not 4 batches: steps 3 and 4 were in flight
    assert len({prompt for step in trained["run"] for prompt in step}) == 4 * 4   # 16 different prompts

    resumed = tmp_path / "resumed"   # the run as it was at step 2's checkpoint
    shutil.copytree(tmp_path / "run", resumed)
    for folder in ("checkpoint", "checkpoints/step_000004"):
        shutil.rmtree(resumed / folder)
    monkeypatch.setattr(online_rl, "next_rollout", recording("resumed"))
    train(config("resumed", resume=True))
    assert trained["resumed"] == trained["run"][2:]
    again = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [row["rollout/staleness"] for row in again[2:]] == [0.0, 1.0]   # resampled on resume
