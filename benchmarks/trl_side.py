"""TRL's half of benchmarks/vs_trl.py. Runs inside the separate TRL venv (.venv-trl), never imports openrlaif.

    .venv-trl/bin/python benchmarks/trl_side.py SPEC.json RESULT.json

SPEC: {"kind": "grpo" | "dpo", "model": HF folder, "steps": N, "threads": T, "prompts": [[message, ...], ...],
       "pairs": [{"prompt"?, "chosen", "rejected"} as message lists, ...],
       "grpo": {...}, "dpo": {...}}. RESULT: the wall time of every optimizer step (the time between consecutive
step ends, so generation, rewards, reference passes and the update are all in it), for GRPO the time of each
step's `_generate_and_score_completions` (generation, rewards, log-probs), and the versions used.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time


def brevity(target_words: int):
    """The same rule as openrlaif.feedback.rules.brevity: 1 up to `target_words` words, 0 at twice that."""
    def reward(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [max(0.0, min(1.0, 2.0 - len(t.split()) / target_words)) for t in texts]
    reward.__name__ = "brevity"
    return reward


def main(spec_path: str, result_path: str) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    with open(spec_path) as handle:
        spec = json.load(handle)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), max_steps=spec["steps"], report_to=[],
                  use_cpu=True, bf16=bool(spec.get("bf16")), fp16=False, gradient_checkpointing=False, save_strategy="no",
                  logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                  lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0)
    start = time.perf_counter()
    if spec["kind"] == "grpo":
        g = spec["grpo"]
        rows = [{"prompt": messages} for messages in spec["prompts"]]
        dataset = Dataset.from_list(rows * (spec["steps"] * g["prompts_per_step"] // len(rows) + 2))
        args = trl.GRPOConfig(**common, learning_rate=g["lr"], per_device_train_batch_size=g["prompts_per_step"] * g["n"],
                              gradient_accumulation_steps=1, steps_per_generation=1, num_generations=g["n"],
                              max_completion_length=g["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
                              beta=g["kl_coef"], num_iterations=1, loss_type=g["loss_type"], use_vllm=False,
                              shuffle_dataset=False)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[brevity(g["target_words"])], args=args,
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[StepClock()])
    else:
        d = spec["dpo"]
        rows = spec["pairs"]   # TRL's conversational form, with an explicit or an implicit prompt
        dataset = Dataset.from_list(rows * (spec["steps"] * d["batch"] // len(rows) + 2))
        args = trl.DPOConfig(**common, learning_rate=d["lr"], per_device_train_batch_size=d["batch"],
                             gradient_accumulation_steps=1, beta=d["beta"],
                             precompute_ref_log_probs=d["precompute_ref"])
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[StepClock()])
    generate_s: list[float] = []   # GRPO: each step's generation and scoring (the rest of the step is the update)
    if spec["kind"] == "grpo":
        generate = trainer._generate_and_score_completions

        def timed(*a, **k):
            began = time.perf_counter()
            out = generate(*a, **k)
            generate_s.append(time.perf_counter() - began)
            return out
        trainer._generate_and_score_completions = timed
    setup_s = time.perf_counter() - start
    trainer.train()
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    result = {"step_s": step_s, "generate_s": generate_s, "setup_s": setup_s, "threads": torch.get_num_threads(),
              "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}}
    with open(result_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
