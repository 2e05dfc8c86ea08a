"""A small OpenAI-compatible chat-completions server around a (tiny) HF model, with fault injection, for the HTTP
judge tests. A request whose last message contains `FAULT:<kind>` gets that fault:

    slow          sleep `slow_s` before answering (the client times out)
    error500      HTTP 500
    error500once  HTTP 500 the first time this exact request arrives, a normal answer after (a retry succeeds)
    garbage       200 with reply text "banana" and no label tokens among the logprobs
    truncated     200 with the JSON body cut in half
    cutbody       200 announcing `Content-Length: 200`, then 13 bytes and the connection closed (IncompleteRead)
    badstatus     a garbled status line instead of an HTTP response (BadStatusLine)
    positional    (listwise) the ranking follows the presentation order: "Ranking: 1 > 2 > ... > K"
    ratelimit     HTTP 429 with `Retry-After: 1` the first two times this exact request arrives, then an answer

`always` = "A" makes every answer "A" with probability 1 (a maximally position-biased judge); `prefer` = "shorter"
answers every pairwise request with the shorter response, in whichever position (a consistent judge). A listwise request
("[Response 1]" ...) is answered by rule, not by the model: shortest response first, ties by text, so its rankings
of a group agree whatever the order shown. `api_key` set: requests without `Authorization: Bearer <key>` get 401.
Run standalone:
    python tests/judge_server.py --model PATH --port 8000
"""
from __future__ import annotations

import argparse
import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

FAULT = re.compile(r"FAULT:(\w+)")


class JudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model_path: str, port: int = 0, slow_s: float = 3.0, always: str = "", api_key: str = "",
                 prefer: str = ""):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        super().__init__(("127.0.0.1", port), Handler)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        self.slow_s, self.always, self.api_key, self.prefer = slow_s, always, api_key, prefer
        self.lock = threading.Lock()
        self.faults: Counter = Counter()      # injected, by kind
        self.requests = 0
        self.seen: set[str] = set()
        self.contents: list[str] = []         # every request's last message, as the judge was asked
        self.limited: Counter = Counter()     # ratelimit: 429s sent per request body

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def start(self) -> "JudgeServer":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    @torch.no_grad()
    def answer(self, body: dict) -> dict:
        ids = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
        ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
        max_tokens = int(body.get("max_tokens") or 16)
        with self.lock:
            logits = self.model(input_ids=ids).logits[0, -1].float()
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        logprobs = logits.log_softmax(-1)
        k = int(body.get("top_logprobs") or 0)
        top = [{"token": self.tokenizer.decode([int(t)]), "logprob": float(logprobs[t])}
               for t in logprobs.topk(min(k, logprobs.numel())).indices] if body.get("logprobs") else []
        if self.always:
            text, top = self.always, [{"token": self.always, "logprob": 0.0}]
        pair = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\n", body["messages"][-1]["content"], re.S)
        if self.prefer == "shorter" and pair:   # a judge with known answers: the shorter response, in any order
            text = "A" if len(pair.group(1)) <= len(pair.group(2)) else "B"
            top = [{"token": text, "logprob": 0.0}]
        return completion(text, top, ids.shape[1], len(new))

    @torch.no_grad()
    def prompt_logprobs(self, body: dict) -> dict:
        """/v1/completions as vLLM answers `echo: true, logprobs: 0` over a token-id prompt: the log-prob of every
        prompt token given the ones before it (None for the first), then one greedy token. A prompt whose first
        token is 0 is answered without log-probs (a teacher fault for the tests)."""
        ids = torch.tensor([list(body["prompt"])])
        with self.lock:
            self.requests += 1
            logprobs = self.model(input_ids=ids).logits[0].float().log_softmax(-1)
        if int(ids[0, 0]) == 0:
            return {"choices": [{"text": "", "logprobs": None}]}
        values = [None] + [float(logprobs[i - 1, ids[0, i]]) for i in range(1, ids.shape[1])]
        token = int(logprobs[-1].argmax())
        return {"object": "text_completion", "model": body.get("model", "teacher"),
                "choices": [{"index": 0, "text": self.tokenizer.decode([token]), "finish_reason": "length",
                             "logprobs": {"tokens": [self.tokenizer.decode([t]) for t in ids[0].tolist() + [token]],
                                          "token_logprobs": values + [float(logprobs[-1, token])]}}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": 1}}


def completion(text: str, top: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    first = top[0]["token"] if top else text[:1]
    return {"id": "cmpl-test", "object": "chat.completion", "model": "judge",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": [{"token": first, "logprob": top[0]["logprob"] if top else 0.0,
                                                   "top_logprobs": top}]} if top else None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}


class Handler(BaseHTTPRequestHandler):
    server: JudgeServer

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, payload: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        server = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
            return self._send(401, b'{"error": "bad key"}')
        body = json.loads(raw)
        if self.path.endswith("/completions") and not self.path.endswith("/chat/completions"):
            return self._send(200, json.dumps(server.prompt_logprobs(body)).encode())
        content = body["messages"][-1]["content"]
        with server.lock:
            server.contents.append(content)
        match = FAULT.search(content)
        kind = match.group(1) if match else None
        with server.lock:
            server.requests += 1
            if kind == "error500once":
                first_time = raw not in server.seen
                server.seen.add(raw)
                kind = kind if first_time else None
            if kind == "ratelimit":
                server.limited[raw] += 1
                kind = kind if server.limited[raw] <= 2 else None
            if kind:
                server.faults[kind] += 1
        if kind == "slow":
            time.sleep(server.slow_s)
        if kind in ("error500", "error500once"):
            return self._send(500, b'{"error": "injected"}')
        if kind == "ratelimit":
            return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "1"})
        if kind == "cutbody":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "200")
            self.end_headers()
            self.wfile.write(b'{"choices": [')
            self.wfile.flush()
            self.close_connection = True
            return None
        if kind == "badstatus":
            self.wfile.write(b"garbled\r\n\r\n")
            self.close_connection = True
            return None
        responses = re.findall(r"\[Response (\d+)\]\n(.*?)(?=\n\n\[Response \d+\]|\n\n[^\n]*$)", content, re.S)
        if responses:   # listwise: a rule-based ranking
            order = [int(n) for n, _ in responses]
            if kind != "positional":
                order.sort(key=lambda n: (len(responses[n - 1][1]), responses[n - 1][1]))
            text = "Ranking: " + " > ".join(str(n) for n in order)
            return self._send(200, json.dumps(completion(text, [], 1, 1)).encode())
        if kind == "garbage":
            top = [{"token": "banana", "logprob": math.log(0.9)}] if body.get("logprobs") else []
            return self._send(200, json.dumps(completion("banana", top, 1, 1)).encode())
        payload = json.dumps(server.answer(body)).encode()
        if kind == "truncated":
            payload = payload[:len(payload) // 2]
        self._send(200, payload)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = JudgeServer(args.model, args.port)
    print(f"serving {args.model} at {server.base_url}")
    server.serve_forever()
