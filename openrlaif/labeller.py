"""A simulated AI labeller with known accuracy and biases, served as an OpenAI-compatible chat-completions
endpoint with log-probs (`openrlaif serve-labeller`). The framework's HTTP judge talks to it unchanged (prompt
rendering, probs and generate readouts, swap debiasing, consistency filters, caching, rate limits), so studies of
AI feedback run without people and without a strong judge model (Gao et al. 2022: a gold reward seen through a
proxy; AlpacaFarm's simulated annotators).

The labeller reads the judge's own prompt (feedback/judge_prompts.py): the user message and one response
(pointwise), Response A and B (pairwise) or Responses 1..K (listwise). It scores each response with a **gold**
function (`openrlaif.feedback.gold:concise` by default: any `module:callable(prompts, responses, **kwargs)`) and
answers through a noise model:

* pairwise: logit P(A) = logit(accuracy)·sign(gold_A − gold_B) + position_bias + length_bias·(words_A − words_B)/10
  + N(0, inconsistency²). With no biases the labeller picks the gold-better response with probability `accuracy`
  (1/2 on a gold tie); `position_bias` is extra logit for whatever is shown first (RLAIF, Lee et al.: LLM judges
  prefer position A); `length_bias` per 10 words longer.
* pointwise: the perceived quality q = gold + score_noise·ε_item + 0.01·length_bias·words + N(0, inconsistency²),
  ε_item a fixed standard normal per (prompt, response) (the labeller's own, consistent mistake); the label
  distribution over the scale is a unit-width Gaussian around score_min + q·(score_max − score_min).
* listwise: a Plackett–Luce ranking with utilities 4·logit(accuracy)·gold + position_bias·[shown first] +
  length_bias·words/10 and Gumbel noise, fixed per response (a consistent labeller) or, with inconsistency w > 0,
  a share min(w, 1) of it redrawn for every request (Repeat Ranking's inconsistent rankings).

`inconsistency` = 0: the same request always gets the same answer. Otherwise a repeat of the same request (same
messages and seed) is a fresh draw, and the whole sequence is reproducible from `seed`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from http.server import ThreadingHTTPServer

from openrlaif.serving import JSONHandler

DEFAULT_GOLD = "openrlaif.feedback.gold:concise"


@dataclass
class NoiseModel:
    accuracy: float = 0.8        # P(choose the gold-better response), no biases; 0.5 = coin flip, 1 = gold itself
    position_bias: float = 0.0   # extra logit for the response shown first (pairwise, listwise)
    length_bias: float = 0.0     # extra logit per 10 words longer (> 0 prefers longer)
    inconsistency: float = 0.0   # std of fresh logit noise per request (repeats disagree); 0 = deterministic
    score_noise: float = 0.1     # pointwise: std of the fixed per-response error, on the gold's [0, 1] scale
    seed: int = 0

    def check(self) -> None:
        if not 0.5 <= self.accuracy <= 1.0:
            raise ValueError(f"accuracy={self.accuracy}: must be in [0.5, 1] (0.5 = coin flip, 1 = the gold)")
        for name in ("position_bias", "length_bias", "inconsistency", "score_noise"):
            value = getattr(self, name)
            if not math.isfinite(value) or (name in ("inconsistency", "score_noise") and value < 0):
                raise ValueError(f"{name}={value}: must be a finite number" +
                                 (" >= 0" if name in ("inconsistency", "score_noise") else ""))

    @property
    def strength(self) -> float:
        """logit(accuracy), capped so that accuracy 1 stays finite (P ≈ 1 − 1e-9)."""
        p = min(self.accuracy, 1 - 1e-9)
        return math.log(p / (1 - p))


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def words(text: str) -> int:
    return len(text.split())


def pairwise_prob(gold_a: float, gold_b: float, words_a: int, words_b: int, noise: NoiseModel,
                  jitter: float = 0.0) -> float:
    """P(the labeller answers A)."""
    sign = (gold_a > gold_b) - (gold_a < gold_b)
    z = noise.strength * sign + noise.position_bias + noise.length_bias * (words_a - words_b) / 10 + jitter
    return sigmoid(z)


def pointwise_distribution(quality: float, score_min: int, score_max: int) -> dict[int, float]:
    """P(label) over the integer scale: a unit-width Gaussian around the perceived quality mapped to the scale."""
    centre = score_min + min(max(quality, 0.0), 1.0) * (score_max - score_min)
    weights = {s: math.exp(-0.5 * (s - centre) ** 2) for s in range(score_min, score_max + 1)}
    total = sum(weights.values())
    return {s: w / total for s, w in weights.items()}


def plackett_luce(utilities: list[float], rng: random.Random, fixed: list[float], share: float) -> list[int]:
    """A ranking (0-based, best first) by utilities plus Gumbel noise: `fixed` per item, a `share` redrawn."""
    noisy = [u + (1 - share) * g + share * -math.log(-math.log(rng.random() or 1e-12))
             for u, g in zip(utilities, fixed)]
    return sorted(range(len(utilities)), key=lambda i: -noisy[i])


def _stable(*parts) -> int:
    return int(hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16], 16)


def _gumbel(seed: int, *item) -> float:
    u = random.Random(_stable(seed, "gumbel", *item)).random() or 1e-12
    return -math.log(-math.log(u))


# ------------------------------------------------------------------------------------------- reading a request

@dataclass
class Task:
    kind: str                       # pointwise | pairwise | listwise | rationale | other
    prompt: str = ""
    responses: tuple[str, ...] = ()
    scale: tuple[int, int] = (1, 9)
    labels: tuple[str, str] = ("A", "B")


_SCALE = re.compile(r"from (-?\d+) to (-?\d+)")
_LABELS = re.compile(r"Answer with (.+?) for Response A or (.+?) for Response B")


def read_task(messages: list[dict]) -> Task:
    """What the judge asks, from the framework's judge prompts. The responses are in the first user message that
    holds "[Response"; the question asked (which scale, which labels, or a rationale first) is the last message."""
    first = next((m.get("content", "") for m in messages
                  if m.get("role") == "user" and "[Response" in str(m.get("content", ""))), None)
    last = str(messages[-1].get("content", "")) if messages else ""
    if first is None:
        return Task("other")
    body, _, ending = first.rpartition("\n\n")
    question = last if len(messages) > 1 else ending
    if "yet." in question and len(messages) == 1:    # chain of thought, step 1: a rationale without a verdict
        return Task("rationale")
    head, _, _ = body.partition("\n\n[Response")
    prompt = head.partition("[User message]\n")[2] or head.rpartition("User: ")[2].split("\n\n")[0]
    scale_match = _SCALE.search(question) or _SCALE.search(first)
    scale = (int(scale_match.group(1)), int(scale_match.group(2))) if scale_match else (1, 9)
    if "\n\n[Response A]\n" in body:
        rest = body.partition("\n\n[Response A]\n")[2]
        a, _, b = rest.partition("\n\n[Response B]\n")
        labels = _LABELS.search(question)
        return Task("pairwise", prompt, (a, b), scale, (labels.group(1), labels.group(2)) if labels else ("A", "B"))
    if "\n\n[Response 1]\n" in body:
        parts = re.split(r"\n\n\[Response \d+\]\n", body)[1:]
        return Task("listwise", prompt, tuple(parts), scale)
    if "\n\n[Response]\n" in body:
        return Task("pointwise", prompt, (body.partition("\n\n[Response]\n")[2],), scale)
    return Task("other")


# ------------------------------------------------------------------------------------------- answering

class Labeller:
    """gold + noise -> a chat-completion reply. Thread-safe."""

    def __init__(self, gold: str = DEFAULT_GOLD, gold_kwargs: dict | None = None,
                 noise: NoiseModel | None = None) -> None:
        from openrlaif.feedback.rules import load_function
        self.gold_spec, self.gold_kwargs = gold, dict(gold_kwargs or {})
        self.gold = load_function(gold, self.gold_kwargs)
        self.noise = noise or NoiseModel()
        self.noise.check()
        self.lock = threading.Lock()
        self.seen: Counter = Counter()
        self.requests: Counter = Counter()   # by task kind

    def golds(self, prompt: str, responses: tuple[str, ...]) -> list[float]:
        return [float(g) for g in self.gold([prompt] * len(responses), list(responses), **self.gold_kwargs)]

    def answer(self, body: dict) -> dict:
        messages = body.get("messages") or []
        task = read_task(messages)
        key = json.dumps([messages, body.get("seed")], sort_keys=True)
        with self.lock:
            self.requests[task.kind] += 1
            self.seen[key] += 1
            repeat = self.seen[key] if self.noise.inconsistency > 0 else 1
        rng = random.Random(_stable(self.noise.seed, key, repeat))
        jitter = rng.gauss(0.0, self.noise.inconsistency) if self.noise.inconsistency > 0 else 0.0
        want_logprobs = bool(body.get("logprobs"))
        top_k = int(body.get("top_logprobs") or 0)
        probs: dict[str, float] = {}
        if task.kind == "pairwise":
            gold_a, gold_b = self.golds(task.prompt, task.responses)
            p = pairwise_prob(gold_a, gold_b, words(task.responses[0]), words(task.responses[1]), self.noise, jitter)
            probs = {task.labels[0]: p, task.labels[1]: 1 - p}
        elif task.kind == "pointwise":
            (gold,) = self.golds(task.prompt, task.responses)
            error = random.Random(_stable(self.noise.seed, "item", task.prompt, task.responses[0])).gauss(0.0, 1.0)
            quality = gold + self.noise.score_noise * error + 0.01 * self.noise.length_bias * words(
                task.responses[0]) + jitter
            probs = {str(s): p for s, p in pointwise_distribution(quality, *task.scale).items()}
        if task.kind == "listwise":
            golds = self.golds(task.prompt, task.responses)
            utilities = [4 * self.noise.strength * g + self.noise.position_bias * (i == 0)
                         + self.noise.length_bias * words(r) / 10 for i, (g, r) in enumerate(zip(golds, task.responses))]
            fixed = [_gumbel(self.noise.seed, task.prompt, r) for r in task.responses]
            order = plackett_luce(utilities, rng, fixed, min(self.noise.inconsistency, 1.0))
            text = "Ranking: " + " > ".join(str(i + 1) for i in order)
        elif task.kind == "rationale":
            text = "The responses differ in how concise and complete they are."
        elif task.kind == "other":
            text = "OK"
        elif want_logprobs:
            text = max(probs, key=probs.get)
        else:   # generate readout: a draw from the labeller's distribution, as a marked verdict
            label = rng.choices(list(probs), weights=list(probs.values()))[0]
            text = f"Verdict: {label}" if task.kind == "pairwise" else f"Score: {label}"
        top = sorted(({"token": t, "logprob": math.log(max(p, 1e-300))} for t, p in probs.items()),
                     key=lambda e: -e["logprob"])[:top_k] if want_logprobs and probs else []
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
        return completion(text, top, prompt_tokens, max(1, len(text) // 4), body.get("model", "labeller"))


def completion(text: str, top: list[dict], prompt_tokens: int, completion_tokens: int, model: str) -> dict:
    logprobs = None
    if top:
        logprobs = {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]}
    return {"id": "cmpl-labeller", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


# ------------------------------------------------------------------------------------------- serving

class LabellerServer(ThreadingHTTPServer):
    """POST <base>/chat/completions, GET <base>/models. `start()` serves in a daemon thread (tests, studies)."""
    daemon_threads = True

    def __init__(self, labeller: Labeller, host: str = "127.0.0.1", port: int = 0, model: str = "labeller") -> None:
        super().__init__((host, port), _Handler)
        self.labeller, self.model = labeller, model

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "LabellerServer":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(JSONHandler):
    server: LabellerServer

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            return self._send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}; POST /v1/chat/completions"}})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("the body needs a \"messages\" list")
        except ValueError as err:
            return self._send(400, {"error": {"message": f"bad request: {err}"}})
        try:
            self._send(200, self.server.labeller.answer(body))
        except Exception as err:   # a gold function that raised: the client sees a 500 and counts it
            self._send(500, {"error": {"message": f"{type(err).__name__}: {err}"}})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openrlaif serve-labeller", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="labeller", help="the model name it serves (feedback.judge.model)")
    parser.add_argument("--gold", default=DEFAULT_GOLD, help="module:callable(prompts, responses, **kwargs)")
    parser.add_argument("--gold-kwargs", default="{}", help='JSON, e.g. \'{"max_words": 15}\'')
    for name, default in asdict(NoiseModel()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    args = parser.parse_args(argv)
    noise = NoiseModel(**{name: getattr(args, name) for name in asdict(NoiseModel())})
    try:
        labeller = Labeller(args.gold, json.loads(args.gold_kwargs), noise)
    except (ValueError, Exception) as err:   # ConfigError (bad gold) is a ValueError; JSON errors too
        print(f"error: {err}", file=sys.stderr)
        return 2
    server = LabellerServer(labeller, args.host, args.port, args.model)
    print(f"[openrlaif] labeller {args.gold} {noise} at {server.base_url} (model {args.model!r})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
