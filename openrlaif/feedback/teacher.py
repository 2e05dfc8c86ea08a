"""On-policy distillation's teacher behind an endpoint (teacher.base_url): an OpenAI-compatible /v1/completions
server that returns prompt log-probs, as `vllm serve <teacher>` does. Each sample's token ids go as the prompt with
`echo: true, logprobs: 0, max_tokens: 1`; `choices[0].logprobs.token_logprobs[i]` is log p(token i | tokens < i)
(None for the first), so the response tokens' entries are the teacher's per-token log-probs. A request that fails
after its retries masks its sample (counted), it never stops the run."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from openrlaif.batch import Batch
from openrlaif.feedback.backends import post_json


class EndpointTeacher:
    def __init__(self, base_url: str, model: str, api_key_env: str = "", timeout_s: float = 60.0,
                 max_retries: int = 2, concurrency: int = 8, backoff_s: float = 0.5) -> None:
        self.url = base_url.rstrip("/") + "/completions"
        self.model, self.api_key_env, self.timeout_s = model, api_key_env, timeout_s
        self.max_retries, self.concurrency, self.backoff_s = max_retries, concurrency, backoff_s

    def _attempt(self, token_ids: list[int]) -> tuple[list | None, str, float | None]:
        """One request: the prompt's log-probs, or None, why, and how long the server asked to wait (HTTP 429)."""
        body = json.dumps({"model": self.model, "prompt": token_ids, "echo": True, "logprobs": 0, "max_tokens": 1,
                           "temperature": 0.0}).encode()
        raw, failed = post_json(self.url, body, self.api_key_env, self.timeout_s)
        if failed is not None:
            return None, f"{failed.failure}: {failed.detail}", getattr(failed, "retry_after", None)
        try:
            values = ((json.loads(raw).get("choices") or [{}])[0].get("logprobs") or {}).get("token_logprobs")
        except (ValueError, AttributeError, IndexError, TypeError) as err:
            return None, f"bad_response: json: {type(err).__name__}: {raw[:80]!r}", None
        if not isinstance(values, list) or len(values) < len(token_ids):
            return None, (f"bad_response: {len(values) if isinstance(values, list) else 'no'} prompt log-probs for "
                          f"{len(token_ids)} prompt tokens (does the endpoint echo the prompt's log-probs?)"), None
        return values, "", None

    def _row(self, token_ids: list[int], first: int, count: int) -> tuple[list[float] | None, str]:
        """The log-probs of tokens first .. first + count - 1 of the row, or None and why, after the retries (an
        HTTP 429 waits its Retry-After, else the backoff)."""
        error = ""
        for attempt in range(self.max_retries + 1):
            values, error, retry_after = self._attempt(token_ids)
            if values is not None:
                try:
                    return [float(v) for v in values[first:first + count]], ""
                except (TypeError, ValueError) as err:   # a None or a non-number among the response's entries
                    error = f"bad_response: {type(err).__name__}: {str(err)[:160]}"
            if attempt < self.max_retries:
                time.sleep(retry_after or self.backoff_s * 2 ** attempt)
        return None, error

    def logprobs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(B, R) teacher log-probs of the response tokens (0 past a response's end), (B,) whether each row's
        request succeeded, and the first failure's words ("" when none failed). Rows go concurrently."""
        mask, response_mask = batch["attention_mask"], batch["response_mask"]
        prompt_width = mask.shape[1] - response_mask.shape[1]
        rows = []
        for row in range(len(batch)):
            ids = batch["input_ids"][row][mask[row] > 0].tolist()
            rows.append((ids, int(mask[row, :prompt_width].sum()), int(response_mask[row].sum())))
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(lambda args: self._row(*args), rows))
        out = torch.zeros_like(response_mask, dtype=torch.float32)
        valid = torch.ones(len(batch), dtype=torch.bool)
        first_error = ""
        for row, (values, error) in enumerate(results):
            if values is None:
                valid[row] = False
                first_error = first_error or error
                continue
            out[row, :len(values)] = torch.tensor(values)
        return out, valid, first_error

    def probe(self) -> None:
        """One request before the first step: an endpoint that is down or returns no prompt log-probs is a
        start-up error naming teacher.base_url."""
        from openrlaif.config import ConfigError
        values, error = self._row([1, 2, 3], 1, 2)
        if values is None:
            raise ConfigError(f"teacher.base_url={self.url.rsplit('/completions', 1)[0]}: the endpoint did not return "
                              f"prompt log-probs for a probe ({error}). Nothing was started. Fix: start the server "
                              f"(POST {self.url} with echo=true and logprobs must serve model {self.model!r}, e.g. "
                              "`vllm serve <teacher>`), or a local teacher: teacher.model=<folder>, teacher.base_url=''.")
