"""The output folder's consent rules (pipelines/common.prepare_output_dir), checked before anything starts: one run
per folder, resume only from an intact checkpoint with steps left, a final checkpoint replaced only with
output.overwrite=true, which also starts the metrics over."""
import json
import os
import subprocess
import sys
import time

import pytest

from openrlaif.checkpointing import Checkpointer, file_sizes
from openrlaif.config import Config, ConfigError, OutputConfig
from openrlaif.pipelines.common import default_run_dir, prepare_output_dir, release


def config(out_dir, **output) -> Config:
    return Config(steps=4, output=OutputConfig(dir=str(out_dir), **output))


def prepared(cfg: Config) -> str:
    return release(out := prepare_output_dir(cfg)) or out


def fake_checkpoint(out_dir, step: int) -> str:
    """A resumable checkpoint as Checkpointer.save leaves it: role state, then driver.json with the manifest."""
    path = os.path.join(out_dir, "checkpoints", f"step_{step:06d}")
    os.makedirs(os.path.join(path, "actor", "state"))
    with open(os.path.join(path, "actor", "state", "model_states.pt"), "wb") as handle:
        handle.write(b"x" * 1000)
    files = file_sizes(path)
    with open(os.path.join(path, "driver.json"), "w") as handle:
        json.dump({"step": step, "stream_position": 4 * step, "files": files}, handle)
    return path


def test_default_folders_are_unique_within_a_second():
    names = {default_run_dir() for _ in range(50)}
    assert len(names) == 50 and all(name.startswith("runs/") for name in names)


def test_a_folder_in_use_by_another_run_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from openrlaif.pipelines.common import claim; claim(sys.argv[1]); print('held', "
        "flush=True); time.sleep(60)"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid}\)"):
            prepare_output_dir(config(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    prepared(config(tmp_path))   # the lock died with its process


def test_resume_with_nothing_to_resume_stops_and_touches_nothing(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(ConfigError, match=r"no resumable checkpoint: it has a final checkpoint \(checkpoint/\), "
                                          r"which is not resumable, metrics.jsonl with 2 step\(s\)"):
        prepare_output_dir(Config(steps=4, resume=True, output=OutputConfig(dir=str(tmp_path))))
    assert (tmp_path / "checkpoint" / "model.safetensors").read_bytes() == b"weights"


def test_resume_needs_steps_beyond_the_checkpoint_and_consent_to_replace_a_final_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 3)
    with pytest.raises(ConfigError, match="at step 3, and steps=3 leaves nothing to run. Fix: steps=4"):
        prepare_output_dir(Config(steps=3, resume=True, output=OutputConfig(dir=str(tmp_path))))
    prepared(Config(steps=5, resume=True, output=OutputConfig(dir=str(tmp_path))))
    (tmp_path / "checkpoint").mkdir()
    with pytest.raises(ConfigError, match="would be replaced when this resumed run ends.*output.overwrite=true"):
        prepare_output_dir(Config(steps=5, resume=True, output=OutputConfig(dir=str(tmp_path))))
    prepared(Config(steps=5, resume=True, output=OutputConfig(dir=str(tmp_path), overwrite=True)))
    assert Checkpointer(str(tmp_path), 1, 2).complete()   # resuming with overwrite keeps the checkpoints


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(tmp_path):
    fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2)
    with open(os.path.join(newest, "actor", "state", "model_states.pt"), "r+b") as handle:
        handle.truncate(10)   # a disk that filled up while the shard was copied
    reports = []
    assert Checkpointer(str(tmp_path), 1, 2).latest(reports.append)[0] == 1
    assert "model_states.pt has 10 bytes, 1000 when saved" in reports[0] and newest in reports[0]
    os.remove(os.path.join(tmp_path, "checkpoints", "step_000001", "actor", "state", "model_states.pt"))
    assert Checkpointer(str(tmp_path), 1, 2).latest() is None
    with pytest.raises(ConfigError, match=r"2 resumable checkpoint\(s\) that are not intact"):
        prepare_output_dir(Config(steps=5, resume=True, output=OutputConfig(dir=str(tmp_path))))


def test_overwrite_starts_the_folder_over(tmp_path):
    fake_checkpoint(tmp_path, 2)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "wandb_id").write_text("abc")
    (tmp_path / "tensorboard").mkdir()
    with pytest.raises(ConfigError, match="holds resumable checkpoints"):
        prepare_output_dir(config(tmp_path))
    prepared(config(tmp_path, overwrite=True))
    assert sorted(os.listdir(tmp_path)) == [".lock", "config.yaml"]


def test_an_output_dir_that_is_a_file_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_output_dir(config(tmp_path / "file"))
