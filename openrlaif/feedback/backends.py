"""Judge backends behind one interface: `complete(requests) -> replies`, one reply per request, in order.

A request is chat messages plus either `labels` (read the next-token probability of each label: "1".."9", or
"A"/"B") or nothing (generate text to parse). A label's probability is the sum over every token that reads as it
once surrounding whitespace is stripped ("7", " 7", "\n7"), in both backends. Backends never raise on a bad
judgement: a reply carries a typed `failure` instead (timeout, endpoint_error, bad_response), which the judge masks
and counts.

Each backend has an `identity`: everything besides the request that changes its answers (the model's contents,
dtype and prompt truncation; the endpoint, its model and top_logprobs). The verdict cache keys on it.

- LocalBackend: the judge model in its own Ray worker group (JudgeWorker, HF on CPU or GPU).
- HTTPBackend: any OpenAI-compatible endpoint (`/v1/chat/completions`: vLLM, SGLang, TGI, OpenAI, ...), with a
  concurrency limit, a timeout, and retries with exponential backoff. The API key is read from the environment
  variable the config names; it is never stored in the config or logged.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from openrlaif.batch import split_evenly

# bad_response details of a broken transfer (a cut JSON body, a cut HTTP body): worth retrying, unlike a complete
# reply that has no usable verdict.
RETRIED = ("json", "http")


@dataclass
class JudgeRequest:
    messages: list[dict]
    labels: list[str] | None = None      # read these tokens' probabilities instead of generating
    max_tokens: int = 8
    temperature: float = 0.0
    seed: int = 0


@dataclass
class Reply:
    text: str = ""
    label_probs: dict[str, float] = field(default_factory=dict)
    failure: str | None = None           # timeout | endpoint_error | bad_response (after the retries)
    detail: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    cached_tokens: int = 0               # prompt tokens read from the local vLLM judge's prefix cache
    rate_limited: int = 0                # HTTP 429 answers waited out (apart from `attempts`)


def model_fingerprint(path: str, chunks: int = 16, chunk_bytes: int = 1 << 16) -> str:
    """A short hash of a model folder's contents: the name, size and `chunks` evenly spaced 64 KiB samples of
    every weight file, plus the config and tokenizer files whole. Retraining changes essentially every weight, so
    two checkpoints written to the same path get different fingerprints; reading 1 MiB per file keeps it cheap
    for a 70B model. A path that is not a folder is hashed by name (a served model name, say)."""
    digest = hashlib.sha256(path.encode())
    if not os.path.isdir(path):
        return digest.hexdigest()[:16]
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        size = os.path.getsize(full)
        digest.update(f"{name}:{size}".encode())
        with open(full, "rb") as handle:
            if name.endswith((".json", ".txt", ".model", ".jinja")) and size <= 64 << 20:
                digest.update(handle.read())
                continue
            for k in range(chunks):
                handle.seek(max(0, (size - chunk_bytes) * k // max(chunks - 1, 1)))
                digest.update(handle.read(chunk_bytes))
    return digest.hexdigest()[:16]


class LocalBackend:
    """Fans requests out over the JudgeWorker group (contiguous shards, one call per worker). Requests are sent
    sorted by their messages, so those sharing a prefix (the rubric and a prompt: a group's responses, both orders
    of a pair) are adjacent and land on the same worker, whose vLLM engine then reuses the prefix's KV blocks."""

    def __init__(self, group, name: str, dtype: str = "float32", max_prompt_tokens: int = 1024,
                 engine: str = "hf") -> None:
        self.group, self.name = group, name
        self.identity = {"backend": "local", "model": name, "weights": model_fingerprint(name), "dtype": dtype,
                         "max_prompt_tokens": max_prompt_tokens, "engine": engine}

    def complete(self, requests: list[JudgeRequest]) -> list[Reply]:
        import ray
        if not requests:
            return []
        order = prefix_order(requests)
        ordered = [requests[i] for i in order]
        shards = split_evenly(len(ordered), min(len(self.group), len(ordered)))
        refs = self.group.map(lambda worker, span: worker.complete.remote(ordered[span]), shards)
        replies: list[Reply | None] = [None] * len(requests)
        for i, reply in zip(order, (reply for shard in ray.get(refs) for reply in shard)):
            replies[i] = reply
        return replies


class Coalesced:
    """A backend for many threads that each send a request or two (one per episode, from run_episodes' pool):
    every call waits `window_s` for the others, then the first caller to wake sends everything pending as one
    `complete` (one batch for the engine) and each caller gets its own replies. An error in that call is every
    caller's."""

    def __init__(self, backend, window_s: float = 0.02) -> None:
        self.backend, self.window_s = backend, window_s
        self.lock, self.pending = threading.Lock(), []
        self.calls = 0   # backend calls made (a test reads it)

    def complete(self, requests: list[JudgeRequest]) -> list[Reply]:
        futures = [Future() for _ in requests]
        with self.lock:
            self.pending += zip(requests, futures)
        time.sleep(self.window_s)
        with self.lock:
            batch, self.pending = self.pending, []
            self.calls += bool(batch)
        if batch:
            try:
                for (_, future), reply in zip(batch, self.backend.complete([r for r, _ in batch])):
                    future.set_result(reply)
            except Exception as err:   # noqa: BLE001 - handed to every caller of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
        return [future.result() for future in futures]


def prefix_order(requests: list[JudgeRequest]) -> list[int]:
    """Request indices sorted by their messages' text: requests that share a prefix end up adjacent."""
    return sorted(range(len(requests)), key=lambda i: json.dumps(requests[i].messages, ensure_ascii=False))


class TokenBucket:
    """A client-side rate limit: `per_minute` units refill evenly over each minute, a minute's worth at most.
    `take` waits until the amount is there (shared by the request threads)."""

    def __init__(self, per_minute: float) -> None:
        import threading
        self.rate, self.capacity = per_minute / 60.0, per_minute
        self.level, self.stamp, self.lock = per_minute, time.monotonic(), threading.Lock()

    def take(self, amount: float, wait: bool = True) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
                self.stamp = now
                if not wait or self.level >= min(amount, self.capacity):
                    self.level -= amount
                    return
                delay = (min(amount, self.capacity) - self.level) / self.rate
            time.sleep(min(delay, 5.0))


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP Retry-After header (seconds, or an HTTP date) as seconds from now, capped at 10 minutes."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), 600.0)


def post_json(url: str, body: bytes, api_key_env: str, timeout_s: float) -> tuple[bytes | None, Reply | None]:
    """One POST to an OpenAI-compatible endpoint (the key, if any, from $api_key_env): the raw reply, or None and a
    failed Reply saying why: `rate_limited` (with its Retry-After as `retry_after`), `endpoint_error`, `timeout`,
    or `bad_response` for a transfer that broke. Never raises for what the network or the server does."""
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers),
                                    timeout=timeout_s) as response:
            return response.read(), None
    except urllib.error.HTTPError as err:
        if err.code == 429:
            reply = Reply(failure="rate_limited", detail=f"HTTP 429 (Retry-After: {err.headers.get('Retry-After')})")
            reply.retry_after = retry_after_seconds(err.headers.get("Retry-After"))
            return None, reply
        return None, Reply(failure="endpoint_error", detail=f"HTTP {err.code}")
    except http.client.HTTPException as err:
        # A body cut short of its Content-Length (IncompleteRead), a garbled status line (BadStatusLine): the
        # transfer broke, not the server's answer, so it is retried like a cut JSON body. RemoteDisconnected is
        # both an HTTPException and a ConnectionError; it is the same kind of break.
        return None, Reply(failure="bad_response", detail=f"http: {type(err).__name__}: {str(err)[:120]}")
    except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as err:
        reason = getattr(err, "reason", err)
        kind = "timeout" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else "endpoint_error"
        return None, Reply(failure=kind, detail=str(reason)[:200])


class HTTPBackend:
    """OpenAI-compatible chat completions over HTTP. Label probabilities come from `top_logprobs` of the first
    generated token (labels missing from the top list get 0)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "", timeout_s: float = 30.0,
                 max_retries: int = 2, backoff_s: float = 0.5, concurrency: int = 8, top_logprobs: int = 20,
                 requests_per_minute: float = 0.0, tokens_per_minute: float = 0.0,
                 max_rate_limit_waits: int = 8) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s, self.max_retries, self.backoff_s = model, timeout_s, max_retries, backoff_s
        self.concurrency, self.top_logprobs = concurrency, top_logprobs
        self.request_bucket = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.token_bucket = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self.max_rate_limit_waits = max_rate_limit_waits
        self.name = f"{base_url}|{model}"
        self.identity = {"backend": "http", "url": self.url, "model": model, "top_logprobs": top_logprobs}
        self._api_key_env = api_key_env

    def complete(self, requests: list[JudgeRequest]) -> list[Reply]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, requests))

    def probe(self) -> None:
        """One short request before the first step, so an endpoint that is down, hangs, rejects the key or serves
        another model is a start-up error naming the URL, not a run whose every verdict fails. ConfigError."""
        from openrlaif.config import ConfigError
        if self._api_key_env and not os.environ.get(self._api_key_env):
            print(f"[openrlaif] warning: ${self._api_key_env} (feedback.judge.api_key_env) is not set: requests "
                  "to the judge go without an API key")
        reply = self._attempt(JudgeRequest([{"role": "user", "content": "Reply with OK."}], None, 1, 0.0))
        if reply.failure and reply.failure != "rate_limited":   # a 429 is an endpoint that answers
            raise ConfigError(
                f"feedback.judge.base_url={self.url.rsplit('/chat/completions', 1)[0]}: the endpoint did not answer "
                f"a probe request ({reply.failure}: {reply.detail}). Nothing was started. Fix: start the server or "
                f"correct the URL (POST {self.url} must serve model {self.model!r}); HTTP 401/403 means the key in "
                f"${self._api_key_env} is wrong; a timeout, an endpoint that does not answer within "
                "feedback.judge.timeout_s.")


    def _body(self, request: JudgeRequest) -> bytes:
        body = {"model": self.model, "messages": request.messages, "temperature": request.temperature,
                "seed": request.seed, "max_tokens": 1 if request.labels else request.max_tokens}
        if request.labels:
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
        return json.dumps(body).encode()

    def _one(self, request: JudgeRequest) -> Reply:
        """Up to max_retries re-sends after a timeout, an HTTP error or a cut reply, with exponential backoff. An
        HTTP 429 is waited out for its Retry-After (else the backoff), up to max_rate_limit_waits times in a row,
        without using a retry; the reply counts them in `rate_limited`."""
        reply, attempt, waits = Reply(), 0, 0
        while True:
            if self.request_bucket:
                self.request_bucket.take(1)
            if self.token_bucket:   # the body's size is only needed to estimate its tokens
                estimate = len(self._body(request)) / 3 + (1 if request.labels else request.max_tokens)
                self.token_bucket.take(estimate)
            reply = self._attempt(request)
            if self.token_bucket and reply.failure is None:   # settle the estimate against what was used
                self.token_bucket.take(reply.prompt_tokens + reply.completion_tokens - estimate, wait=False)
            if reply.failure == "rate_limited" and waits < self.max_rate_limit_waits:
                waits += 1
                time.sleep(getattr(reply, "retry_after", None) or self.backoff_s * 2 ** (waits - 1))
                continue
            reply.attempts, reply.rate_limited = attempt + 1, waits
            if reply.failure == "rate_limited":
                reply.failure = "endpoint_error"
                reply.detail = f"{reply.detail}, still after {waits} waits (feedback.judge.max_rate_limit_waits)"
                return reply
            if reply.failure is None or (reply.failure == "bad_response" and not reply.detail.startswith(RETRIED)):
                return reply    # a well-formed reply without a usable verdict is not retried: it would repeat
            if attempt >= self.max_retries:
                return reply
            attempt += 1
            time.sleep(self.backoff_s * 2 ** (attempt - 1))

    def _attempt(self, request: JudgeRequest) -> Reply:
        raw, failed = post_json(self.url, self._body(request), self._api_key_env, self.timeout_s)
        if failed is not None:
            return failed
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as err:
            return Reply(failure="bad_response", detail=f"json: {type(err).__name__}: {raw[:80]!r}")
        usage = payload.get("usage") or {}
        reply = Reply(text=text, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                      completion_tokens=int(usage.get("completion_tokens", 0)))
        if request.labels:
            try:
                top = choice["logprobs"]["content"][0]["top_logprobs"]
            except (KeyError, IndexError, TypeError):
                return Reply(failure="bad_response", detail="no top_logprobs in the reply (does the endpoint "
                                                            "support logprobs?)")
            probs = {label: 0.0 for label in request.labels}
            for entry in top:
                token = str(entry.get("token", "")).strip()
                if token in probs:
                    probs[token] += math.exp(float(entry["logprob"]))
            reply.label_probs = probs
        return reply
