"""Survive: a run killed after step 2 resumes and its step 3 equals an uninterrupted run's; a run whose actor
worker is killed stops naming the role and resumes. Real CLI processes, real SIGKILLs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = ["train", "model=tiny", "feedback=function", "+feedback.function_kwargs.target_words=3", "steps=3", "seed=5",
       "rollout.engine=hf", "rollout.max_new_tokens=8", "actor.lr=1e-3", "actor.resources.num_workers=2",
       "actor.micro_batch_size=4", "output.checkpoint_every=1", "output.keep_last=2", "cluster.num_cpus=5"]
HOLD = "feedback.function=tests.integration.rewards:hold_at_step"   # the brevity rule, held where a test asks
COMPARED = ["reward/mean", "train/loss", "train/kl", "train/grad_norm", "response/length_mean", "train/clip_fraction"]


@pytest.fixture(scope="module")
def env(model_cache, tiny_model):
    return dict(os.environ, OPENRLAIF_CACHE=model_cache)


def start(env, out_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "openrlaif", *RUN, f"output.dir={out_dir}", *extra], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(path, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.time() + timeout_s
    while not os.path.exists(path):
        assert process.poll() is None, f"the run ended before {path} appeared: {process.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"{path} did not appear in {timeout_s} s"
        time.sleep(0.2)


def finish(process: subprocess.Popen, timeout_s: float = 600.0) -> tuple[int, str]:
    """The exit code, and everything the run printed (stdout, then stderr)."""
    out, err = process.communicate(timeout=timeout_s)
    return process.returncode, out + err


def metrics(out_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {row["step"]: row for row in rows}


def test_killed_after_step_2_resumes_to_the_same_step_3(env, tmp_path):
    straight = start(env, tmp_path / "straight")
    code, err = finish(straight)
    assert code == 0, err[-3000:]
    expected = metrics(tmp_path / "straight")

    # Held in step 3's feedback, after step 2's checkpoint: killed there on any machine, however fast.
    release = tmp_path / "release"
    killed = start(dict(env, OPENRLAIF_TEST_RELEASE=str(release)), tmp_path / "killed", HOLD,
                   "+feedback.function_kwargs.step=3")
    wait_for(str(release) + ".held", killed)
    assert os.path.isfile(tmp_path / "killed" / "checkpoints" / "step_000002" / "driver.json")
    os.killpg(killed.pid, signal.SIGKILL)     # the driver and everything in its session, no clean-up
    killed.wait()
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["step_000001", "step_000002"]
    resumed = start(env, tmp_path / "killed", "resume=true", HOLD, "+feedback.function_kwargs.step=3")
    code, err = finish(resumed)
    assert code == 0, err[-3000:]
    got = metrics(tmp_path / "killed")
    assert sorted(got) == [1, 2, 3]
    for key in COMPARED:
        assert got[3][key] == pytest.approx(expected[3][key], rel=1e-5, abs=1e-7), key
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["step_000002", "step_000003"]   # keep_last=2
    assert os.path.isfile(tmp_path / "killed" / "checkpoint" / "model.safetensors")

    # Resuming that ZeRO-2 state on one worker (which runs stage 0) stops before loading, naming both layouts.
    # (output.overwrite=true: a resumed run replaces the final checkpoint at its end, which needs consent.)
    other = start(env, tmp_path / "killed", "resume=true", "steps=4", "actor.resources.num_workers=1",
                  "output.overwrite=true")
    code, err = finish(other)
    assert code == 2, err[-3000:]   # a configuration error
    assert "ZeRO stage 2 on 2 worker(s)" in err and "stage 0 on 1" in err and "Traceback" not in err, err[-3000:]
    assert sorted(metrics(tmp_path / "killed")) == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["step_000002", "step_000003"]

    # (Nothing left to run, or no consent to replace the final checkpoint, stop at start-up: tests/unit/
    # test_output_dir.py, and test_cli.py's exit code 2 for such a refusal.)

    # A truncated shard in the newest checkpoint: the resume falls back to the one before it, and its step 3
    # equals the uninterrupted run's again.
    state = tmp_path / "killed" / "checkpoints" / "step_000003" / "actor" / "state"
    shard = next(name for name in sorted(os.listdir(state)) if name.endswith("model_states.pt"))
    os.truncate(state / shard, os.path.getsize(state / shard) // 2)
    code, err = finish(start(env, tmp_path / "killed", "resume=true", "steps=4", "output.overwrite=true"))
    assert code == 0, err[-3000:]
    assert f"step_000003 is not intact (actor/state/{shard} has" in err, err[-3000:]
    assert "resumed from" in err and "step_000002" in err
    got = metrics(tmp_path / "killed")
    assert sorted(got) == [1, 2, 3, 4]
    for key in COMPARED:
        assert got[3][key] == pytest.approx(expected[3][key], rel=1e-5, abs=1e-7), key


def own_workers(driver_pid: int, name: str) -> list[int]:
    """The pids of this run's `ray::<name>` processes: descendants of its driver (the local cluster's raylet is
    the driver's child), never another run's."""
    from tests.listeners import descendants
    found = []
    for pid in descendants(driver_pid):
        try:
            with open(f"/proc/{pid}/cmdline") as handle:
                if handle.read().startswith(f"ray::{name}"):
                    found.append(pid)
        except OSError:
            continue
    return found


def test_a_dead_actor_worker_is_named_and_the_run_resumes(env, tmp_path):
    """The run holds in step 2's feedback (its reward function waits for a file); one of its own actor workers is
    killed then, so the update that follows finds it dead: no race with the run's end, no other run touched."""
    release = tmp_path / "release"
    held = dict(env, OPENRLAIF_TEST_RELEASE=str(release))
    run = start(held, tmp_path / "run", HOLD)
    wait_for(str(release) + ".held", run)
    workers = own_workers(run.pid, "ActorWorker")
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    release.touch()
    code, err = finish(run)
    assert code == 1, err[-3000:]
    assert "role 'actor' (worker" in err and "died during the update phase of step 2" in err, err[-3000:]
    assert "checkpoints/step_000001: rerun the same command with resume=true" in err and "Traceback" not in err
    resumed = start(env, tmp_path / "run", "resume=true")
    code, err = finish(resumed)
    assert code == 0, err[-3000:]
    assert sorted(metrics(tmp_path / "run")) == [1, 2, 3]
