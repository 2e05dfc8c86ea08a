"""The AI judge. `JudgeWorker` is the local backend's Ray actor (an HF model answering requests); `Judge` is the
driver-side logic shared by every backend: pointwise scores, pairwise preferences with position-swap debiasing,
repeated-ranking consistency filtering, and a verdict cache."""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import combinations

import ray
import torch

from openrlaif.batch import left_pad
from openrlaif.config import JudgeConfig
from openrlaif.feedback.backends import JudgeRequest, Reply
from openrlaif.feedback.base import FeedbackResult, JudgeFailure
from openrlaif.feedback.judge_prompts import (choice_probability, expected_score, normalise, pairwise_messages,
                                              parse_choice, parse_score, pointwise_messages, swap_debiased)
from openrlaif.workers.common import load_causal_lm, setup_process
from openrlaif.workers.weights import Weights, named_tensors


@ray.remote
class JudgeWorker:
    """A causal LM answering JudgeRequests: label probabilities from one forward pass, or generated text."""

    def __init__(self, model_path: str, *, dtype: str, threads: int, seed: int, max_prompt_tokens: int = 1024,
                 micro_batch_size: int = 8, trust_remote_code: bool = False) -> None:
        setup_process(threads, seed)
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_path, dtype, trust_remote_code).to(self.device).eval()
        self.max_prompt_tokens, self.micro_batch_size = max_prompt_tokens, micro_batch_size
        self.label_ids: dict[str, int] = {}

    def ready(self) -> bool:
        return True

    def update_weights(self, weights: Weights) -> float:
        """Self-rewarding: take the policy's new weights in place (names as the trainer's named_parameters)."""
        start = time.perf_counter()
        state = dict(named_tensors(weights))
        params = dict(self.model.named_parameters())
        unknown = [name for name in state if name not in params]
        if unknown:
            raise ValueError(f"judge: weights {unknown[:3]} are not in the judge model; feedback.judge.follow_policy "
                             "needs the judge to be the policy's own architecture.")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        return time.perf_counter() - start

    def _label_id(self, label: str) -> int:
        if label not in self.label_ids:
            ids = self.tokenizer.encode(label, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"feedback.judge: label {label!r} is {len(ids)} tokens for this judge's tokenizer; "
                                 "reading label probabilities needs one token per label. Fix: "
                                 "feedback.judge.readout=generate, or a smaller feedback.judge.score_max.")
            self.label_ids[label] = ids[0]
        return self.label_ids[label]

    def _encode(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return ids[-self.max_prompt_tokens:]   # keep the end: it holds the question to answer

    @torch.no_grad()
    def complete(self, requests: list[JudgeRequest]) -> list[Reply]:
        replies: list[Reply | None] = [None] * len(requests)
        encoded = [self._encode(r.messages) for r in requests]
        for wants_labels in (True, False):
            index = [i for i, r in enumerate(requests) if (r.labels is not None) == wants_labels]
            for lo in range(0, len(index), self.micro_batch_size):
                chunk = index[lo:lo + self.micro_batch_size]
                ids, mask = (t.to(self.device) for t in left_pad([encoded[i] for i in chunk],
                                                                 self.tokenizer.pad_token_id))
                if wants_labels:
                    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
                    probs = logits.float().softmax(-1).cpu()
                    for row, i in enumerate(chunk):
                        label_probs = {label: float(probs[row, self._label_id(label)]) for label in requests[i].labels}
                        replies[i] = Reply(label_probs=label_probs, prompt_tokens=len(encoded[i]))
                    continue
                first = requests[chunk[0]]
                torch.manual_seed(first.seed)
                sample = first.temperature > 0
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=first.max_tokens,
                                          do_sample=sample, temperature=first.temperature if sample else None,
                                          top_p=None, top_k=None, pad_token_id=self.tokenizer.pad_token_id)
                new = out[:, ids.shape[1]:]
                texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
                for row, i in enumerate(chunk):
                    replies[i] = Reply(text=texts[row], prompt_tokens=len(encoded[i]),
                                       completion_tokens=int((new[row] != self.tokenizer.pad_token_id).sum()))
        return replies


class VerdictCache:
    """Successful replies keyed by (judge id, request): the messages hold the prompt, the responses and their
    order; the seed holds the repeat index. Appended to a jsonl file, so a resumed or repeated run reuses
    verdicts exactly. Failures are not cached: a later run retries them."""

    def __init__(self, judge_id: str, path: str | None = None) -> None:
        self.judge_id, self.path, self.entries = judge_id, path, {}
        self.hits = 0
        if path and os.path.exists(path):
            with open(path) as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                        self.entries[row["key"]] = Reply(**row["reply"])
                    except (ValueError, KeyError, TypeError):
                        continue   # a line cut by a crash: ignore it, the verdict is recomputed

    def key(self, request: JudgeRequest) -> str:
        blob = json.dumps([self.judge_id, request.messages, request.labels, request.max_tokens, request.temperature,
                           request.seed], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def run(self, backend, requests: list[JudgeRequest]) -> list[Reply]:
        keys = [self.key(r) for r in requests]
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(requests) - len(missing)
        fresh = backend.complete([requests[i] for i in missing])
        new_rows = []
        for i, reply in zip(missing, fresh):
            if reply.failure is None:
                self.entries[keys[i]] = reply
                new_rows.append(json.dumps({"key": keys[i], "reply": asdict(reply)}))
        if self.path and new_rows:
            with open(self.path, "a") as handle:
                handle.write("\n".join(new_rows) + "\n")
        by_index = dict(zip(missing, fresh))
        return [by_index[i] if i in by_index else self.entries[k] for i, k in enumerate(keys)]


@dataclass
class Comparisons:
    """Pairwise verdicts for pairs (x_i, y_i): prob[i] = P(x_i ≻ y_i) after swap-debiasing (None = failed, or
    dropped by the consistency filter), plus what the metrics need."""
    prob: list[float | None]
    kept: list[bool]
    flips: int = 0
    judged: int = 0                    # pairs with both orders answered
    failures: Counter = field(default_factory=Counter)


class Judge:
    """Every judge mode on top of a backend (LocalBackend or HTTPBackend)."""

    def __init__(self, backend, cfg: JudgeConfig, cache_path: str | None = None) -> None:
        self.backend, self.cfg = backend, cfg
        self.judge_id = json.dumps([backend.name, cfg.mode, cfg.readout, cfg.rubric, cfg.pairwise_rubric,
                                    cfg.score_min, cfg.score_max])
        self.cache = VerdictCache(self.judge_id, cache_path if cfg.cache else None)
        self.stats: Counter = Counter()

    def set_policy_version(self, version: int) -> None:
        """A judge that follows the policy answers differently after each weight sync: key its verdicts by it."""
        self.cache.judge_id = f"{self.judge_id}@policy-{version}"

    def _ask(self, requests: list[JudgeRequest]) -> list[Reply]:
        start = time.perf_counter()
        replies = self.cache.run(self.backend, requests)
        self.stats["judge_requests"] += len(requests)
        self.stats["judge_prompt_tokens"] += sum(r.prompt_tokens for r in replies)
        self.stats["judge_generated_tokens"] += sum(r.completion_tokens for r in replies)
        self.stats["judge_retries"] += sum(r.attempts - 1 for r in replies)
        self.stats["judge_seconds"] += time.perf_counter() - start
        return replies

    def take_stats(self) -> dict[str, float]:
        stats = {k: float(v) for k, v in self.stats.items()}
        stats["judge_cache_hits"] = float(self.cache.hits)
        self.stats.clear()
        self.cache.hits = 0
        return stats

    def generate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                 seeds: list[int]) -> list[Reply]:
        """Free text for each conversation (critiques, revisions), through the cache; failures are in the replies."""
        return self._ask([JudgeRequest(messages, None, max_tokens, temperature, seed)
                          for messages, seed in zip(conversations, seeds)])

    # ---------------------------------------------------------------------------------------------- pointwise
    def pointwise(self, prompts: list[str], responses: list[str]) -> FeedbackResult:
        cfg = self.cfg
        labels = [str(s) for s in range(cfg.score_min, cfg.score_max + 1)] if cfg.readout == "probs" else None
        requests = [JudgeRequest(pointwise_messages(cfg.rubric, p, r, cfg.score_min, cfg.score_max), labels,
                                 cfg.max_new_tokens, cfg.temperature) for p, r in zip(prompts, responses)]
        scores, kinds, raw = [], [], []
        for reply in self._ask(requests):
            try:
                if reply.failure:
                    raise JudgeFailure(reply.failure, reply.detail)
                value = (expected_score({int(k): v for k, v in reply.label_probs.items()}, cfg.min_label_mass)
                         if labels else parse_score(reply.text, cfg.score_min, cfg.score_max))
            except JudgeFailure as failure:
                scores.append(None)
                kinds.append(failure.kind)
                continue
            raw.append(value)
            scores.append(normalise(value, cfg.score_min, cfg.score_max))
            kinds.append(None)
        stats = self.take_stats()
        stats["judge_score_mean"] = sum(raw) / max(len(raw), 1)
        return FeedbackResult.from_scores(scores, kinds, stats)

    # ---------------------------------------------------------------------------------------------- pairwise
    def compare(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> Comparisons:
        """Both orders of every pair, `repeats` times each; P(x ≻ y) is the swap-debiased average. With
        repeats > 1 (sampled, temperature > 0) or just the two orders, a pair is kept only if the share of
        verdicts agreeing with the majority reaches `consistency_threshold`."""
        cfg = self.cfg
        labels = ["A", "B"] if cfg.readout == "probs" else None
        requests = []
        for prompt, x, y in zip(prompts, firsts, seconds):
            for a, b in ((x, y), (y, x)):
                for repeat in range(cfg.repeats):
                    requests.append(JudgeRequest(pairwise_messages(cfg.pairwise_rubric, prompt, a, b), labels,
                                                 cfg.max_new_tokens, cfg.temperature, seed=repeat))
        replies = self._ask(requests)
        out = Comparisons(prob=[], kept=[])
        per_pair = 2 * cfg.repeats
        for k in range(len(prompts)):
            probs: list[list[float]] = [[], []]   # P(A) per order, one per answered repeat
            failed = None
            for j, reply in enumerate(replies[k * per_pair:(k + 1) * per_pair]):
                try:
                    if reply.failure:
                        raise JudgeFailure(reply.failure, reply.detail)
                    p_a = (choice_probability(reply.label_probs, cfg.min_label_mass) if labels
                           else float(parse_choice(reply.text) == "A"))
                except JudgeFailure as failure:
                    failed = failed or failure.kind
                    continue
                probs[j // cfg.repeats].append(p_a)
            if not probs[0] or not probs[1]:
                out.failures[failed or "unparseable"] += 1
                out.prob.append(None)
                out.kept.append(False)
                continue
            prob, _ = swap_debiased(sum(probs[0]) / len(probs[0]), sum(probs[1]) / len(probs[1]))
            _, flipped = swap_debiased(probs[0][0], probs[1][0])   # the first repeat of each order
            out.judged += 1
            out.flips += int(flipped)
            votes = [p > 0.5 for p in probs[0] if p != 0.5] + [p < 0.5 for p in probs[1] if p != 0.5]
            agreement = max(sum(votes), len(votes) - sum(votes)) / len(votes) if votes else 0.0
            keep = agreement >= cfg.consistency_threshold
            out.prob.append(prob if keep else None)
            out.kept.append(keep)
        return out

    def pairwise_rewards(self, prompts: list[str], responses: list[str]) -> FeedbackResult:
        """Per-response rewards from pairwise verdicts inside each prompt's group: the win rate
        mean_j P(i ≻ j) over the group's kept comparisons. A response with none kept is masked."""
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(index)
        pairs = [(i, j) for members in groups.values() for i, j in combinations(members, 2)]
        result = self.compare([prompts[i] for i, _ in pairs], [responses[i] for i, _ in pairs],
                              [responses[j] for _, j in pairs])
        wins = [0.0] * len(prompts)
        counts = [0] * len(prompts)
        for (i, j), prob in zip(pairs, result.prob):
            if prob is None:
                continue
            wins[i] += prob
            wins[j] += 1.0 - prob
            counts[i] += 1
            counts[j] += 1
        scores = [wins[i] / counts[i] if counts[i] else None for i in range(len(prompts))]
        kinds = [None if counts[i] else "no_kept_comparison" for i in range(len(prompts))]
        stats = self.take_stats() | comparison_metrics(result, len(pairs))
        rewards = FeedbackResult.from_scores(scores, kinds, stats)
        for kind, count in result.failures.items():   # per comparison, next to the per-response counts
            rewards.metrics[f"comparison_failures/{kind}"] = float(count)
        return rewards

    def score(self, prompts: list[str], responses: list[str]) -> FeedbackResult:
        if self.cfg.mode == "pairwise":
            return self.pairwise_rewards(prompts, responses)
        return self.pointwise(prompts, responses)


def comparison_metrics(result: Comparisons, total: int) -> dict[str, float]:
    return {"judge_comparisons": float(total),
            "judge_flip_rate": result.flips / max(result.judged, 1),
            "judge_kept_fraction": sum(result.kept) / max(total, 1)}
