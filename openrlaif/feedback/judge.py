"""The AI judge. `JudgeWorker` is the local backend's Ray actor (an HF model answering requests); `Judge` is the
driver-side logic shared by every backend: pointwise scores, pairwise preferences with position-swap debiasing and
the pairwise consistency filter, listwise rankings repeated in shuffled orders (Repeat Ranking, with Kendall's W),
the chain-of-thought readouts, and a verdict cache."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from openrlaif.config import JudgeConfig
from openrlaif.feedback.backends import JudgeRequest, Reply
from openrlaif.feedback.base import FeedbackResult, JudgeFailure, score_rows
from openrlaif.feedback.comparisons import adaptive_budget, bradley_terry, initial_pairs, least_certain_pairs
from openrlaif.feedback.judge_prompts import (POINTWISE_AFTER_RATIONALE, pairwise_after_rationale,
                                              after_rationale, choice_probability, expected_score, kendalls_w,
                                              listwise_messages, normalise, pairwise_messages, parse_choice,
                                              parse_ranking, parse_score, pointwise_messages, swap_debiased)
from openrlaif.rollout.collective import WeightReceiver
from openrlaif.workers.common import setup_process
from openrlaif.workers.weights import Weights, named_tensors
from openrlaif.workers.remote import remote

# Bumped whenever the way a reply is produced from a request changes (label-variant merging, ...): verdicts cached
# under an older version are then not reused.
READOUT_VERSION = 3


def label_token_ids(tokenizer, label: str) -> list[int]:
    """Every single token that reads as `label` once surrounding whitespace is stripped: "7", " 7", "\\n7"
    (byte-level BPE's "Ġ7", SentencePiece's "▁7"). A judge may answer with any of them; the label's probability
    is their sum. [] if the tokenizer has no single token for it."""
    ids = []
    for token, index in tokenizer.get_vocab().items():
        if label.isascii() and label not in token:   # every variant of an ASCII label holds it verbatim
            continue
        if tokenizer.convert_tokens_to_string([token]).strip() == label:
            ids.append(index)
    return sorted(ids)


def label_variants(tokenizer, label: str) -> list[tuple[int, ...]]:
    """Every token sequence the judge may answer `label` with: each single token that strips to it
    (`label_token_ids`: "7", "Ġ7"), and the tokenisations of the label with and without a leading space where the
    space is merged into the first token ("10" -> "1" "0" and "Ġ1" "0"; "(A)" -> "(" "A" ")"). A tokeniser that
    writes the space as a token of its own (SmolLM2: " 7" = " " "7") adds no variant for it: that is another
    answer, and reading it would cost a second pass for every single-token label. A label's probability is the sum
    over its variants (teacher-forced past the first token)."""
    variants = {(token,) for token in label_token_ids(tokenizer, label)}
    for text in (label, " " + label):
        ids = tuple(tokenizer.encode(text, add_special_tokens=False))
        if ids and tokenizer.decode(list(ids)).strip() == label and tokenizer.decode([ids[0]]).strip():
            variants.add(ids)
    return sorted(variants)


@remote
class JudgeWorker(WeightReceiver):
    """A causal LM answering JudgeRequests on its engine (`feedback.judge.engine`: vLLM with prefix caching, or
    HF): label probabilities by teacher forcing each label's token sequences (one position read for single-token
    labels), or generated text."""

    def __init__(self, model_path: str, *, dtype: str, threads: int, seed: int, max_prompt_tokens: int = 1024,
                 micro_batch_size: int = 8, trust_remote_code: bool = False, engine: str = "hf",
                 max_new_tokens: int = 8, kv_cache_gib: float = 0.5, gpu_memory_utilization: float = 0.3,
                 tensor_parallel_size: int = 1) -> None:
        setup_process(threads, seed)
        from transformers import AutoConfig, AutoTokenizer

        from openrlaif.feedback.judge_engines import HFJudgeEngine, VLLMJudgeEngine
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.context = getattr(config, "max_position_embeddings", None) or 10**9
        self.max_prompt_tokens = min(max_prompt_tokens, self.context - 1)
        if engine == "vllm":
            # room for the prompt, the longest generation, and a multi-token label's teacher-forced prefix
            max_model_len = min(self.context, self.max_prompt_tokens + max(max_new_tokens, 16))
            self.engine = VLLMJudgeEngine(model_path, dtype, max_model_len, seed, kv_cache_gib,
                                          gpu_memory_utilization, trust_remote_code, tensor_parallel_size)
            self.context = max_model_len
        else:
            self.engine = HFJudgeEngine(model_path, dtype, self.tokenizer.pad_token_id, micro_batch_size,
                                        trust_remote_code)
        self.variants: dict[str, list[tuple[int, ...]]] = {}

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        """Before the actor is killed: stop a tensor-parallel vLLM engine's processes."""
        getattr(getattr(self.engine, "engine", None), "close", lambda: None)()

    def update_weights(self, weights: Weights) -> float:
        """Self-rewarding: take the policy's new weights in place (names as the trainer's named_parameters)."""
        start = time.perf_counter()
        self.engine.update_weights(named_tensors(weights))
        return time.perf_counter() - start

    def _variants(self, label: str) -> list[tuple[int, ...]]:
        if label not in self.variants:
            variants = label_variants(self.tokenizer, label)
            if not variants:
                raise ValueError(f"feedback.judge: label {label!r} cannot be written with this judge's tokenizer. "
                                 "Fix: feedback.judge.readout=generate, or other labels.")
            self.variants[label] = variants
        return self.variants[label]

    def _encode(self, messages: list[dict], max_tokens: int = 0) -> list[int]:
        """The templated prompt, cut from the start (the end holds the question to answer) to max_prompt_tokens,
        and to what the model's positions leave after `max_tokens` generated ones."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return ids[-max(1, min(self.max_prompt_tokens, self.context - max_tokens)):]

    def score_continuations(self, prompts: list[list[int]], candidates: list[list[list[int]]]) -> list[list[float]]:
        """The engine's teacher-forced log P(candidate | prompt), in token ids (tests and tools)."""
        return self.engine.score_continuations(prompts, [[tuple(c) for c in options] for options in candidates])

    def complete(self, requests: list[JudgeRequest]) -> list[Reply]:
        replies: list[Reply | None] = [None] * len(requests)
        longest = {i: max((len(v) for label in r.labels for v in self._variants(label)), default=1)
                   for i, r in enumerate(requests) if r.labels is not None}
        encoded = [self._encode(r.messages, longest[i] - 1 if r.labels is not None else r.max_tokens)
                   for i, r in enumerate(requests)]
        labelled = [i for i, r in enumerate(requests) if r.labels is not None]
        if labelled:
            candidates = [[v for label in requests[i].labels for v in self._variants(label)] for i in labelled]
            logprobs = self.engine.score_continuations([encoded[i] for i in labelled], candidates)
            for i, options, values, hit in zip(labelled, candidates, logprobs, self.engine.cached):
                by_sequence = dict(zip(options, values))
                label_probs = {label: sum(math.exp(by_sequence[v]) for v in self._variants(label))
                               for label in requests[i].labels}
                replies[i] = Reply(label_probs=label_probs, prompt_tokens=len(encoded[i]), cached_tokens=hit)
        asked = [i for i, r in enumerate(requests) if r.labels is None]
        if asked:
            generated = self.engine.generate([encoded[i] for i in asked], [requests[i].max_tokens for i in asked],
                                             [requests[i].temperature for i in asked],
                                             [requests[i].seed for i in asked])
            for i, out in zip(asked, generated):
                replies[i] = Reply(text=self.tokenizer.decode(out.tokens, skip_special_tokens=True),
                                   prompt_tokens=len(encoded[i]), completion_tokens=len(out.tokens),
                                   cached_tokens=out.cached_tokens)
        return replies


class VerdictCache:
    """Successful replies keyed by (judge id, request). The judge id holds the backend's identity (the model's
    contents, dtype and prompt truncation; the endpoint, its model and top_logprobs), the readout version and,
    for a judge that follows the policy, the run and policy version; the request holds the messages (prompt,
    responses, their order, the rubric), labels, token budget, temperature and seed (the repeat index).
    Appended to a jsonl file, so a resumed or repeated run reuses verdicts exactly. Failures are not cached: a
    later run retries them."""

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

    def run(self, backend, requests: list[JudgeRequest]) -> tuple[list[Reply], list[bool]]:
        """(replies, fresh): fresh[i] is False where the reply came from the cache, i.e. no work was done."""
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
        return ([by_index[i] if i in by_index else self.entries[k] for i, k in enumerate(keys)],
                [i in by_index for i in range(len(keys))])


@dataclass
class Comparisons:
    """Pairwise verdicts for pairs (x_i, y_i): prob[i] = P(x_i ≻ y_i) after swap-debiasing (None = failed, or
    dropped by the consistency filter), plus what the metrics need."""
    prob: list[float | None]
    kept: list[bool]
    flips: int = 0
    judged: int = 0                    # pairs with both orders answered
    failures: Counter = field(default_factory=Counter)
    label_mass: list[float] = field(default_factory=list)   # probs readout: P(A) + P(B) of every answered verdict
    details: dict[str, str] = field(default_factory=dict)   # failure kind -> the first one's detail


def group_rows(prompts: list[str], group_ids: list[int] | None) -> dict:
    """Rows per rollout group. Without group ids (a library caller), rows with the same prompt text form a group."""
    keys = group_ids if group_ids is not None else prompts
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return groups


class Judge:
    """Every judge mode on top of a backend (LocalBackend or HTTPBackend)."""

    def __init__(self, backend, cfg: JudgeConfig, cache_path: str | None = None, model_name: str = "") -> None:
        """`model_name`: the judge model as configured (a short name, a folder, a served name); it picks the
        probs threshold when feedback.judge.min_label_mass is null."""
        from openrlaif.models.registry import default_min_label_mass
        self.backend, self.cfg = backend, cfg
        self.min_label_mass = (cfg.min_label_mass if cfg.min_label_mass is not None
                               else default_min_label_mass(model_name))
        self.judge_id = json.dumps([getattr(backend, "identity", backend.name), READOUT_VERSION], sort_keys=True)
        self.cache = VerdictCache(self.judge_id, cache_path if cfg.cache else None)
        self.stats: Counter = Counter()
        # the run's cumulative spend (fresh replies only; restored on resume from driver.json "judge_ledger")
        self.ledger: Counter = Counter()
        self.exhausted: str | None = None   # the budget key whose total is spent (the driver then stops the run)
        self.run_id = uuid.uuid4().hex   # a judge that follows the policy keys its verdicts by run and version
        labels_read = cfg.readout == "probs"
        self.style = {(True, False): "probs", (True, True): "rationale", (False, False): "generate",
                      (False, True): "cot"}[(labels_read, cfg.chain_of_thought)]

    def set_policy_version(self, version: int) -> None:
        """A judge that follows the policy answers differently after each weight sync. Its weights then depend on
        this run (its config, seed and data), not only on the model folder: key its verdicts by the run too, so
        another run in the same folder never gets them; a resume keeps the run id (driver.json)."""
        self.cache.judge_id = f"{self.judge_id}@run-{self.run_id}@policy-{version}"

    def _ask(self, requests: list[JudgeRequest]) -> list[Reply]:
        """Replies through the cache. Cost metrics count fresh replies only: a cached verdict cost nothing now."""
        start = time.perf_counter()
        replies, fresh = self.cache.run(self.backend, requests)
        done = [reply for reply, new in zip(replies, fresh) if new]
        self.stats["judge_requests"] += len(done)
        self.stats["judge_prompt_tokens"] += sum(r.prompt_tokens for r in done)
        self.stats["judge_generated_tokens"] += sum(r.completion_tokens for r in done)
        self.stats["judge_cached_prompt_tokens"] += sum(r.cached_tokens for r in done)
        self.stats["judge_rate_limited"] += sum(r.rate_limited for r in done)
        prompt_tokens = sum(r.prompt_tokens for r in done)
        completion_tokens = sum(r.completion_tokens for r in done)
        cost = self.cost(prompt_tokens, completion_tokens)
        self.stats["judge_cost"] += cost
        self.ledger.update({"requests": len(done), "prompt_tokens": prompt_tokens, "completion_tokens":
                            completion_tokens, "prompt_bytes": sum(request_bytes(requests[i]) for i, new
                                                                   in enumerate(fresh) if new)})
        self.ledger["cost"] += cost
        self.stats["judge_retries"] += sum(r.attempts - 1 for r in done)
        self.stats["judge_seconds"] += time.perf_counter() - start
        return replies

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.cfg.price_per_mtok_prompt
                + completion_tokens * self.cfg.price_per_mtok_completion) / 1e6

    def take_stats(self) -> dict[str, float]:
        stats = {k: float(v) for k, v in self.stats.items()}
        stats["judge_cache_hits"] = float(self.cache.hits)
        stats["judge_cost_total"] = float(self.ledger["cost"])
        stats["judge_tokens_total"] = float(self.ledger["prompt_tokens"] + self.ledger["completion_tokens"])
        self.stats.clear()
        self.cache.hits = 0
        return stats

    def generate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                 seeds: list[int]) -> list[Reply]:
        """Free text for each conversation (critiques, revisions), through the cache; failures are in the replies."""
        return self._ask([JudgeRequest(messages, None, max_tokens, temperature, seed)
                          for messages, seed in zip(conversations, seeds)])

    def _verdicts(self, prompts: list[list[dict]], labels: list[str] | None, follow_up: str,
                  seeds: list[int]) -> list[Reply]:
        """One reply per judge prompt. readout=generate: the reply's text holds the (marked) verdict. probs: the
        labels' next-token probabilities; with chain_of_thought, the RLAIF paper's two steps: the rationale is
        generated first, appended as the judge's own turn with `follow_up`, and the labels are read after it (a
        failed rationale is that verdict's failure)."""
        cfg = self.cfg
        if labels is None or not cfg.chain_of_thought:
            return self._ask([JudgeRequest(m, labels, cfg.max_new_tokens, cfg.temperature, s)
                              for m, s in zip(prompts, seeds)])
        rationales = self._ask([JudgeRequest(m, None, cfg.max_new_tokens, cfg.temperature, s)
                                for m, s in zip(prompts, seeds)])
        answered = [i for i, r in enumerate(rationales) if r.failure is None]
        replies = list(rationales)
        second = self._ask([JudgeRequest(after_rationale(prompts[i], rationales[i].text.strip(), follow_up), labels,
                                         cfg.max_new_tokens, 0.0, seeds[i]) for i in answered])
        for i, reply in zip(answered, second):
            replies[i] = reply
        return replies

    # ---------------------------------------------------------------------------------------------- pointwise
    def pointwise(self, prompts: list[str], responses: list[str],
                  conversations: list[list[dict]] | None = None) -> FeedbackResult:
        cfg = self.cfg
        labels = [str(s) for s in range(cfg.score_min, cfg.score_max + 1)] if cfg.readout == "probs" else None
        conversations = conversations or [None] * len(prompts)
        messages = [pointwise_messages(cfg.rubric, p, r, cfg.score_min, cfg.score_max, self.style, c)
                    for p, r, c in zip(prompts, responses, conversations)]
        follow_up = POINTWISE_AFTER_RATIONALE.format(score_min=cfg.score_min, score_max=cfg.score_max)
        scores, kinds, raw, mass, details = [], [], [], [], {}
        for reply in self._verdicts(messages, labels, follow_up, [0] * len(messages)):
            try:
                if reply.failure:
                    raise JudgeFailure(reply.failure, reply.detail)
                if labels:
                    mass.append(sum(reply.label_probs.values()))
                value = (expected_score({int(k): v for k, v in reply.label_probs.items()}, self.min_label_mass)
                         if labels else parse_score(reply.text, cfg.score_min, cfg.score_max))
            except JudgeFailure as failure:
                scores.append(None)
                kinds.append(failure.kind)
                details.setdefault(failure.kind, failure.detail)
                continue
            raw.append(value)
            scores.append(normalise(value, cfg.score_min, cfg.score_max))
            kinds.append(None)
        stats = self.take_stats()
        stats["judge_score_mean"] = sum(raw) / len(raw) if raw else float("nan")   # nothing judged: no number
        if mass:
            stats["judge_label_mass"] = sum(mass) / len(mass)
        return FeedbackResult.from_scores(scores, kinds, stats, details)

    # ---------------------------------------------------------------------------------------------- pairwise
    def compare(self, prompts: list[str], firsts: list[str], seconds: list[str],
                conversations: list[list[dict]] | None = None) -> Comparisons:
        """Both orders of every pair, `repeats` times each; P(x ≻ y) is the swap-debiased average. The pairwise
        consistency filter: with repeats > 1 (sampled, temperature > 0) or just the two orders, a pair is kept
        only if the share of verdicts agreeing with the majority reaches `consistency_threshold`."""
        cfg = self.cfg
        names = tuple(cfg.pairwise_labels)
        labels = list(names) if cfg.readout == "probs" else None
        conversations = conversations or [None] * len(prompts)
        messages, seeds = [], []
        orders = 2 if cfg.swap else 1     # swap=false: only (x, y), a position-bias study's switch
        for prompt, x, y, conversation in zip(prompts, firsts, seconds, conversations):
            for a, b in ((x, y), (y, x))[:orders]:
                for repeat in range(cfg.repeats):
                    messages.append(pairwise_messages(cfg.pairwise_rubric, prompt, a, b, self.style, conversation,
                                                      names))
                    seeds.append(repeat)
        replies = self._verdicts(messages, labels, pairwise_after_rationale(names), seeds)
        out = Comparisons(prob=[], kept=[])
        per_pair = orders * cfg.repeats
        for k in range(len(prompts)):
            probs: list[list[float]] = [[], []]   # P(A) per order, one per answered repeat
            failed = None
            for j, reply in enumerate(replies[k * per_pair:(k + 1) * per_pair]):
                try:
                    if reply.failure:
                        raise JudgeFailure(reply.failure, reply.detail)
                    if labels:
                        out.label_mass.append(sum(reply.label_probs.values()))
                    p_a = (choice_probability({"A": reply.label_probs.get(names[0], 0.0),
                                               "B": reply.label_probs.get(names[1], 0.0)}, self.min_label_mass)
                           if labels else float(parse_choice(reply.text) == "A"))
                except JudgeFailure as failure:
                    failed = failed or failure.kind
                    out.details.setdefault(failure.kind, failure.detail)
                    continue
                probs[j // cfg.repeats].append(p_a)
            if not probs[0] or (orders == 2 and not probs[1]):
                out.failures[failed or "unparseable"] += 1
                out.prob.append(None)
                out.kept.append(False)
                continue
            if orders == 1:   # nothing to debias with, and no flip to measure
                prob, flipped = sum(probs[0]) / len(probs[0]), False
            else:
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

    def pairwise_rewards(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
                         conversations: list[list[dict]] | None = None) -> FeedbackResult:
        """Per-response rewards from pairwise verdicts inside each rollout group, over the pairs that
        `pairwise_strategy` picks (feedback/comparisons.py): the win rate mean_j P(i ≻ j) over i's kept
        comparisons, or their Bradley–Terry log-strength (`pairwise_reward=bradley_terry`). A response with no
        kept comparison is masked. `adaptive` judges in rounds: a random cycle first, then the least certain pairs
        under the Bradley–Terry fit so far, until the budget."""
        cfg = self.cfg
        groups = [members for members in group_rows(prompts, group_ids).values()]
        rngs = [random.Random(f"{cfg.pairwise_strategy}:" + hashlib.sha256(json.dumps(
            [prompts[m[0]]] + [responses[i] for i in m]).encode()).hexdigest()) for m in groups]
        todo = [[(members[a], members[b]) for a, b in initial_pairs(len(members), cfg.pairwise_strategy, rng,
                                                                     cfg.pairwise_k)]
                for members, rng in zip(groups, rngs)]
        made: list[tuple[int, int, float | None]] = []     # (i, j, P(i ≻ j) or None) over every round
        total = Comparisons(prob=[], kept=[])
        while any(todo):
            pairs = [pair for group_pairs in todo for pair in group_pairs]
            result = self.compare([prompts[i] for i, _ in pairs], [responses[i] for i, _ in pairs],
                                  [responses[j] for _, j in pairs],
                                  [conversations[i] for i, _ in pairs] if conversations else None)
            merge_comparisons(total, result)
            made += [(i, j, prob) for (i, j), prob in zip(pairs, result.prob)]
            todo = [self._next_round(members, made) if cfg.pairwise_strategy == "adaptive" else []
                    for members in groups]
        wins = [0.0] * len(prompts)
        counts = [0] * len(prompts)
        for i, j, prob in made:
            if prob is None:
                continue
            wins[i] += prob
            wins[j] += 1.0 - prob
            counts[i] += 1
            counts[j] += 1
        if cfg.pairwise_reward == "bradley_terry":
            scores: list[float | None] = [None] * len(prompts)
            for members in groups:
                position = {row: k for k, row in enumerate(members)}
                fitted = bradley_terry(len(members), [(position[i], position[j], p) for i, j, p in made
                                                      if p is not None and i in position], cfg.bt_prior)
                for k, row in enumerate(members):
                    scores[row] = fitted[k] if counts[row] else None
        else:
            scores = [wins[i] / counts[i] if counts[i] else None for i in range(len(prompts))]
        kinds = [None if counts[i] else "no_kept_comparison" for i in range(len(prompts))]
        stats = self.take_stats() | comparison_metrics(total, len(made))
        stats["judge_comparisons_per_response"] = 2.0 * len(made) / max(len(prompts), 1)
        rewards = FeedbackResult.from_scores(scores, kinds, stats, {"no_kept_comparison": "; ".join(
            f"{kind}: {detail}" for kind, detail in total.details.items()) or "the consistency filter dropped them"})
        for kind, count in total.failures.items():   # per comparison, next to the per-response counts
            rewards.metrics[f"comparison_failures/{kind}"] = float(count)
        return rewards

    def _next_round(self, members: list[int], made: list[tuple[int, int, float | None]]) -> list[tuple[int, int]]:
        """Adaptive: the group's next pairs, the least certain under the Bradley–Terry fit of its verdicts so far,
        while the group is under its budget."""
        position = {row: k for k, row in enumerate(members)}
        mine = [(position[i], position[j], p) for i, j, p in made if i in position]
        left = adaptive_budget(len(members), self.cfg.pairwise_budget) - len(mine)
        if left <= 0:
            return []
        fitted = bradley_terry(len(members), [c for c in mine if c[2] is not None], self.cfg.bt_prior)
        done = {(min(i, j), max(i, j)) for i, j, _ in mine}
        return [(members[i], members[j]) for i, j in least_certain_pairs(fitted, done, left)]

    # ---------------------------------------------------------------------------------------------- listwise
    def rank_groups(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
                    conversations: list[list[dict]] | None = None) -> FeedbackResult:
        """Repeat Ranking (Devine 2024): each rollout group's K responses are ranked `rankings` times, each time
        presented in a freshly shuffled order. A response's reward is its mean rank mapped to [0, 1] (best 1);
        `consistency[group]` is Kendall's W of the group's rankings (1: all identical, 0: no agreement), which
        label.keep_top_fraction filters on. A ranking that does not parse is dropped (counted by kind); a group
        with none left is masked."""
        cfg = self.cfg
        groups = group_rows(prompts, group_ids)
        messages, seeds, orders, owners = [], [], [], []
        for key, rows in groups.items():
            if len(rows) < 2:
                continue
            conversation = conversations[rows[0]] if conversations else None
            content = json.dumps([prompts[rows[0]], conversation, [responses[r] for r in rows]])
            for repeat in range(cfg.rankings):
                # The order depends only on the group's content and the repeat: a resumed run asks the same questions
                order = list(range(len(rows)))
                random.Random(f"{repeat}:{hashlib.sha256(content.encode()).hexdigest()}").shuffle(order)
                messages.append(listwise_messages(cfg.listwise_rubric, prompts[rows[0]],
                                                  [responses[rows[i]] for i in order], self.style, conversation))
                seeds.append(repeat)
                orders.append(order)
                owners.append(key)
        replies = self._verdicts(messages, None, "", seeds)
        rankings: dict = {key: [] for key in groups}
        failures: Counter = Counter()
        first_detail: dict[str, str] = {}
        for reply, order, key in zip(replies, orders, owners):
            try:
                if reply.failure:
                    raise JudgeFailure(reply.failure, reply.detail)
                best_first = parse_ranking(reply.text, len(order))
            except JudgeFailure as failure:
                failures[failure.kind] += 1
                first_detail.setdefault(failure.kind, failure.detail)
                continue
            ranks = [0] * len(order)    # rank (1 = best) of each group member, in the group's own row order
            for position, shown in enumerate(best_first, start=1):
                ranks[order[shown]] = position
            rankings[key].append(ranks)
        scores: list[float | None] = [None] * len(prompts)
        kinds: list[str | None] = [None] * len(prompts)
        consistency = {}
        for key, rows in groups.items():
            if len(rows) < 2:
                for row in rows:
                    kinds[row] = "too_few_responses"
                continue
            if not rankings[key]:
                for row in rows:
                    kinds[row] = "no_ranking"
                continue
            consistency[key] = kendalls_w(rankings[key])
            size = len(rows)
            for member, row in enumerate(rows):
                mean_rank = sum(r[member] for r in rankings[key]) / len(rankings[key])
                scores[row] = (size - mean_rank) / (size - 1)
        stats = self.take_stats()
        stats["judge_rankings"] = float(len(messages))
        stats["judge_kendalls_w_mean"] = (sum(consistency.values()) / len(consistency) if consistency
                                          else float("nan"))
        for kind, count in failures.items():
            stats[f"ranking_failures/{kind}"] = float(count)
        why = "; ".join(f"{kind}: {detail}" for kind, detail in first_detail.items())
        result = FeedbackResult.from_scores(scores, kinds, stats, {"no_ranking": why, "too_few_responses":
                                                                   "a group of one response has nothing to rank"})
        result.consistency = consistency
        return result

    def score(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
              conversations: list[list[dict]] | None = None) -> FeedbackResult:
        """Rewards in the configured mode. Under a budget (feedback.judge.budget) only the groups that fit are
        judged, in order; the rest are masked `over_budget`."""
        rows = self._rows_within_budget(prompts, responses, group_ids, conversations)
        if rows is None:
            return self._score(prompts, responses, group_ids, conversations)
        rewards, valid = torch.zeros(len(prompts)), torch.zeros(len(prompts), dtype=torch.bool)
        part = (score_rows(self._score, rows, prompts, responses, group_ids, conversations, (rewards, valid)) if rows
                else FeedbackResult.from_scores([], metrics=self.take_stats()))
        failures = part.failures + Counter(over_budget=len(prompts) - len(rows))
        return FeedbackResult(rewards, valid, failures, part.metrics, part.consistency,
                              part.details | {"over_budget": self._over_budget_detail})

    def _score(self, prompts, responses, group_ids, conversations) -> FeedbackResult:
        if self.cfg.mode == "pairwise":
            return self.pairwise_rewards(prompts, responses, group_ids, conversations)
        if self.cfg.mode == "listwise":
            return self.rank_groups(prompts, responses, group_ids, conversations)
        return self.pointwise(prompts, responses, conversations)

    def _rows_within_budget(self, prompts, responses, group_ids, conversations) -> list[int] | None:
        """None without a budget, or when every group fits; else the rows of the groups that fit, in order.

        A group's spend is estimated before it is asked: its requests' UTF-8 bytes × the judge's tokens per byte
        measured so far (before any measurement 1 token per byte, an upper bound for byte-level tokenisers), plus
        each request's generated tokens. When the run's total budget is what stops a group, `exhausted` names it."""
        budget = self.cfg.budget
        if not (budget.tokens_per_step or budget.tokens_total or budget.cost_per_step or budget.cost_total):
            return None
        spent_tokens = self.ledger["prompt_tokens"] + self.ledger["completion_tokens"]
        limits = {"tokens_per_step": (budget.tokens_per_step, 0.0), "cost_per_step": (budget.cost_per_step, 0.0),
                  "tokens_total": (budget.tokens_total, spent_tokens), "cost_total": (budget.cost_total,
                                                                                       self.ledger["cost"])}
        room = {key: limit - used for key, (limit, used) in limits.items() if limit}
        per_byte = (1.1 * self.ledger["prompt_tokens"] / self.ledger["prompt_bytes"] if self.ledger["prompt_bytes"]
                    else 1.0)
        rows: list[int] = []
        for members in group_rows(prompts, group_ids).values():
            prompt_tokens, completion_tokens = self._group_estimate(members, prompts, responses, conversations)
            prompt_tokens = prompt_tokens * per_byte
            need = {"tokens_per_step": prompt_tokens + completion_tokens, "tokens_total": prompt_tokens +
                    completion_tokens, "cost_per_step": self.cost(prompt_tokens, completion_tokens),
                    "cost_total": self.cost(prompt_tokens, completion_tokens)}
            short = [key for key in room if need[key] > room[key]]
            if short:
                if any(key.endswith("_total") for key in short):
                    self.exhausted = f"feedback.judge.budget.{next(k for k in short if k.endswith('_total'))}"
                self._over_budget_detail = (f"feedback.judge.budget.{short[0]}: this step's remaining "
                                            f"{room[short[0]]:.4g} does not fit the next group's estimated "
                                            f"{need[short[0]]:.4g}")
                break
            for key in room:
                room[key] -= need[key]
            rows += members
        if len(rows) == len(prompts):
            return None
        return sorted(rows)

    def _group_estimate(self, members, prompts, responses, conversations) -> tuple[float, float]:
        """(prompt bytes, generated tokens) the group's requests will take, before any is sent."""
        cfg = self.cfg
        overhead = 64 + len(cfg.rubric.encode()) + 400   # template, the rubric, the answer instructions
        prompt = len((json.dumps(conversations[members[0]]) if conversations else prompts[members[0]]).encode())
        sizes = [len(responses[i].encode()) for i in members]
        generated = 1 if cfg.readout == "probs" and not cfg.chain_of_thought else cfg.max_new_tokens
        steps = 2 if cfg.chain_of_thought and cfg.readout == "probs" else 1
        n = len(members)
        if cfg.mode == "pointwise":
            return steps * sum(overhead + prompt + size for size in sizes), steps * n * generated
        if cfg.mode == "listwise":
            return cfg.rankings * (overhead + prompt + sum(sizes) + 16 * n), cfg.rankings * cfg.max_new_tokens
        pairs = {"all": n * (n - 1) / 2, "anchor": n - 1, "k_random": min(n * cfg.pairwise_k, n * (n - 1) / 2),
                 "adaptive": adaptive_budget(n, cfg.pairwise_budget)}[cfg.pairwise_strategy] if n > 1 else 0
        requests = 2 * cfg.repeats * pairs
        mean = sum(sizes) / n
        return steps * requests * (overhead + prompt + 2 * mean), steps * requests * generated


def request_bytes(request: JudgeRequest) -> int:
    return sum(len(str(m.get("content", "")).encode()) for m in request.messages)


def merge_comparisons(into: Comparisons, more: Comparisons) -> None:
    """Add a round's comparisons to the run's totals (adaptive judging asks in rounds)."""
    into.prob += more.prob
    into.kept += more.kept
    into.flips += more.flips
    into.judged += more.judged
    into.failures.update(more.failures)
    into.label_mass += more.label_mass
    for kind, detail in more.details.items():
        into.details.setdefault(kind, detail)


def comparison_metrics(result: Comparisons, total: int) -> dict[str, float]:
    out = {"judge_comparisons": float(total),
           "judge_flip_rate": result.flips / max(result.judged, 1),
           "judge_kept_fraction": sum(result.kept) / max(total, 1)}
    if result.label_mass:
        out["judge_label_mass"] = sum(result.label_mass) / len(result.label_mass)
    return out
