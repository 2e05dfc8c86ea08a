"""The AI judge. `JudgeWorker` is the local backend's Ray actor (an HF model answering requests); `Judge` is the
driver-side logic shared by every backend: pointwise scores, pairwise preferences with position-swap debiasing and
the pairwise consistency filter, listwise rankings repeated in shuffled orders (Repeat Ranking, with Kendall's W),
the chain-of-thought readouts, and a verdict cache."""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import combinations

import ray
import torch

from openrlaif.batch import left_pad
from openrlaif.config import JudgeConfig
from openrlaif.feedback.backends import JudgeRequest, Reply
from openrlaif.feedback.base import FeedbackResult, JudgeFailure
from openrlaif.feedback.judge_prompts import (PAIRWISE_AFTER_RATIONALE, POINTWISE_AFTER_RATIONALE,
                                              after_rationale, choice_probability, expected_score, kendalls_w,
                                              listwise_messages, normalise, pairwise_messages, parse_choice,
                                              parse_ranking, parse_score, pointwise_messages, swap_debiased)
from openrlaif.workers.common import accepts_logits_to_keep, load_causal_lm, setup_process
from openrlaif.workers.weights import Weights, named_tensors

# Bumped whenever the way a reply is produced from a request changes (label-variant merging, ...): verdicts cached
# under an older version are then not reused.
READOUT_VERSION = 2


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
        self.label_ids: dict[str, list[int]] = {}

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

    def _label_ids(self, label: str) -> list[int]:
        if label not in self.label_ids:
            ids = label_token_ids(self.tokenizer, label)
            if not ids:
                raise ValueError(f"feedback.judge: label {label!r} is no single token for this judge's tokenizer; "
                                 "reading label probabilities needs one. Fix: feedback.judge.readout=generate, or a "
                                 "smaller feedback.judge.score_max.")
            self.label_ids[label] = ids
        return self.label_ids[label]

    def _encode(self, messages: list[dict], max_tokens: int = 0) -> list[int]:
        """The templated prompt, cut from the start (the end holds the question to answer) to max_prompt_tokens,
        and to what the model's positions leave after `max_tokens` generated ones."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        context = getattr(self.model.config, "max_position_embeddings", None) or 10**9
        return ids[-max(1, min(self.max_prompt_tokens, context - max_tokens)):]

    @torch.no_grad()
    def complete(self, requests: list[JudgeRequest]) -> list[Reply]:
        replies: list[Reply | None] = [None] * len(requests)
        encoded = [self._encode(r.messages, 0 if r.labels else r.max_tokens) for r in requests]
        for wants_labels in (True, False):
            index = [i for i, r in enumerate(requests) if (r.labels is not None) == wants_labels]
            for lo in range(0, len(index), self.micro_batch_size):
                chunk = index[lo:lo + self.micro_batch_size]
                ids, mask = (t.to(self.device) for t in left_pad([encoded[i] for i in chunk],
                                                                 self.tokenizer.pad_token_id))
                if wants_labels:
                    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                    last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(self.model) else {}
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                        **last_only).logits[:, -1]
                    probs = logits.float().softmax(-1).cpu()
                    for row, i in enumerate(chunk):
                        label_probs = {label: float(probs[row, self._label_ids(label)].sum())
                                       for label in requests[i].labels}
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
        self.stats["judge_retries"] += sum(r.attempts - 1 for r in done)
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
        labels = ["A", "B"] if cfg.readout == "probs" else None
        conversations = conversations or [None] * len(prompts)
        messages, seeds = [], []
        for prompt, x, y, conversation in zip(prompts, firsts, seconds, conversations):
            for a, b in ((x, y), (y, x)):
                for repeat in range(cfg.repeats):
                    messages.append(pairwise_messages(cfg.pairwise_rubric, prompt, a, b, self.style, conversation))
                    seeds.append(repeat)
        replies = self._verdicts(messages, labels, PAIRWISE_AFTER_RATIONALE, seeds)
        out = Comparisons(prob=[], kept=[])
        per_pair = 2 * cfg.repeats
        for k in range(len(prompts)):
            probs: list[list[float]] = [[], []]   # P(A) per order, one per answered repeat
            failed = None
            for j, reply in enumerate(replies[k * per_pair:(k + 1) * per_pair]):
                try:
                    if reply.failure:
                        raise JudgeFailure(reply.failure, reply.detail)
                    if labels:
                        out.label_mass.append(sum(reply.label_probs.values()))
                    p_a = (choice_probability(reply.label_probs, self.min_label_mass) if labels
                           else float(parse_choice(reply.text) == "A"))
                except JudgeFailure as failure:
                    failed = failed or failure.kind
                    out.details.setdefault(failure.kind, failure.detail)
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

    def pairwise_rewards(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
                         conversations: list[list[dict]] | None = None) -> FeedbackResult:
        """Per-response rewards from pairwise verdicts inside each rollout group: the win rate mean_j P(i ≻ j)
        over the group's kept comparisons. A response with none kept is masked."""
        groups = group_rows(prompts, group_ids)
        pairs = [(i, j) for members in groups.values() for i, j in combinations(members, 2)]
        result = self.compare([prompts[i] for i, _ in pairs], [responses[i] for i, _ in pairs],
                              [responses[j] for _, j in pairs],
                              [conversations[i] for i, _ in pairs] if conversations else None)
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
        rewards = FeedbackResult.from_scores(scores, kinds, stats, {"no_kept_comparison": "; ".join(
            f"{kind}: {detail}" for kind, detail in result.details.items()) or "the consistency filter dropped them"})
        for kind, count in result.failures.items():   # per comparison, next to the per-response counts
            rewards.metrics[f"comparison_failures/{kind}"] = float(count)
        return rewards

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
        if self.cfg.mode == "pairwise":
            return self.pairwise_rewards(prompts, responses, group_ids, conversations)
        if self.cfg.mode == "listwise":
            return self.rank_groups(prompts, responses, group_ids, conversations)
        return self.pointwise(prompts, responses, conversations)


def comparison_metrics(result: Comparisons, total: int) -> dict[str, float]:
    out = {"judge_comparisons": float(total),
           "judge_flip_rate": result.flips / max(result.judged, 1),
           "judge_kept_fraction": sum(result.kept) / max(total, 1)}
    if result.label_mass:
        out["judge_label_mass"] = sum(result.label_mass) / len(result.label_mass)
    return out
