"""The CLI as a user runs it: bad input fails at start-up with the key and the fix; a tiny run succeeds."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.unit.test_metrics_writers import tensorboard_scalars, wandb_history

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args, env_extra=None, timeout=300, unset=()):
    env = {k: v for k, v in dict(os.environ, **(env_extra or {})).items() if k not in unset}
    return subprocess.run([sys.executable, "-m", "openrlaif", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cache_env(model_cache, tiny_model):
    return {"OPENRLAIF_CACHE": model_cache}


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0 and "train" in out.stdout


def test_unknown_command():
    out = cli("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


@pytest.mark.parametrize("args,needle", [
    (["model.path=/no/such/model"], "model.path='/no/such/model' is neither"),
    (["actor.nonsense=1"], "nonsense"),
    (["actor.lr=fast"], "actor.lr"),
    (["rollout.engine=magic"], "rollout.engine='magic' is not one of"),
    (["data.prompts=/no/prompts.jsonl", "model=tiny"], "data.prompts='/no/prompts.jsonl': no such file"),
    (["+data.promts=my.jsonl"], "data.promts is not a configuration key. Did you mean data.prompts?"),
    (["model=tiny", "data.max_prompt_tokens=100000"], "tokens, more than the 1024 positions of model.path="),
    (["algorithm.kl_coef=inf"], "algorithm.kl_coef=inf must be a finite number"),
    (["algorithm.clip_eps=-1"], "algorithm.clip_eps=-1.0 must be in (0, 1]"),
    (["feedback=judge_http", "feedback.judge.base_url=ftp://judge:8000/v1"], "is not an http:// or https:// URL"),
    (["model=tiny", "feedback=function", "feedback.function=tests.unit.test_models_and_rules:half_known",
      "+feedback.function_kwargs.target_words=20"], "cannot be called as half_known(prompts, responses, target_words"),
])
def test_bad_input_fails_at_start_up_naming_the_key(cache_env, args, needle, tmp_path):
    out = cli("train", f"output.dir={tmp_path}", *args, env_extra=cache_env)
    assert out.returncode != 0
    assert needle in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


def test_empty_and_malformed_prompt_files(cache_env, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{oops}\n')
    out = cli("train", "model=tiny", f"data.prompts={empty}", f"output.dir={tmp_path}/a", env_extra=cache_env)
    assert out.returncode == 2 and "holds no prompts" in out.stderr
    out = cli("train", "model=tiny", f"data.prompts={bad}", f"output.dir={tmp_path}/b", env_extra=cache_env)
    assert out.returncode == 2 and "bad.jsonl:2: not valid JSON" in out.stderr


def test_tiny_run_listens_on_loopback_only_then_refuses_to_overwrite_without_consent(cache_env, tmp_path):
    """Run as a user runs it, without the Makefile's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, with a stale RAY_ADDRESS
    and README's user-function pattern (`def f(prompts, responses)`, no kwargs): the local cluster's node IP is
    127.0.0.1 and no socket of the run's process tree (Ray's servers and agents, the workers, vLLM,
    the DeepSpeed rendezvous and gloo) listens outside loopback, read from /proc by the reward function while
    the cluster is up."""
    record = tmp_path / "listeners.json"
    args = ["train", "model=tiny", "feedback=function", "feedback.function=tests.integration.rewards:record_listeners",
            "algorithm=reinforce_pp_baseline", "steps=1", "rollout.engine=vllm", "rollout.max_new_tokens=8",
            "rollout.kv_cache_gib=0.05", "data.prompts_per_step=2", "rollout.samples_per_prompt=2",
            "actor.micro_batch_size=2", f"output.dir={tmp_path}"]
    # RAY_ADDRESS names a cluster that is not there: a local run starts its own anyway
    out = cli(*args, env_extra=cache_env | {"OPENRLAIF_TEST_LISTENERS": str(record), "RAY_ADDRESS": "127.0.0.1:9"},
              timeout=600, unset=("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",))
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(record.read_text())
    assert seen["node_ip"] == "127.0.0.1"
    assert len(seen["listening"]) >= 5   # GCS, raylet, object manager, agents: they were found
    outside = [(ip, port) for ip, port in seen["listening"] if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not outside, f"listening outside loopback: {outside}"
    assert os.path.isfile(tmp_path / "checkpoint" / "config.json")
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 1
    assert "step 1:" in out.stdout + out.stderr
    before = os.path.getmtime(tmp_path / "checkpoint" / "model.safetensors")

    again = cli(*args, env_extra=cache_env | {"OPENRLAIF_TEST_LISTENERS": str(record)})
    assert again.returncode == 2 and "output.overwrite=true" in again.stderr
    assert os.path.getmtime(tmp_path / "checkpoint" / "model.safetensors") == before


def test_one_run_per_folder_resume_needs_a_checkpoint_and_overwrite_starts_over(cache_env, tmp_path):
    """As users met them: a second run into a folder in use is refused (they used to interleave); resume=true with
    nothing to resume stops, naming what it found, and leaves the finished model alone (it used to retrain from
    the base model over it); output.overwrite=true starts metrics.jsonl over (it used to append)."""
    args = ["train", "model=tiny", "feedback=function", "steps=2", "rollout.engine=hf", "rollout.max_new_tokens=8",
            "data.prompts_per_step=2", "rollout.samples_per_prompt=2", "actor.micro_batch_size=2",
            f"output.dir={tmp_path}"]
    first = subprocess.Popen([sys.executable, "-m", "openrlaif", *args], cwd=ROOT, env=dict(os.environ, **cache_env),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "config.yaml").exists():   # written once the folder is claimed
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.2)
    second = cli(*args, env_extra=cache_env)
    assert second.returncode == 2 and f"is in use by another run (pid {first.pid})" in second.stderr, second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert not (tmp_path / ".hydra").exists() and not (tmp_path / "cli.log").exists()   # nothing but ours
    model = tmp_path / "checkpoint" / "model.safetensors"
    before = os.path.getmtime(model)

    resumed = cli(*args, "resume=true", "actor.lr=1e-3", env_extra=cache_env)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert "holds no resumable checkpoint: it has a final checkpoint (checkpoint/)" in resumed.stderr
    assert os.path.getmtime(model) == before

    again = cli(*args, "output.overwrite=true", env_extra=cache_env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]
    assert os.path.getmtime(model) > before


def test_ctrl_c_stops_with_the_way_on_not_a_traceback(cache_env, tmp_path):
    """Interrupted while step 2's feedback is held (its reward function waits for a file that never comes), after
    step 1's checkpoint: the same point on any machine, however fast (polling for the checkpoint once missed it)."""
    release = tmp_path / "release"
    args = ["train", "model=tiny", "feedback=function", "feedback.function=tests.integration.rewards:hold_at_step",
            "steps=50", "rollout.engine=hf", "rollout.max_new_tokens=8",
            "data.prompts_per_step=2", "rollout.samples_per_prompt=2", "actor.micro_batch_size=2",
            "output.checkpoint_every=1", f"output.dir={tmp_path / 'run'}"]
    # SIGINT as a terminal delivers it: a shell without job control starts background jobs (a test stream run
    # with `&`) with SIGINT ignored, and Python then never raises KeyboardInterrupt
    run = subprocess.Popen([sys.executable, "-m", "openrlaif", *args], cwd=ROOT,
                           env=dict(os.environ, **cache_env, OPENRLAIF_TEST_RELEASE=str(release)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not os.path.exists(str(release) + ".held"):
            assert run.poll() is None, run.communicate()[1][-3000:]
            time.sleep(0.1)
        assert (tmp_path / "run" / "checkpoints" / "step_000001" / "driver.json").exists()
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:   # never left behind holding its cluster
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode in (1, 130), err[-3000:]
    assert "interrupted" in err and "resume=true" in err and "Traceback" not in err, err[-3000:]


def test_preference_pipeline_from_the_cli_logs_to_tensorboard_and_wandb(cache_env, tmp_path):
    wandb_env = {"WANDB_CONFIG_DIR": str(tmp_path / "wandb-home"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-home"),
                 "WANDB_DATA_DIR": str(tmp_path / "wandb-home"), "WANDB_SILENT": "true"}
    out = cli("train", "pipeline=preference", "algorithm=simpo", "model=tiny", "steps=2", "data.pairs=demo",
              "data.prompts_per_step=4", "actor.micro_batch_size=2", f"output.dir={tmp_path}",
              "output.loggers=[tensorboard,wandb]", "output.wandb.mode=offline", env_extra=cache_env | wandb_env,
              timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2
    assert os.path.isfile(tmp_path / "checkpoint" / "model.safetensors")
    losses = [(row["step"], row["train/loss"]) for row in rows]
    board = [(step, value) for step, tag, value, _ in tensorboard_scalars(tmp_path) if tag == "train/loss"]
    assert [step for step, _ in board] == [1, 2]
    assert [value for _, value in board] == pytest.approx([loss for _, loss in losses], rel=1e-6)   # float32 there
    history = [(row["step"], row["train/loss"]) for row in wandb_history(tmp_path, len(losses))]
    assert history == losses


def test_preference_pipeline_bad_input(cache_env, tmp_path):
    out = cli("train", "pipeline=preference", "algorithm=cdpo", "algorithm.label_smoothing=0", "model=tiny",
              f"output.dir={tmp_path}", env_extra=cache_env)
    assert out.returncode == 2 and "algorithm.label_smoothing > 0" in out.stderr
    out = cli("train", "pipeline=preference", "model=tiny", "data.pairs=/no/pairs.jsonl", f"output.dir={tmp_path}",
              env_extra=cache_env)
    assert out.returncode == 2 and "data.pairs='/no/pairs.jsonl': no such file" in out.stderr


def test_sft_bad_input(cache_env, tmp_path):
    out = cli("train", "pipeline=sft", "model=tiny", "data.sft=/no/sft.jsonl", f"output.dir={tmp_path}",
              env_extra=cache_env)
    assert out.returncode == 2 and "data.sft='/no/sft.jsonl': no such file" in out.stderr


def test_judge_eval_reports_agreement_consistency_and_failures(cache_env, tiny_model, tmp_path):
    """Against endpoints whose answers are known: one prefers the shorter response wherever it stands (on pairs
    whose gold answer is the shorter one: agreement 1, consistency 1), one always answers "A" (P(chosen) 0.5 after
    the swap, agreement 0, consistency 0); and the local tiny judge end to end. Swapping agreement and consistency,
    or reading P(A) as P(B), fails one of them."""
    from tests.judge_server import JudgeServer
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "short", "rejected": "a longer answer " * (i + 1)})
                             + "\n" for i in range(4)))
    expected = {"shorter": {"agreement": 1.0, "mean_p_chosen": 1.0, "position_consistency": 1.0},
                "always A": {"agreement": 0.0, "mean_p_chosen": 0.5, "position_consistency": 0.0}}
    for name, server in (("shorter", JudgeServer(tiny_model, prefer="shorter")),
                         ("always A", JudgeServer(tiny_model, always="A"))):
        server.start()
        try:
            out = cli("judge-eval", "model=tiny", "feedback=judge_http", f"feedback.judge.base_url={server.base_url}",
                      "feedback.judge.mode=pairwise", "feedback.judge.min_label_mass=0", f"data.pairs={pairs}",
                      f"output.dir={tmp_path / name}", env_extra=cache_env)
        finally:
            server.shutdown()
        assert out.returncode == 0, out.stderr[-2000:]
        report = json.loads((tmp_path / name / "judge_eval.json").read_text())
        assert report["pairs"] == report["judged"] == 4 and report["failure_rate"] == 0.0
        assert {key: report[key] for key in expected[name]} == expected[name], (name, report)
    out = cli("judge-eval", "model=tiny", "feedback=judge_pairwise", "feedback.judge.min_label_mass=0",
              f"output.dir={tmp_path / 'local'}", "cluster.num_cpus=2", env_extra=cache_env)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "local" / "judge_eval.json").read_text())
    assert report["pairs"] == 13 and report["judged"] == 13 and report["failure_rate"] == 0.0
    assert "agree" in out.stdout


def test_judge_eval_with_a_bad_endpoint_config_names_the_fix(cache_env, tmp_path):
    out = cli("judge-eval", "model=tiny", "feedback=judge_http", "feedback.judge.base_url=", f"output.dir={tmp_path}",
              env_extra=cache_env)
    assert out.returncode == 2 and "feedback.judge.base_url" in out.stderr


def test_self_rewarding_online_dpo_from_the_cli(cache_env, tmp_path):
    out = cli("train", "pipeline=online_dpo", "algorithm=dpo", "feedback=self_judge", "feedback.judge.min_label_mass=0",
              "model=tiny", "steps=2", "rollout.engine=hf", "rollout.max_new_tokens=8", "actor.micro_batch_size=2",
              "cluster.num_cpus=4", f"output.dir={tmp_path}", env_extra=cache_env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["feedback/judge_requests"] == 16 for row in rows)   # 4 prompts x 4 responses, pointwise
    assert os.path.isfile(tmp_path / "checkpoint" / "model.safetensors")


@pytest.mark.parametrize("args,needle", [
    (["pipeline=label", "rollout.samples_per_prompt=1"], "a preference pair needs at least 2 responses"),
    (["pipeline=online_dpo", "algorithm=kto"], "algorithm.loss='kto' is not one of"),
    (["pipeline=label", "feedback=self_judge"], "follow_policy=true (self-rewarding) makes the judge the live policy"),
])
def test_ai_feedback_pipelines_bad_input(cache_env, tmp_path, args, needle):
    out = cli("train", "model=tiny", f"output.dir={tmp_path}", *args, env_extra=cache_env)
    assert out.returncode == 2 and needle in out.stderr, out.stderr[-2000:]


def test_serve_labeller_answers_an_openai_request_and_eval_needs_a_model():
    import urllib.request
    proc = subprocess.Popen([sys.executable, "-m", "openrlaif", "serve-labeller", "--port", "0", "--accuracy", "0.9",
                             "--position-bias", "1"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.rsplit(" at ", 1)[1].split()[0]
        body = {"messages": [{"role": "user", "content": "Rate.\n\n[User message]\nQ?\n\n[Response]\nParis.\n\n"
                              "Answer with a single number from 1 to 9 and nothing else."}],
                "logprobs": True, "top_logprobs": 3}
        request = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        reply = json.load(urllib.request.urlopen(request, timeout=10))
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert reply["choices"][0]["message"]["content"] == "9" and len(top) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    out = cli("eval", "eval.prompts=demo")
    assert out.returncode == 2 and "usage: openrlaif eval MODEL" in out.stderr
    assert cli("serve-labeller", "--accuracy", "0.2").returncode == 2


def test_each_built_in_environment_from_the_cli(cache_env, tiny_model, tmp_path):
    """env=tool_use on the shipped calculator rows with exact-answer rewards, env=simulated_user against a real
    endpoint with a pairwise trajectory judge, env=agent with an openai-client agent: each trains a step and logs
    its episodes. (env.name=single_turn is the trivial environment: its rows equal a rollout's without one,
    test_multi_turn.py.)"""
    from tests.judge_server import JudgeServer
    common = ["train", "model=tiny", "steps=1", "rollout.engine=hf", "rollout.max_new_tokens=8",
              "data.prompts_per_step=2", "rollout.samples_per_prompt=2", "actor.micro_batch_size=2"]
    server = JudgeServer(tiny_model, prefer="shorter").start()
    try:
        runs = {
            "tool_use": ["env=tool_use", "feedback=env", "data.prompts=calculator"],
            "simulated_user": ["env=simulated_user", f"env.kwargs.base_url={server.base_url}", "env.kwargs.max_tokens=4",
                               "feedback=judge_trajectory", "feedback.judge.backend=http", "feedback.judge.mode=pairwise",
                               f"feedback.judge.base_url={server.base_url}", "feedback.judge.model=tiny"],
            "agent": ["env=agent", "env.agent=tests.integration.agents:openai_agent", "feedback=env"],
        }
        for name, overrides in runs.items():
            out = cli(*common, *overrides, f"output.dir={tmp_path / name}", env_extra=cache_env | {"OPENAI_API_KEY": "x"},
                      timeout=600)
            assert out.returncode == 0, (name, out.stderr[-3000:])
            row = json.loads(open(tmp_path / name / "metrics.jsonl").readline())
            assert row["env/turns_mean"] >= 1 and "env/policy_tokens_mean" in row, (name, row)
            if name == "tool_use":   # the random policy calls no tool: its first turn is its answer, scored exactly
                assert row["env/ended_by_env_fraction"] == 1.0 and row["feedback/failures"] == 0, row
                assert row["reward/mean"] in (0.0, 0.25, 0.5, 0.75, 1.0), row
            if name == "simulated_user":
                assert row["env/user_turns"] >= 1 and row["feedback/failures"] == 0, row
            if name == "agent":   # two calls per session, the second after the agent's own user message
                assert row["env/agent_requests"] == 8.0 and row["env/turns_mean"] == 2.0, row
    finally:
        server.shutdown()
