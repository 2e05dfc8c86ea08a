"""The pipelines built on AI feedback, through the real drivers on the tiny model: pipeline=label feeding the
preference and reward-model pipelines, online DPO (rules, and a self-rewarding pairwise judge that follows the
policy), and Constitutional AI critique -> revise -> SFT with a local judge and an HTTP judge that fails."""
import json
import math
import os
from dataclasses import replace

import pytest
import ray
import torch
from safetensors.torch import load_file

from openrlaif.config import (ActorConfig, AlgorithmConfig, CascadeConfig, ClusterConfig, Config, ConstitutionConfig,
                              DataConfig,
                              FeedbackConfig, JudgeConfig, LabelConfig, ModelConfig, OutputConfig, Principle,
                              RoleResources, RolloutConfig, validate)
from openrlaif.data.pairs import load_pairs
from openrlaif.feedback.backends import JudgeRequest
from openrlaif.feedback.judge import JudgeWorker
from openrlaif.feedback.rules import brevity
from openrlaif.pipelines import run
from openrlaif.workers.group import WorkerGroup
from tests.judge_server import JudgeServer

BREVITY = FeedbackConfig(source="function", function="openrlaif.feedback.rules:brevity",
                         function_kwargs={"target_words": 3})


def sampling_config(tiny_model, out_dir, pipeline, feedback, **overrides) -> Config:
    cfg = Config(pipeline=pipeline, steps=2, seed=3, model=ModelConfig(path=tiny_model),
                 data=DataConfig(prompts="demo", prompts_per_step=4),
                 rollout=RolloutConfig(engine="vllm", samples_per_prompt=4, max_new_tokens=12, kv_cache_gib=0.05),
                 actor=ActorConfig(zero_stage=2, lr=1e-3, micro_batch_size=2, resources=RoleResources(num_workers=2)),
                 algorithm=AlgorithmConfig(loss="dpo", beta=0.1), feedback=feedback,
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(out_dir)))
    cfg = replace(cfg, **overrides)
    validate(cfg)
    return cfg


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_label_writes_pairs_the_preference_and_reward_model_pipelines_train_on(ray_cluster, tiny_model,
                                                                              tiny_tokenizer, tmp_path):
    cfg = sampling_config(tiny_model, tmp_path / "label", "label", BREVITY, label=LabelConfig(pairs="all"))
    summary = run(cfg)["metrics"]
    pairs = read_jsonl(summary["pairs_path"])
    assert summary["prompts"] == 17 and summary["pairs"] == len(pairs) > 0
    conversational = 0
    for row in pairs:   # the rule's own verdict, recomputed: chosen is strictly better, scores are what it gives
        if isinstance(row["chosen"], list):   # the demo's one multi-message prompt: TRL's conversational form
            conversational += 1
            assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][0]["role"] == "system"
            row = {**row, "chosen": row["chosen"][-1]["content"], "rejected": row["rejected"][-1]["content"]}
        assert row["chosen"] != row["rejected"] and row["chosen_score"] > row["rejected_score"]
        assert row["chosen_score"] == pytest.approx(brevity([], [row["chosen"]], 3)[0], abs=1e-6)
        assert row["rejected_score"] == pytest.approx(brevity([], [row["rejected"]], 3)[0], abs=1e-6)
    assert conversational < len(pairs)
    ranked = read_jsonl(summary["ranked_path"])   # single-message prompts only
    assert len(ranked) == 16 and all(len(row["responses"]) == len(row["scores"]) == 4 for row in ranked)
    assert len(load_pairs(summary["pairs_path"], tiny_tokenizer, 256, 256)) == len(pairs)

    dpo = replace(cfg, pipeline="preference", data=replace(cfg.data, pairs=summary["pairs_path"], prompts_per_step=4),
                  output=OutputConfig(dir=str(tmp_path / "dpo")))
    validate(dpo)
    rows = read_jsonl(os.path.join(run(dpo)["out_dir"], "metrics.jsonl"))
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)   # policy == reference at step 1
    rm = replace(dpo, pipeline="reward_model", algorithm=AlgorithmConfig(name="bradley_terry"),
                 data=replace(dpo.data, eval_fraction=0.25), output=OutputConfig(dir=str(tmp_path / "rm")))
    validate(rm)
    assert os.path.exists(os.path.join(run(rm)["checkpoint"], "model.safetensors"))


def test_a_cascade_asks_the_judge_only_where_the_rule_is_unsure(ray_cluster, tiny_model, tmp_path):
    """feedback.cascade: brevity scores every sample; the local judge (HF engine) is asked exactly for the samples
    whose brevity score lies inside the band, one request each, and their rewards are the judge's."""
    from openrlaif.feedback.rules import brevity
    feedback = FeedbackConfig(source="judge", judge=JudgeConfig(min_label_mass=0.0, engine="hf", cache=False),
                              cascade=CascadeConfig(source="function", function="openrlaif.feedback.rules:brevity",
                                                    function_kwargs={"target_words": 4}, band=[0.2, 0.8]))
    cfg = sampling_config(tiny_model, tmp_path, "label", feedback, steps=1,
                          data=DataConfig(prompts="demo", prompts_per_step=17),
                          rollout=RolloutConfig(engine="hf", samples_per_prompt=3, max_new_tokens=8),
                          label=LabelConfig(pairs="all", min_gap=0.0))
    run(cfg)
    steps = read_jsonl(tmp_path / "metrics.jsonl")
    ranked = read_jsonl(tmp_path / "ranked.jsonl")
    rule = [s for row in ranked for s in brevity([], row["responses"], 4)]   # 16 of the 17 prompts
    unsure = sum(0.2 <= s <= 0.8 for s in rule)
    escalated = round(steps[0]["feedback/cascade_escalated_fraction"] * 17 * 3)
    assert 0 < unsure < len(rule), rule          # the test needs both kinds of sample
    assert unsure <= escalated <= unsure + 3     # the 17th (multi-message) prompt's 3 samples are not in ranked
    assert steps[0]["feedback/judge_requests"] == escalated   # one pointwise request per escalated sample
    for row in ranked:                           # a confident sample's score is the rule's own
        for response, score in zip(row["responses"], row["scores"]):
            rule_score = brevity([], [response], 4)[0]
            if not 0.2 <= rule_score <= 0.8:
                assert score == pytest.approx(rule_score, abs=1e-6)


def test_label_with_a_strict_pairwise_judge_keeps_only_consistent_verdicts(ray_cluster, tiny_model, tmp_path):
    feedback = FeedbackConfig(source="judge", judge=JudgeConfig(mode="pairwise", min_label_mass=0.0,
                                                                consistency_threshold=1.0))
    cfg = sampling_config(tiny_model, tmp_path, "label", feedback, data=DataConfig(prompts="demo", prompts_per_step=8),
                          rollout=RolloutConfig(engine="hf", samples_per_prompt=3, max_new_tokens=8))
    summary = run(cfg)["metrics"]
    steps = read_jsonl(tmp_path / "metrics.jsonl")
    comparisons = sum(row["feedback/judge_comparisons"] for row in steps)
    assert comparisons == 17 * 3   # 3 pairs in each group of 3
    assert all(0 <= row["feedback/judge_flip_rate"] <= 1 for row in steps)
    # best_worst: each prompt gives one pair or one skip reason (no kept comparison -> too_few_scored)
    assert summary["pairs"] + sum(summary["skipped"].values()) == 17
    for row in steps:   # with repeats=1 a pair is kept exactly when its two orders did not flip
        assert row["feedback/judge_kept_fraction"] == pytest.approx(1 - row["feedback/judge_flip_rate"])
        assert row["feedback/failures"] == row.get("feedback/failures/no_kept_comparison", 0.0)
    for row in read_jsonl(summary["pairs_path"]):
        assert 0 <= row["rejected_score"] < row["chosen_score"] <= 1


def test_online_dpo_with_a_rule_learns_from_its_own_samples(ray_cluster, tiny_model, tmp_path):
    """Three passes (actor.epochs=3) over each round's own labelled pairs, the best answer against each of the
    others (label.pairs=best_vs_rest: up to 3 pairs per prompt of 4 samples): the first pass starts at policy ==
    reference (loss ln 2, margin 0), so a round's mean loss below ln 2 with a positive implicit-reward margin and
    accuracy means the updates moved the policy toward the chosen answers it sampled itself."""
    cfg = sampling_config(tiny_model, tmp_path, "online_dpo", BREVITY, steps=3, label=LabelConfig(pairs="best_vs_rest"),
                          actor=ActorConfig(zero_stage=3, lr=1e-3, micro_batch_size=1, epochs=3,
                                            resources=RoleResources(num_workers=2)))
    result = run(cfg)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert any(row["label/pairs_per_prompt"] > 1 for row in rows)   # several pairs per prompt, at most 3
    for row in rows:
        assert row["label/pairs"] <= 12 and row["label/pairs_per_prompt"] <= 3
        for phase in ("rollout", "feedback", "logprobs", "update", "sync"):
            assert row[f"time/{phase}_s"] > 0
    for row in rows:
        if row["label/pairs"]:
            assert row["train/loss"] < math.log(2) - 0.01, row
            assert row["train/reward_margin"] > 0 and row["train/reward_accuracy"] > 0.5, row
    assert rows[0]["label/pairs"] > 0
    trained = load_file(os.path.join(result["checkpoint"], "model.safetensors"))
    initial = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert any(not torch.equal(initial[name], trained[name]) for name in initial)


def test_iterative_dpo_refreshes_the_reference_to_the_policy_each_round(ray_cluster, tiny_model, tmp_path):
    """reference.update_every=1: each round starts with policy == reference, so its one optimizer step sees the
    DPO loss at exactly ln 2 (margin 0), which a frozen reference would not give in round 2; the reference's
    weights travel in each checkpoint, the last equal to the final policy."""
    from openrlaif.config import ReferenceConfig
    runs = {}
    for every in (1, 0):
        out = tmp_path / f"every-{every}"
        cfg = sampling_config(tiny_model, out, "online_dpo", BREVITY,
                              rollout=RolloutConfig(engine="hf", samples_per_prompt=4, max_new_tokens=8),
                              reference=ReferenceConfig(update_every=every),
                              output=OutputConfig(dir=str(out), checkpoint_every=1))
        run(cfg)
        runs[every] = read_jsonl(out / "metrics.jsonl")
    refreshed, frozen = runs[1], runs[0]
    assert [row.get("reference/refreshed") for row in refreshed] == [1.0, 1.0]
    for row in refreshed:
        assert row["train/loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(row["train/reward_margin"]) < 1e-5
    assert abs(frozen[1]["train/loss"] - math.log(2)) > 1e-4   # round 2 against the starting policy
    saved = load_file(os.path.join(tmp_path, "every-1", "checkpoints", "step_000002", "reference",
                                   "model.safetensors"))
    final = load_file(os.path.join(tmp_path, "every-1", "checkpoint", "model.safetensors"))
    assert all(torch.equal(saved[name], final[name]) for name in final)
    assert not os.path.exists(os.path.join(tmp_path, "every-0", "checkpoints", "step_000002", "reference"))


def test_rejection_sampling_fine_tunes_on_each_prompts_best_answer(ray_cluster, tiny_model, tmp_path):
    """pipeline=rejection_sampling (best-of-N SFT): two rounds of 4 samples per prompt scored by the brevity rule;
    each round keeps the prompts whose best answer reaches the threshold, trains on those answers, and the
    weights move; a threshold no answer reaches keeps none and leaves every weight as it was."""
    from openrlaif.config import RejectionConfig
    results = {}
    for name, threshold in (("kept", None), ("none", 2.0)):   # brevity rewards lie in [0, 1]
        out = tmp_path / name
        cfg = sampling_config(tiny_model, out, "rejection_sampling", BREVITY,
                              rollout=RolloutConfig(engine="hf", samples_per_prompt=4, max_new_tokens=8),
                              rejection=RejectionConfig(threshold=threshold))
        results[name] = (run(cfg), read_jsonl(out / "metrics.jsonl"))
    initial = load_file(os.path.join(tiny_model, "model.safetensors"))
    (kept_result, kept_rows), (none_result, none_rows) = results["kept"], results["none"]
    assert [row["rejection/kept"] for row in kept_rows] == [4.0, 4.0] and all(row["train/loss"] > 0 for row in kept_rows)
    assert all(0 <= row["rejection/kept_reward_mean"] <= 1 for row in kept_rows)
    trained = load_file(os.path.join(kept_result["checkpoint"], "model.safetensors"))
    assert any(not torch.equal(initial[name], trained[name]) for name in initial)
    assert [row["rejection/kept"] for row in none_rows] == [0.0, 0.0] and all(row["train/loss"] == 0 for row in none_rows)
    untouched = load_file(os.path.join(none_result["checkpoint"], "model.safetensors"))
    assert all(torch.equal(initial[name], untouched[name]) for name in initial)


def test_self_rewarding_online_dpo_the_judge_follows_the_policy(ray_cluster, tiny_model, tmp_path):
    """Pairwise self-judging on a vLLM judge: after the run the judge group answers exactly like a fresh judge
    loaded from the final checkpoint, so every weight sync reached it."""
    from openrlaif.pipelines.online_dpo import train_loop
    from openrlaif.roles import prepare_run, start_roles
    feedback = FeedbackConfig(source="judge", judge=JudgeConfig(mode="pairwise", min_label_mass=0.0,
                                                                follow_policy=True, kv_cache_gib=0.05))
    cfg = sampling_config(tiny_model, tmp_path, "online_dpo", feedback,
                          rollout=RolloutConfig(engine="vllm", samples_per_prompt=3, max_new_tokens=8,
                                                kv_cache_gib=0.05),
                          output=OutputConfig(dir=str(tmp_path), checkpoint_every=2))
    run_inputs = prepare_run(cfg)
    roles = start_roles(cfg, run_inputs)
    request = JudgeRequest([{"role": "user", "content": "Which is better? A or B"}], ["A", "B"])
    try:
        before = ray.get(roles.judge.workers[0].complete.remote([request]))[0].label_probs
        checkpoint, metrics, _ = train_loop(cfg, run_inputs, roles)
        after = ray.get(roles.judge.workers[0].complete.remote([request]))[0].label_probs
    finally:
        roles.shutdown()
    assert metrics["feedback/judge_comparisons"] == 4 * 3 and math.isfinite(metrics["train/loss"])
    # the judge follows rollout.engine: a vLLM judge, which took every sync the way the rollout engines do
    fresh = WorkerGroup("fresh-judge", JudgeWorker, RoleResources(), lambda rank: dict(
        model_path=checkpoint, dtype="float32", threads=1, seed=0, engine="vllm", kv_cache_gib=0.05))
    try:
        expected = ray.get(fresh.workers[0].complete.remote([request]))[0].label_probs
    finally:
        fresh.shutdown()
    assert after != before
    assert after == pytest.approx(expected, abs=1e-5)
    # verdicts are cached per run and policy version: two steps, two versions of keys, none reused across steps;
    # the run id is in the resumable checkpoint, so a resume (and only a resume) reuses this run's verdicts
    assert metrics["feedback/judge_cache_hits"] == 0
    driver = json.load(open(tmp_path / "checkpoints" / "step_000002" / "driver.json"))
    assert driver["judge_run_id"] == roles.judge_client.run_id


def test_constitutional_critique_revise_then_sft(ray_cluster, tiny_model, tmp_path):
    cfg = sampling_config(tiny_model, tmp_path, "constitutional", FeedbackConfig(), steps=2,
                          data=DataConfig(prompts="demo", prompts_per_step=8, max_response_tokens=32),
                          rollout=RolloutConfig(engine="hf", samples_per_prompt=1, max_new_tokens=10),
                          constitution=ConstitutionConfig(revisions=2, max_new_tokens=12))
    result = run(cfg)
    summary = json.load(open(tmp_path / "constitutional.json"))
    rows = read_jsonl(tmp_path / "revisions.jsonl")
    assert summary["responses"] == 17 and summary["revised"] == len(rows)
    assert summary["revised"] + sum(summary["failures"].values()) == 17
    assert summary["judge_requests"] >= 17 * 2   # every response was critiqued and revised at least once
    for row in rows:
        assert row["response"].strip() and len(row["critiques"]) == len(row["principles"]) == 2
        assert all(0 <= p < len(cfg.constitution.principles) for p in row["principles"])
    sft_rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in sft_rows] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in sft_rows)
    assert os.path.exists(os.path.join(result["checkpoint"], "model.safetensors"))


def test_constitutional_with_an_http_judge_drops_failed_critiques(ray_cluster, tiny_model, tmp_path, monkeypatch):
    """One of two principles makes the endpoint answer 500: exactly those responses are dropped and counted."""
    server = JudgeServer(tiny_model).start()
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    try:
        judge = JudgeConfig(backend="http", base_url=server.base_url, model="judge", max_retries=0, timeout_s=20)
        principles = [Principle("Point out mistakes.", "Fix them."), Principle("FAULT:error500 critique", "Fix.")]
        cfg = sampling_config(tiny_model, tmp_path, "constitutional", FeedbackConfig(judge=judge),
                              data=DataConfig(prompts="demo", prompts_per_step=8),
                              rollout=RolloutConfig(engine="hf", samples_per_prompt=1, max_new_tokens=8),
                              constitution=ConstitutionConfig(principles=principles, max_new_tokens=8, train=False))
        summary = run(cfg)["metrics"]
    finally:
        server.shutdown()
    rows = read_jsonl(tmp_path / "revisions.jsonl")
    faulty = server.faults["error500"]
    assert 0 < faulty < 17 and summary["failures"].get("endpoint_error") == faulty
    assert summary["revised"] + sum(summary["failures"].values()) == 17
    assert all(row["principles"] == [0] for row in rows)
    assert "unused" not in json.dumps(summary)


def test_label_with_repeat_ranking_keeps_the_most_consistent_prompts(ray_cluster, tiny_model, tmp_path, monkeypatch):
    """A listwise HTTP judge ranks each group 4 times in shuffled orders. On half the prompts it follows the
    presentation order (inconsistent: Kendall's W < 1), on the rest it ranks by content (W = 1);
    label.keep_top_fraction=0.5 keeps exactly the consistent half, best vs worst mean rank."""
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    prompts = tmp_path / "prompts.jsonl"
    texts = [f"name a fruit {i}" for i in range(3)] + [f"FAULT:positional name a tree {i}" for i in range(3)]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    server = JudgeServer(tiny_model).start()
    try:
        judge = JudgeConfig(backend="http", base_url=server.base_url, model="judge", mode="listwise",
                            readout="generate", max_new_tokens=32, rankings=4, max_retries=0)
        cfg = sampling_config(tiny_model, tmp_path / "run", "label", FeedbackConfig(judge=judge),
                              data=DataConfig(prompts=str(prompts), prompts_per_step=3, shuffle=False),
                              rollout=RolloutConfig(engine="hf", samples_per_prompt=3, max_new_tokens=12),
                              label=LabelConfig(keep_top_fraction=0.5))
        summary = run(cfg)["metrics"]
        # online DPO with the same judge: each step trains only on its most consistently ranked prompts
        online = sampling_config(tiny_model, tmp_path / "online", "online_dpo", FeedbackConfig(judge=judge), steps=1,
                                 data=DataConfig(prompts=str(prompts), prompts_per_step=6, shuffle=False),
                                 rollout=RolloutConfig(engine="hf", samples_per_prompt=3, max_new_tokens=12),
                                 actor=ActorConfig(lr=1e-3, micro_batch_size=6),
                                 label=LabelConfig(keep_top_fraction=0.5))
        online_row = run(online)["metrics"]
    finally:
        server.shutdown()
    assert online_row["label/pairs"] <= 3 and online_row["label/skipped/low_consistency"] >= 2
    assert online_row["label/pairs"] + sum(v for k, v in online_row.items() if k.startswith("label/skipped/")) == 6
    label = json.load(open(tmp_path / "run" / "label.json"))
    by_prompt = {row["prompt"]: row for row in label["kendalls_w"]}
    assert len(by_prompt) == 6 and label["keep_top_fraction"] == 0.5
    for text, row in by_prompt.items():
        consistent = not text.startswith("FAULT")
        assert (row["w"] == pytest.approx(1.0)) == consistent and row["kept"] == consistent, (text, row)
    pairs = read_jsonl(summary["pairs_path"])
    assert {row["prompt"] for row in pairs} <= {t for t in texts if not t.startswith("FAULT")}
    assert summary["skipped"].get("low_consistency", 0) + len(pairs) + summary["skipped"].get("identical", 0) \
        + summary["skipped"].get("tie", 0) == 6
    for row in pairs:   # the rule ranks the shortest response first: chosen is the best mean rank (score 1)
        assert len(row["chosen"]) <= len(row["rejected"]) and row["chosen_score"] == 1.0
    steps = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert sum(row["feedback/judge_rankings"] for row in steps) == 6 * 4
