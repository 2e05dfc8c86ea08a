"""Metrics are a side channel: `with timer(metrics, "rollout"):` around a phase, one jsonl line per step, and the
same numbers to TensorBoard and/or Weights & Biases when output.loggers names them."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openrlaif.feedback import FeedbackResult


@contextmanager
def timer(metrics: dict[str, float], phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[f"time/{phase}_s"] = metrics.get(f"time/{phase}_s", 0.0) + time.perf_counter() - start


class MetricsLogger:
    """Appends one JSON object per step to <dir>/metrics.jsonl (flushed each step, so a crash keeps the log), and
    passes the finite numbers on to the writers of `cfg.output.loggers`. `first_step` > 1 means a resumed run:
    TensorBoard drops its events from that step on, so the resumed steps are not drawn twice."""

    def __init__(self, directory: str, cfg=None, first_step: int = 1) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        self.handle = open(self.path, "a", encoding="utf-8")
        loggers = cfg.output.loggers if cfg is not None else []
        self.writers = [WRITERS[name](directory, cfg, first_step) for name in loggers]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in sorted(metrics.items())}}
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        numbers = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        for writer in self.writers:
            writer.log(step, numbers)

    def close(self) -> None:
        self.handle.close()
        for writer in self.writers:
            writer.close()


class TensorBoardWriter:
    """Scalars under <dir>/tensorboard (`tensorboard --logdir <dir>/tensorboard`)."""

    def __init__(self, directory: str, cfg, first_step: int) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(directory, "tensorboard"),
                                    purge_step=first_step if first_step > 1 else None)

    def log(self, step: int, numbers: dict[str, float]) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """One W&B run per output dir: its id is kept in <dir>/wandb_id, so resume=true continues the same run.
    The config is logged as the run's config; API keys are never in it (the judge names an env var)."""

    def __init__(self, directory: str, cfg, first_step: int) -> None:
        import wandb

        id_path = os.path.join(directory, "wandb_id")
        if os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as handle:
                run_id = handle.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_path, "w", encoding="utf-8") as handle:
                handle.write(run_id)
        settings = cfg.output.wandb
        self.run = wandb.init(project=settings.project, entity=settings.entity, mode=settings.mode,
                              name=settings.name or os.path.basename(os.path.abspath(directory)),
                              tags=list(settings.tags), dir=directory, id=run_id, resume="allow",
                              config=dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None)
        # our step is the x-axis: a resumed run logs its repeated steps again instead of W&B dropping them
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, numbers: dict[str, float]) -> None:
        self.run.log({"step": step, **numbers})

    def close(self) -> None:
        self.run.finish()


WRITERS = {"tensorboard": TensorBoardWriter, "wandb": WandbWriter}


def summary_line(step: int, metrics: dict[str, float]) -> str:
    keys = [("reward/mean", "reward"), ("train/kl", "kl"), ("train/loss", "loss"), ("feedback/failures", "fail"),
            ("train/reward_accuracy", "pair acc"), ("train/reward_margin", "margin"),
            ("throughput/rollout_tokens_per_s", "gen tok/s"), ("time/step_s", "step s")]
    parts = [f"{label} {metrics[key]:.4g}" for key, label in keys if key in metrics]
    return f"step {step}: " + " | ".join(parts)


def feedback_metrics(feedback: FeedbackResult, response_tokens: float, seconds: float) -> dict[str, float]:
    """Rewards, failures by kind, and what the judge reported (flip rate, kept fraction, tokens, seconds)."""
    valid = feedback.valid
    rewards = feedback.rewards[valid]
    out = {"reward/mean": feedback.mean(),
           "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
           "feedback/failures": float((~valid).sum()),
           "feedback/failure_rate": float((~valid).float().mean())}
    for kind, count in feedback.failures.items():
        out[f"feedback/failures/{kind}"] = float(count)
    for key, value in feedback.metrics.items():
        out[f"feedback/{key}"] = value
    if "judge_prompt_tokens" in feedback.metrics:
        judge_tokens = feedback.metrics["judge_prompt_tokens"] + feedback.metrics["judge_generated_tokens"]
        out["throughput/feedback_tokens_per_s"] = judge_tokens / max(seconds, 1e-9)
        out["feedback/judge_tokens_per_policy_token"] = judge_tokens / max(response_tokens, 1.0)
    return out
