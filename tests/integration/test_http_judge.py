"""The HTTP judge against a real OpenAI-compatible server on 127.0.0.1 (tests/judge_server.py around the tiny
model), with injected faults; swap debiasing against an always-"A" judge; the verdict cache; a GRPO run whose
judge endpoint fails on some prompts and never crashes the run."""
import json
import math

import pytest

from openrlaif.config import (ActorConfig, AlgorithmConfig, ClusterConfig, Config, DataConfig, FeedbackConfig,
                              JudgeConfig, ModelConfig, OutputConfig, RolloutConfig, validate)
from openrlaif.feedback.backends import HTTPBackend
from openrlaif.feedback.judge import Judge
from tests.judge_server import JudgeServer


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = JudgeServer(tiny_model, slow_s=2.0, api_key="sk-test-123").start()
    yield srv
    srv.shutdown()


def http_judge(server, tmp_path=None, **overrides) -> Judge:
    settings = dict(backend="http", base_url=server.base_url, model="judge", api_key_env="TEST_JUDGE_KEY",
                    timeout_s=0.5, max_retries=0, backoff_s=0.01, concurrency=4, min_label_mass=0.0, top_logprobs=1000)
    cfg = JudgeConfig(**(settings | overrides))
    backend = HTTPBackend(cfg.base_url, cfg.model, cfg.api_key_env, cfg.timeout_s, cfg.max_retries, cfg.backoff_s,
                          cfg.concurrency, cfg.top_logprobs, cfg.requests_per_minute, cfg.tokens_per_minute,
                          cfg.max_rate_limit_waits)
    return Judge(backend, cfg, str(tmp_path / "cache.jsonl") if tmp_path else None)


def test_a_429_is_waited_out_for_its_retry_after_and_counted_apart_from_retries(server, monkeypatch):
    """Two 429s with Retry-After: 1, then an answer: the verdict arrives after ~2 s without using a retry
    (max_retries=0); with max_rate_limit_waits=1 the second 429 makes it an endpoint_error that says so."""
    import time
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    start = time.perf_counter()
    result = http_judge(server, backoff_s=5.0).pointwise(["FAULT:ratelimit wait for me"], ["ok"])
    assert bool(result.valid.all()) and 2.0 <= time.perf_counter() - start < 4.5   # Retry-After, not the backoff
    assert result.metrics["judge_rate_limited"] == 2 and result.metrics["judge_retries"] == 0
    impatient = http_judge(server, max_rate_limit_waits=1).pointwise(["FAULT:ratelimit not for me"], ["ok"])
    assert impatient.failures == {"endpoint_error": 1}
    assert "429" in impatient.details["endpoint_error"] and "max_rate_limit_waits" in impatient.details["endpoint_error"]


def test_a_client_side_request_rate_is_kept(server, monkeypatch):
    """requests_per_minute=60 with a full first minute: 60 go at once, the 61st and 62nd wait ~1 s each."""
    import time

    from openrlaif.feedback.backends import TokenBucket
    bucket = TokenBucket(60)
    start = time.perf_counter()
    for _ in range(62):
        bucket.take(1)
    assert 1.6 <= time.perf_counter() - start < 3.0


def test_injected_faults_are_masked_and_counted_exactly(server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    prompts = ["what is the sun"] * 2 + ["FAULT:slow", "FAULT:error500", "FAULT:error500", "FAULT:garbage",
                                         "FAULT:truncated"]
    responses = ["a star", "a ball of gas", "x", "y", "z", "w", "v"]
    result = http_judge(server).pointwise(prompts, responses)
    assert result.valid.tolist() == [True, True, False, False, False, False, False]
    assert dict(result.failures) == {"timeout": 1, "endpoint_error": 2, "unparseable": 1, "bad_response": 1}
    assert ((result.rewards[:2] >= 0) & (result.rewards[:2] <= 1)).all()
    assert result.metrics["judge_prompt_tokens"] > 0


def test_a_cut_http_body_or_a_garbled_status_line_is_a_retried_bad_response(server, monkeypatch):
    """http.client's IncompleteRead / BadStatusLine are HTTPExceptions, not OSErrors: they are a broken transfer,
    retried, then masked and counted; they never crash the run."""
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    before = dict(server.faults)
    result = http_judge(server, max_retries=2).pointwise(["FAULT:cutbody", "FAULT:badstatus", "what is the sun"],
                                                         ["x", "y", "a star"])
    assert result.valid.tolist() == [False, False, True]
    assert result.failures == {"bad_response": 2}
    assert result.metrics["judge_retries"] == 4     # each broken reply was sent three times
    assert server.faults["cutbody"] - before.get("cutbody", 0) == 3
    assert server.faults["badstatus"] - before.get("badstatus", 0) == 3


@pytest.mark.parametrize("reply,score", [("The response makes 2 small mistakes, so: 6", 6), ("Rating (1-9): 8", 8),
                                         ("It is fine.\nScore: 3", 3)])
def test_the_generate_readout_reads_the_verdict_of_a_reasoned_reply(tiny_model, reply, score):
    """An endpoint whose every reply is `reply`: the reward is that verdict on the scale, for every sample."""
    judge_server = JudgeServer(tiny_model, always=reply).start()
    try:
        result = http_judge(judge_server, readout="generate", max_new_tokens=32).pointwise(["q1", "q2"], ["a", "b"])
    finally:
        judge_server.shutdown()
    assert bool(result.valid.all()) and result.rewards.tolist() == pytest.approx([(score - 1) / 8] * 2)


def test_retries_with_backoff_recover_a_transient_error(server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    before = server.faults["error500once"]
    result = http_judge(server, max_retries=2).pointwise(["FAULT:error500once retry me"], ["ok"])
    assert bool(result.valid.all()) and result.metrics["judge_retries"] == 1
    assert server.faults["error500once"] == before + 1


def files_holding(folder, secret: str) -> list[str]:
    import os
    found = []
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            try:
                with open(path, "rb") as handle:
                    if secret.encode() in handle.read():
                        found.append(path)
            except OSError:
                continue
    return found


def test_a_wrong_key_is_an_endpoint_error_and_the_key_is_never_written(ray_cluster, server, monkeypatch, tmp_path,
                                                                      capsys, tiny_model):
    """A wrong key: a typed endpoint_error per verdict, and a start-up error (the probe) for a run. A right key:
    judge-eval runs. Neither key appears in stdout, stderr, the error, any file under the output dir (config,
    report, verdict cache, metrics) or the Ray session's logs."""
    import ray

    from openrlaif.config import ConfigError
    from openrlaif.pipelines import run
    wrong, right = "sk-WRONG-7c1e9d", "sk-test-123"
    monkeypatch.setenv("TEST_JUDGE_KEY", wrong)
    result = http_judge(server).pointwise(["hi"], ["hello"])
    assert result.failures == {"endpoint_error": 1} and "HTTP 401" in result.details["endpoint_error"]
    settings = dict(backend="http", base_url=server.base_url, model="judge", api_key_env="TEST_JUDGE_KEY",
                    mode="pairwise", min_label_mass=0.0, top_logprobs=1000, max_retries=0)
    cfg = Config(pipeline="judge_eval", model=ModelConfig(path=tiny_model),
                 feedback=FeedbackConfig(source="judge", judge=JudgeConfig(**settings)),
                 output=OutputConfig(dir=str(tmp_path / "eval")))
    validate(cfg)
    with pytest.raises(ConfigError, match="HTTP 401") as raised:
        run(cfg)
    monkeypatch.setenv("TEST_JUDGE_KEY", right)
    report = run(cfg)["metrics"]
    assert report["judged"] == 13
    printed = capsys.readouterr()
    session_logs = ray._private.worker._global_node.get_session_dir_path()
    for secret in (wrong, right):
        assert secret not in str(raised.value) + printed.out + printed.err
        assert not files_holding(tmp_path, secret) and not files_holding(session_logs, secret)


def test_swap_debiasing_cancels_a_judge_that_always_answers_a(tiny_model, monkeypatch):
    biased = JudgeServer(tiny_model, always="A").start()
    try:
        judge = http_judge(biased, mode="pairwise")
        comparisons = judge.compare(["q1", "q2", "q3"], ["good", "bad", "x"], ["bad", "good", "y"])
        assert comparisons.prob == [0.5, 0.5, 0.5] and comparisons.flips == 3 and comparisons.judged == 3
        # the pairwise consistency filter: the two orders disagree on the winner, so nothing is kept at threshold 1
        strict = http_judge(biased, mode="pairwise", consistency_threshold=1.0)
        assert strict.compare(["q1"], ["good"], ["bad"]).kept == [False]
        rewards = http_judge(biased, mode="pairwise").score(["p"] * 3, ["r1", "r2", "r3"])
        assert rewards.rewards.tolist() == [0.5, 0.5, 0.5]
        assert rewards.metrics["judge_flip_rate"] == 1.0 and rewards.metrics["judge_comparisons"] == 3
    finally:
        biased.shutdown()


def test_verdict_cache_reuses_verdicts_exactly_across_judges(server, monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    prompts, responses = ["what is the sun", "say hi", "FAULT:error500"], ["a star", "hi", "x"]
    first = http_judge(server, tmp_path).pointwise(prompts, responses)
    requests_before = server.requests
    second = http_judge(server, tmp_path).pointwise(prompts, responses)   # a new judge, as after a resume
    assert second.rewards.tolist() == first.rewards.tolist()
    assert second.metrics["judge_cache_hits"] == 2
    assert server.requests == requests_before + 1   # only the failed verdict is asked again


def test_grpo_with_an_http_judge_that_fails_on_some_prompts(ray_cluster, tiny_model, server, monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    prompts = tmp_path / "prompts.jsonl"
    rows = ["what is the sun", "name a color", "FAULT:error500 say hi", "FAULT:garbage count to three"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    judge = JudgeConfig(backend="http", base_url=server.base_url, model="judge", api_key_env="TEST_JUDGE_KEY",
                        timeout_s=5, max_retries=1, backoff_s=0.01, min_label_mass=0.0, top_logprobs=1000,
                        mode="pairwise")
    cfg = Config(steps=2, seed=0, model=ModelConfig(path=tiny_model),
                 data=DataConfig(prompts=str(prompts), prompts_per_step=4, shuffle=False),
                 rollout=RolloutConfig(engine="hf", samples_per_prompt=2, max_new_tokens=8),
                 actor=ActorConfig(lr=1e-3, micro_batch_size=4), algorithm=AlgorithmConfig(kl_coef=0.0),
                 feedback=FeedbackConfig(source="judge", judge=judge),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(tmp_path / "run")))
    validate(cfg)
    from openrlaif.pipelines import run
    run(cfg)
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    for row in metrics:   # each failing prompt: 1 comparison of its 2 samples fails -> both samples masked
        assert row["feedback/failures"] == 4
        assert row["feedback/failures/no_kept_comparison"] == 4
        assert row["feedback/comparison_failures/endpoint_error"] == 1
        assert row["feedback/comparison_failures/unparseable"] == 1
        assert row["feedback/judge_flip_rate"] >= 0 and math.isfinite(row["train/loss"])
    assert metrics[0]["feedback/judge_comparisons"] == 4


def endpoint_run(tiny_model, tmp_path, base_url, prompts, **judge) -> Config:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    settings = dict(backend="http", base_url=base_url, model="judge", api_key_env="TEST_JUDGE_KEY", timeout_s=5,
                    max_retries=0, min_label_mass=0.0, top_logprobs=1000) | judge
    cfg = Config(steps=4, seed=0, model=ModelConfig(path=tiny_model),
                 data=DataConfig(prompts=str(path), prompts_per_step=2, shuffle=False),
                 rollout=RolloutConfig(engine="hf", samples_per_prompt=2, max_new_tokens=4),
                 actor=ActorConfig(lr=1e-3, micro_batch_size=4), algorithm=AlgorithmConfig(kl_coef=0.0),
                 feedback=FeedbackConfig(source="judge", judge=JudgeConfig(**settings), max_failed_steps=2),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=str(tmp_path / "run")))
    validate(cfg)
    return cfg


def test_an_endpoint_that_is_down_is_a_start_up_error(tiny_model, tmp_path, monkeypatch, capsys):
    """Nothing listens on the port: one probe request, an error naming the URL and the cause, before Ray starts."""
    from openrlaif.config import ConfigError
    from openrlaif.pipelines import run
    from tests.e2e.test_launchers import free_port
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ConfigError, match=rf"feedback.judge.base_url={url}: the endpoint did not answer a probe "
                                          r"request \(endpoint_error: .*Connection refused"):
        run(endpoint_run(tiny_model, tmp_path, url, ["hi", "ho"]))
    assert "$TEST_JUDGE_KEY (feedback.judge.api_key_env) is not set" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_a_run_whose_every_verdict_fails_stops_and_says_why(ray_cluster, tiny_model, server, monkeypatch, tmp_path,
                                                            capsys):
    """The endpoint answers the probe but every verdict of these prompts gets HTTP 500: each step prints the
    cause, and after feedback.max_failed_steps=2 such steps the run stops (exit 1 from the CLI) without writing a
    final checkpoint, instead of training 4 steps on nothing and exiting 0."""
    from openrlaif.checkpointing import RunError
    from openrlaif.pipelines import run
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    with pytest.raises(RunError, match=r"step 2: every sample's feedback failed in each of the last 2 steps "
                                       r"\(endpoint_error ×4"):
        run(endpoint_run(tiny_model, tmp_path, server.base_url, ["FAULT:error500 a", "FAULT:error500 b"]))
    assert "feedback failed for 4 sample(s): endpoint_error: HTTP 500" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_judge_eval_with_nothing_judged_fails_instead_of_reporting_numbers(ray_cluster, tiny_model, server,
                                                                          monkeypatch, tmp_path):
    from openrlaif.checkpointing import RunError
    from openrlaif.pipelines import run
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"FAULT:error500 q{i}", "chosen": "a", "rejected": "b"}) + "\n"
                             for i in range(3)))
    settings = dict(backend="http", base_url=server.base_url, model="judge", api_key_env="TEST_JUDGE_KEY",
                    mode="pairwise", min_label_mass=0.0, top_logprobs=1000, max_retries=0)
    cfg = Config(pipeline="judge_eval", model=ModelConfig(path=tiny_model), data=DataConfig(pairs=str(pairs)),
                 feedback=FeedbackConfig(source="judge", judge=JudgeConfig(**settings)),
                 output=OutputConfig(dir=str(tmp_path / "eval")))
    validate(cfg)
    with pytest.raises(RunError, match=r"nothing was judged: all 3 pairs failed .*endpoint_error: HTTP 500"):
        run(cfg)
    report = json.loads((tmp_path / "eval" / "judge_eval.json").read_text())
    assert report["judged"] == 0 and report["agreement"] is None and report["position_consistency"] is None


def test_a_spent_judge_budget_stops_the_run_with_a_checkpoint_that_resumes(ray_cluster, tiny_model, server,
                                                                            monkeypatch, tmp_path):
    """budget.tokens_total: the judge scores the groups that fit, masks the rest `over_budget`, and once the total
    cannot fit a group the run saves a checkpoint and stops naming the key; raised, the run resumes there with
    the spend so far carried over (driver.json's judge ledger), priced by the configured rates."""
    from dataclasses import replace

    from openrlaif.checkpointing import RunError
    from openrlaif.config import JudgeBudget
    from openrlaif.pipelines import run
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    cfg = endpoint_run(tiny_model, tmp_path, server.base_url, ["what is the sun", "name a color"],
                       budget=JudgeBudget(tokens_total=2600), price_per_mtok_prompt=1.0,
                       price_per_mtok_completion=4.0)
    with pytest.raises(RunError, match=r"feedback.judge.budget.tokens_total.*resume=true") as err:
        run(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    stopped = rows[-1]["step"]
    assert 1 <= stopped < 4 and f"step_{stopped:06d}" in str(err.value)
    assert any(row.get("feedback/failures/over_budget", 0) > 0 for row in rows)
    assert rows[-1]["feedback/judge_tokens_total"] <= 2600
    for row in rows:
        spent = row.get("feedback/judge_prompt_tokens", 0) + 4 * row.get("feedback/judge_generated_tokens", 0)
        assert row["feedback/judge_cost"] == pytest.approx(spent / 1e6)
    judge = replace(cfg.feedback.judge, budget=JudgeBudget(tokens_total=10**6))
    run(replace(cfg, resume=True, feedback=replace(cfg.feedback, judge=judge)))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[stopped]["feedback/judge_tokens_total"] > rows[stopped - 1]["feedback/judge_tokens_total"]
    assert rows[stopped]["feedback/failure_rate"] == 0.0
