"""The AI judge role: a model in its own Ray worker group that scores responses against a rubric."""
from __future__ import annotations

import time

import ray
import torch

from openrlaif.batch import left_pad, split_evenly
from openrlaif.config import JudgeConfig
from openrlaif.feedback.base import FeedbackResult, JudgeFailure
from openrlaif.feedback.judge_prompts import expected_score, normalise, parse_score, pointwise_messages
from openrlaif.workers.common import load_causal_lm, setup_process


@ray.remote
class JudgeWorker:
    """Pointwise judge on an HF model. Verb: score(prompts, responses) -> (scores | None, failure kinds, stats)."""

    def __init__(self, model_path: str, cfg: JudgeConfig, *, dtype: str, threads: int, seed: int,
                 trust_remote_code: bool = False) -> None:
        setup_process(threads, seed)
        from transformers import AutoTokenizer
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_path, dtype, trust_remote_code).to(self.device).eval()
        self.label_ids = {}
        for score in range(cfg.score_min, cfg.score_max + 1):
            ids = self.tokenizer.encode(str(score), add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"feedback.judge: score {score} is {len(ids)} tokens for this judge's tokenizer; "
                                 "expected_score needs one token per score. Fix: feedback.judge.mode=generate, or a "
                                 "smaller feedback.judge.score_max.")
            self.label_ids[score] = ids[0]

    def ready(self) -> bool:
        return True

    def _encode(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        encoded = []
        for prompt, response in zip(prompts, responses):
            messages = pointwise_messages(self.cfg.rubric, prompt, response, self.cfg.score_min, self.cfg.score_max)
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            encoded.append(ids[-self.cfg.max_prompt_tokens:])  # keep the end: it holds the question to answer
        return encoded

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> tuple[list[float | None], list[str | None], dict]:
        start = time.perf_counter()
        encoded = self._encode(prompts, responses)
        scores: list[float | None] = []
        failures: list[str | None] = []
        raw_scores: list[float] = []
        generated_tokens = 0
        for lo in range(0, len(encoded), self.cfg.micro_batch_size):
            rows = encoded[lo:lo + self.cfg.micro_batch_size]
            ids, mask = (t.to(self.device) for t in left_pad(rows, self.tokenizer.pad_token_id))
            if self.cfg.mode == "expected_score":
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
                probs = logits.float().softmax(-1).cpu()
                replies = [{s: float(probs[i, t]) for s, t in self.label_ids.items()} for i in range(len(rows))]
            else:
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.cfg.max_new_tokens,
                                          do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
                new = out[:, ids.shape[1]:]
                generated_tokens += int((new != self.tokenizer.pad_token_id).sum())
                replies = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for reply in replies:
                try:
                    raw = (expected_score(reply, self.cfg.min_label_mass) if self.cfg.mode == "expected_score"
                           else parse_score(reply, self.cfg.score_min, self.cfg.score_max))
                except JudgeFailure as failure:
                    scores.append(None)
                    failures.append(failure.kind)
                    continue
                raw_scores.append(raw)
                scores.append(normalise(raw, self.cfg.score_min, self.cfg.score_max))
                failures.append(None)
        stats = {"judge_prompt_tokens": float(sum(len(r) for r in encoded)),
                 "judge_generated_tokens": float(generated_tokens),
                 "judge_raw_score_sum": float(sum(raw_scores)), "judge_seconds": time.perf_counter() - start}
        return scores, failures, stats


class JudgeFeedback:
    """Driver-side handle: fans the samples out over the judge workers and gathers one FeedbackResult."""

    def __init__(self, group) -> None:
        self.group = group

    def score(self, prompts: list[str], responses: list[str]) -> FeedbackResult:
        shards = split_evenly(len(prompts), len(self.group))
        refs = self.group.map(lambda worker, span: worker.score.remote(prompts[span], responses[span]), shards)
        scores, failures, stats = [], [], {}
        for shard_scores, shard_failures, shard_stats in ray.get(refs):
            scores += shard_scores
            failures += shard_failures
            for key, value in shard_stats.items():
                stats[key] = stats.get(key, 0.0) + value
        valid = [s for s in scores if s is not None]
        stats["judge_score_mean"] = stats.pop("judge_raw_score_sum") / max(len(valid), 1)
        return FeedbackResult.from_scores(scores, failures, stats)

