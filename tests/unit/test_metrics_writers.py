"""output.loggers: the jsonl numbers also reach TensorBoard event files and an offline W&B run, read back here."""
import glob
import json
import os
import struct
import time

import pytest
from tensorboardX.proto import event_pb2
from wandb.proto import wandb_internal_pb2

from openrlaif.config import Config, ConfigError, validate
from openrlaif.metrics import MetricsLogger


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))     # no ~/.netrc login either


def both_loggers() -> Config:
    cfg = Config()
    cfg.output.loggers = ["tensorboard", "wandb"]
    cfg.output.wandb.mode = "offline"
    cfg.output.wandb.tags = ["test"]
    return cfg


def tensorboard_scalars(directory) -> list[tuple[int, str, float, bool]]:
    """(step, tag, value, purges) per event, in file order; TFRecord framing: u64 length, u32 crc, data, u32 crc."""
    out = []
    for path in sorted(glob.glob(str(directory / "tensorboard" / "events.out.tfevents.*"))):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log"):
                out.append((event.step, "", 0.0, event.session_log.status == event_pb2.SessionLog.START))
            for value in event.summary.value:
                out.append((event.step, value.tag, value.simple_value, False))
    return out


def wandb_history(directory, rows_expected: int) -> list[dict[str, float]]:
    """History rows of the offline runs, once `rows_expected` of them are on disk or 60 s have passed.
    run.finish() returns when wandb-core has the exit record, but the service closes the run's file (and flushes
    the records) asynchronously; a loaded CI machine read the file before that and found no rows."""
    deadline = time.monotonic() + 60
    while True:
        rows = read_wandb_history(directory)
        if len(rows) >= rows_expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def read_wandb_history(directory) -> list[dict[str, float]]:
    """History rows of the offline runs (a .wandb file is LevelDB's log format after a 7-byte W&B header)."""
    rows = []
    for path in sorted(glob.glob(str(directory / "wandb" / "offline-run-*" / "run-*.wandb")), key=os.path.getmtime):
        data, pos, block, parts = open(path, "rb").read(), 7, 32768, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if block - pos % block < 7:       # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                break
            parts += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):                 # FULL or LAST fragment: a whole record
                record = wandb_internal_pb2.Record()
                record.ParseFromString(parts)
                parts = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item
                                 if not (item.key or item.nested_key[0]).startswith("_")})
    return rows


def test_tensorboard_and_wandb_get_the_finite_numbers_of_each_step(tmp_path, wandb_offline):
    cfg = both_loggers()
    validate(cfg)
    logger = MetricsLogger(str(tmp_path), cfg)
    for step in (1, 2):
        logger.log(step, {"reward/mean": step / 4, "train/kl": float("nan"), "time/step_s": 0.5})
    logger.close()
    scalars = [(s, tag, v) for s, tag, v, _ in tensorboard_scalars(tmp_path) if tag]
    assert scalars == [(1, "reward/mean", 0.25), (1, "time/step_s", 0.5), (2, "reward/mean", 0.5),
                       (2, "time/step_s", 0.5)]
    assert wandb_history(tmp_path, 2) == [{"step": 1, "reward/mean": 0.25, "time/step_s": 0.5},
                                       {"step": 2, "reward/mean": 0.5, "time/step_s": 0.5}]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["train/kl"] is None                    # jsonl keeps the key; the writers skip non-finite values


def test_resumed_logger_purges_tensorboard_and_continues_the_same_wandb_run(tmp_path, wandb_offline):
    cfg = both_loggers()
    logger = MetricsLogger(str(tmp_path), cfg)
    for step in (1, 2, 3):
        logger.log(step, {"reward/mean": float(step)})
    logger.close()
    run_id = (tmp_path / "wandb_id").read_text()
    resumed = MetricsLogger(str(tmp_path), cfg, first_step=3)     # checkpoint at step 2: step 3 runs again
    resumed.log(3, {"reward/mean": 30.0})
    resumed.close()
    assert (tmp_path / "wandb_id").read_text() == run_id
    assert all(f"-{run_id}" in path for path in glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    events = tensorboard_scalars(tmp_path)
    purge = [i for i, (step, _, _, purges) in enumerate(events) if purges and step == 3]
    assert purge and events[purge[-1] + 1:] == [(3, "reward/mean", 30.0, False)]   # TensorBoard drops the old step 3
    assert [row["step"] for row in wandb_history(tmp_path, 4)] == [1, 2, 3, 3]          # W&B keeps both, x-axis = step


def test_logger_validation_names_the_fix(tmp_path, wandb_offline):
    cfg = Config()
    cfg.output.loggers = ["mlflow"]
    with pytest.raises(ConfigError, match="output.loggers='mlflow' is not one of"):
        validate(cfg)
    cfg.output.loggers = ["wandb"]                         # online with no key anywhere
    with pytest.raises(ConfigError, match="WANDB_API_KEY.*output.wandb.mode=offline"):
        validate(cfg)
    cfg.output.wandb.mode = "shared"
    with pytest.raises(ConfigError, match="output.wandb.mode"):
        validate(cfg)
