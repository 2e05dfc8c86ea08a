"""Set-up both pipelines share: output folder and consent, tokenizer, the actor group, the final checkpoint."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import replace

import ray
from omegaconf import OmegaConf

from openrlaif.checkpointing import Checkpointer
from openrlaif.config import Config, ConfigError
from openrlaif.workers.group import WorkerGroup


# Output folders this process has claimed: their open lock files, closed by release() when the run is done.
_CLAIMED: dict[str, object] = {}


def default_run_dir() -> str:
    """runs/<date>-<time>-<6 hex>: two runs started in the same second get different folders."""
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6])


def prepare_output_dir(cfg: Config, continuing: bool = False) -> str:
    """The absolute output folder, claimed for this run, with the resolved config written into it. The consent
    rules, checked before anything starts:

    - a folder another live run is using is refused (an exclusive lock on <dir>/.lock, freed when that run ends);
    - only output.overwrite=true may replace a final checkpoint (<dir>/checkpoint), also when resuming;
    - resume=true needs an intact resumable checkpoint, and steps beyond its step;
    - a fresh run refuses a folder holding resumable checkpoints unless output.overwrite=true, which starts the
      folder over: those checkpoints are deleted, metrics.jsonl, tensorboard/ and the W&B run id go, and the
      verdict cache is moved aside.

    `continuing`: a later phase of a run that already holds the folder (constitutional's SFT): no checks again."""
    out_dir = os.path.abspath(cfg.output.dir or default_run_dir())
    if continuing:
        assert out_dir in _CLAIMED, f"{out_dir} is not held by this run"
        return write_config(cfg, out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"output.dir={out_dir} is a file. Fix: a folder path (it is created if missing).")
    try:
        os.makedirs(out_dir, exist_ok=True)
        claim(out_dir)
    except PermissionError as err:
        raise ConfigError(f"output.dir={out_dir} cannot be written ({err.strerror}). Fix: a folder you can write "
                          "to.") from None
    try:
        check_consent(cfg, out_dir)
    except BaseException:
        release(out_dir)
        raise
    if cfg.output.overwrite and not cfg.resume:
        start_over(out_dir)
    return write_config(cfg, out_dir)


def check_consent(cfg: Config, out_dir: str) -> None:
    """prepare_output_dir's rules on what an earlier run left in `out_dir`."""
    checkpointer = Checkpointer(out_dir, cfg.output.checkpoint_every, cfg.output.keep_last)
    final_exists = os.path.exists(os.path.join(out_dir, "checkpoint"))
    if cfg.resume:
        found = checkpointer.latest(report=print)
        if found is None:
            raise ConfigError(f"resume=true, but {out_dir} holds no resumable checkpoint: it has "
                              f"{describe_run_dir(out_dir)}. Nothing was started and nothing was touched. Fix: drop "
                              "resume=true to start a new run (in a new output.dir, or output.overwrite=true to "
                              "replace this one); a run is resumable when it ran with output.checkpoint_every=N.")
        if found[0] >= cfg.steps:
            raise ConfigError(f"resume=true: the newest checkpoint, {found[1]}, is at step {found[0]}, and steps="
                              f"{cfg.steps} leaves nothing to run. Fix: steps={found[0] + 1} or more to continue.")
    if cfg.output.save_final and final_exists and not cfg.output.overwrite:
        when = "when this resumed run ends" if cfg.resume else "by this run"
        raise ConfigError(f"{out_dir}/checkpoint already exists and would be replaced {when}. Fix: "
                          "output.overwrite=true to replace it, or a new output.dir.")
    if checkpointer.complete() and not cfg.resume and not cfg.output.overwrite:
        raise ConfigError(f"{checkpointer.root} holds resumable checkpoints of an earlier run. Fix: resume=true "
                          "to continue it, output.overwrite=true to start over (they are deleted), or a new "
                          "output.dir.")


def claim(out_dir: str) -> None:
    """An exclusive, non-blocking lock on <dir>/.lock, held until the run releases it or its process ends (the OS
    frees it then, also after a kill, so a dead run never blocks its folder). A run in this same process that did
    not release the folder (it failed) does not block the next either."""
    import fcntl
    release(out_dir)
    handle = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"output.dir={out_dir} is in use by another run (pid {owner}): two runs in one folder would "
                          "interleave their metrics and overwrite each other's checkpoints. Fix: another output.dir, "
                          "or wait for that run to end.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _CLAIMED[out_dir] = handle


def release(out_dir: str) -> None:
    """The run is done with its folder: another run (another process, or this one) may claim it."""
    handle = _CLAIMED.pop(os.path.abspath(out_dir), None)
    if handle is not None:
        handle.close()


def start_over(out_dir: str) -> None:
    """output.overwrite=true: the folder begins like a new one. Resumable checkpoints are deleted; the metrics
    log, TensorBoard events and W&B run id go (a new run, not steps appended to the old one); the verdict cache
    is moved aside, never served to this run (rename it back to reuse it: its keys name the judge model, its
    settings and every request exactly)."""
    shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)
    shutil.rmtree(os.path.join(out_dir, "tensorboard"), ignore_errors=True)
    for name in ("metrics.jsonl", "wandb_id", "eval_samples.jsonl"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in ("judge_cache.jsonl", "eval_judge_cache.jsonl"):   # the training judge's and eval.feedback's
        cache = os.path.join(out_dir, name)
        if os.path.exists(cache):
            os.replace(cache, cache + ".previous")
            print(f"[openrlaif] output.overwrite=true: moved the earlier verdict cache to {cache}.previous")


def describe_run_dir(out_dir: str) -> str:
    """What an output folder holds, in words, for resume's error."""
    parts = []
    if os.path.exists(os.path.join(out_dir, "checkpoint")):
        parts.append("a final checkpoint (checkpoint/), which is not resumable")
    steps = Checkpointer(out_dir, 0, 0).complete()
    if steps:
        parts.append(f"{len(steps)} resumable checkpoint(s) that are not intact")
    if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
            parts.append(f"metrics.jsonl with {sum(1 for _ in handle)} step(s)")
    return ", ".join(parts) or "nothing of an earlier run"


def write_config(cfg: Config, out_dir: str) -> str:
    with open(os.path.join(out_dir, "config.yaml"), "w") as handle:
        handle.write(OmegaConf.to_yaml(OmegaConf.structured(replace(cfg, output=replace(cfg.output, dir=out_dir)))))
    return out_dir


def load_tokenizer(model_path: str, cfg: Config):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ConfigError(f"model.path={cfg.model.path!r}: the tokenizer has no chat template. Fix: use an instruct "
                          "model, or add a chat_template to its tokenizer_config.json.")
    return tokenizer


def save_checkpoint(actor: WorkerGroup, out_dir: str, tokenizer_path: str, name: str = "checkpoint",
                    lora=None) -> str:
    """HF folder at <out>/<name>, written to a temp folder first so a crash never leaves half a checkpoint. A LoRA
    policy (`lora`: the role's LoraSettings with rank > 0) writes its peft adapter folder there instead, and with
    lora.save_merged also the merged weights as an HF folder at <out>/<name>-merged."""
    adapter = bool(lora is not None and lora.rank)
    folders = [(name, not adapter)] + ([(name + "-merged", True)] if adapter and lora.save_merged else [])
    for folder, merged in folders:
        final = os.path.join(out_dir, folder)
        staging = final + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        ray.get(actor.call(lambda w: w.save_hf.remote(staging, tokenizer_path, merged)))
        if os.path.exists(final):   # consent was checked at start-up (output.overwrite)
            shutil.rmtree(final)
        os.rename(staging, final)
    return os.path.join(out_dir, name)


def finish(checkpoint: str | None, metrics_path: str, metrics: dict[str, float], out_dir: str) -> dict:
    """Say where the results went; what every pipeline's train() returns."""
    if checkpoint:
        print(f"[openrlaif] checkpoint (HF format): {checkpoint}")
    print(f"[openrlaif] metrics: {metrics_path}")
    release(out_dir)
    return {"checkpoint": checkpoint, "metrics": metrics, "out_dir": out_dir}
