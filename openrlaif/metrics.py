"""Metrics are a side channel: `with timer(metrics, "rollout"):` around a phase, one jsonl line per step."""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager


@contextmanager
def timer(metrics: dict[str, float], phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[f"time/{phase}_s"] = metrics.get(f"time/{phase}_s", 0.0) + time.perf_counter() - start


class MetricsLogger:
    """Appends one JSON object per step to <dir>/metrics.jsonl (flushed each step, so a crash keeps the log)."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        self.handle = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in sorted(metrics.items())}}
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def summary_line(step: int, metrics: dict[str, float]) -> str:
    keys = [("reward/mean", "reward"), ("train/kl", "kl"), ("train/loss", "loss"), ("feedback/failures", "fail"),
            ("train/reward_accuracy", "pair acc"), ("train/reward_margin", "margin"),
            ("throughput/rollout_tokens_per_s", "gen tok/s"), ("time/step_s", "step s")]
    parts = [f"{label} {metrics[key]:.4g}" for key, label in keys if key in metrics]
    return f"step {step}: " + " | ".join(parts)
