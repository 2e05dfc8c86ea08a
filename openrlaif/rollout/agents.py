"""Black-box agents (env.agent): a user's `agent_fn(client, row) -> reward | None`, written against an OpenAI
client, runs once per sample; its chat completions are served by the rollout engines through an OpenAI-compatible
endpoint that openrlaif starts on 127.0.0.1 for the rollout, behind a per-run token.

Each agent call has its own session (its API key is `<run token>.<session>`), and the server keeps the session's
exact token ids: the first request's messages are rendered with the chat template once; every later request must
extend the conversation so far (the earlier messages, the completions as the server returned them), and only its
new messages (tool results, user turns) are rendered and appended as ids, as for an environment's observations. The
recorded ids are the training row; the loss mask covers the completions' tokens only. A request that rewrites the
history gets HTTP 400 naming the first message that differs, an agent that raises is masked and counted
(`feedback/failures/env_error`), and the token budget is `env.max_total_tokens` as for environments. Sampling
follows `rollout.*` (the request's temperature is ignored: the trainer's ratios assume the rollout's sampling);
`max_tokens` may only lower `rollout.max_new_tokens`."""
from __future__ import annotations

import json
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

from openrlaif.batch import Batch
from openrlaif.config import Config
from openrlaif.data.prompts import template_takes_tools
from openrlaif.rollout.multi_turn import Episode, TurnTemplate, episodes_to_batch, fail
from openrlaif.rollout.types import SamplingSpec
from openrlaif.serving import JSONHandler


@dataclass
class Session:
    episode: Episode
    index: int
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: list = field(default_factory=list)   # the conversation as the client must send it back (`normal` forms)


def valid_message(m) -> bool:
    """{role, content: str}, or an assistant message whose tool_calls stand in for (or beside) its content."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        return False
    if m["role"] == "assistant" and isinstance(m.get("tool_calls"), list) and m["tool_calls"]:
        return m.get("content") is None or isinstance(m["content"], str)
    return isinstance(m.get("content"), str)


def normal(m: dict) -> tuple:
    """What must match when a client sends a served message back: role, content (None = ""), and each tool call's
    name and arguments as JSON values (whitespace and key order aside)."""
    calls = []
    for call in m.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments")
        try:
            arguments = json.dumps(json.loads(arguments) if isinstance(arguments, str) else arguments, sort_keys=True)
        except (TypeError, ValueError):
            pass
        calls.append((function.get("name"), arguments))
    return m["role"], (m.get("content") or "").strip() if calls else m.get("content"), tuple(calls)


def tool_calls(text: str, prefix: str) -> tuple[str | None, list[dict]] | None:
    """(the content outside the calls or None, OpenAI tool_calls) for a completion holding Hermes/Qwen-style
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; None when it holds none or one is not such
    JSON (the text is then served as content, as the model wrote it)."""
    from openrlaif.envs.tools import TOOL_CALL
    blocks = TOOL_CALL.findall(text)
    if not blocks:
        return None
    calls = []
    for k, block in enumerate(blocks):
        try:
            call = json.loads(block)
            name, arguments = call["name"], call.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(name, str):
            return None
        calls.append({"id": f"{prefix}-{k}", "type": "function", "function": {
            "name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    rest = TOOL_CALL.sub("", text).strip()
    return rest or None, calls


class AgentServer(ThreadingHTTPServer):
    """POST /v1/chat/completions for the sessions of one rollout; `sample(contexts, spec)` is the engines'."""
    daemon_threads = True

    def __init__(self, sample, tokenizer, cfg: Config, seed: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.sample, self.tokenizer, self.cfg, self.seed = sample, tokenizer, cfg, seed
        self.template = TurnTemplate(tokenizer)
        self.token = secrets.token_hex(16)
        self.sessions: dict[str, Session] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def open_session(self, prompt_index: int) -> tuple[str, Session]:
        """(the API key that names it, the session)."""
        sid = secrets.token_hex(8)
        self.sessions[sid] = Session(Episode(prompt_index, None, []), len(self.sessions))
        return f"{self.token}.{sid}", self.sessions[sid]

    def complete(self, session: Session, body: dict) -> tuple[int, dict]:
        episode, cfg = session.episode, self.cfg
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(valid_message(m) for m in messages):
            return 400, error("messages must be a non-empty list of {role, content} objects with string content "
                              "(an assistant message may carry tool_calls instead)")
        tools = body.get("tools")
        if episode.prompt_ids is None:   # the session's first request: its prompt, rendered once
            if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
                return 400, error("tools must be a list of tool schema objects")
            if tools and not template_takes_tools(self.tokenizer):
                return 400, error("tools were given, but this model's chat template takes no tools (they would be "
                                  "dropped): describe the tools in the system message instead")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     **({"tools": tools} if tools else {}))
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            if len(ids) > cfg.data.max_prompt_tokens:
                return 400, error(f"the first request's conversation is {len(ids)} tokens, over "
                                  f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
            episode.prompt_ids = ids
            episode.prompt_messages = [dict(m) for m in messages]
            episode.messages = [dict(m) for m in messages]
            session.seen = [normal(m) for m in messages]
        else:
            known = session.seen
            for i, (old, new) in enumerate(zip(known, messages)):
                if old != normal(new):
                    return 400, error(f"message {i} differs from this session's conversation (role "
                                      f"{new['role']!r}): an openrlaif agent session must extend the conversation "
                                      "it was served, with the completions as returned")
            added = [dict(m) for m in messages[len(known):]]
            if len(messages) <= len(known) or added[-1]["role"] == "assistant":
                return 400, error("the request adds no message for the assistant to answer")
            observation = self.template.observation_ids(added, episode.ids)
            if len(observation) >= cfg.env.max_total_tokens - len(episode.ids):
                episode.truncated = True
                return 400, error(f"this episode's token budget (env.max_total_tokens={cfg.env.max_total_tokens}) "
                                  "is spent")
            episode.messages += added
            session.seen += [normal(m) for m in added]
            episode.ids += observation
            episode.policy += [0.0] * len(observation)
            episode.logprobs += [0.0] * len(observation)
        budget = cfg.env.max_total_tokens - len(episode.ids)
        max_new = min(int(body.get("max_tokens") or body.get("max_completion_tokens") or cfg.rollout.max_new_tokens),
                      cfg.rollout.max_new_tokens, budget)
        spec = SamplingSpec(n=1, max_new_tokens=max(max_new, 1), temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, seed=self.seed + 104_729 * session.index + 7_919 * session.calls)
        session.calls += 1
        completion = self.sample([episode.prompt_ids + episode.ids], spec)[0]
        tokens = completion.token_ids[:max(budget, 0)]
        episode.ids += tokens
        episode.policy += [1.0] * len(tokens)
        episode.logprobs += completion.logprobs[:len(tokens)]
        episode.turns += 1
        episode.finished = completion.finished and len(tokens) == len(completion.token_ids)
        episode.truncated = episode.truncated or len(tokens) < len(completion.token_ids)
        episode.counts["agent_requests"] += 1
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        episode.messages.append({"role": "assistant", "content": text})   # the trajectory: the text as written
        message, finish = {"role": "assistant", "content": text}, "stop" if episode.finished else "length"
        calls = tool_calls(text, f"call-{session.index}-{session.calls}") if tools else None
        if calls is not None:   # the request offered tools and the model called them in its template's format
            message, finish = {"role": "assistant", "content": calls[0], "tool_calls": calls[1]}, "tool_calls"
            episode.counts["tool_calls"] += len(calls[1])
        session.seen.append(normal(message))
        return 200, {"id": f"chatcmpl-{session.index}-{session.calls}", "object": "chat.completion",
                     "model": body.get("model", "policy"),
                     "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                     "usage": {"prompt_tokens": len(episode.prompt_ids) + len(episode.ids) - len(tokens),
                               "completion_tokens": len(tokens)}}


def stream_events(payload: dict) -> list[dict]:
    """A chat.completion as the chunks of `stream: true`: the whole message in one delta (it was generated before
    the first byte is sent), then the finish reason with the usage."""
    choice = payload["choices"][0]
    head = {"id": payload["id"], "object": "chat.completion.chunk", "model": payload["model"]}
    delta = dict(choice["message"])
    if "tool_calls" in delta:   # a streamed tool call carries its position
        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(delta["tool_calls"])]
    return [{**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
             "usage": payload["usage"]}]


def error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error"}}


class _Handler(JSONHandler):
    server: AgentServer

    def do_POST(self) -> None:
        server = self.server
        key = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        token, _, sid = key.partition(".")
        session = server.sessions.get(sid) if secrets.compare_digest(token, server.token) else None
        if session is None:
            return self._send(401, error("unknown session or token"))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._send(404, error(f"{self.path}: only POST /v1/chat/completions is served"))
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        except ValueError:
            return self._send(400, error("the body is not JSON"))
        with session.lock:   # one session's calls are sequential: its ids grow in order
            try:
                code, payload = server.complete(session, body if isinstance(body, dict) else {})
            except Exception as err:   # an engine error: the agent gets an answer it can raise on, not a reset
                code, payload = 500, error(f"{type(err).__name__}: {err}"[:500])
        if code == 200 and isinstance(body, dict) and body.get("stream"):
            return self._send_events(stream_events(payload))
        self._send(code, payload)

    def _send_events(self, events: list[dict]) -> None:
        """Server-sent events, ended by `data: [DONE]` (HTTP/1.0: the connection closes after them)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


def make_client(base_url: str, api_key: str):
    """The client an agent gets: openai.OpenAI when installed (pip install openai, or openrlaif[agents]), else a
    namespace with base_url and api_key for raw HTTP."""
    try:
        import openai
    except ImportError:
        from types import SimpleNamespace
        return SimpleNamespace(base_url=base_url, api_key=api_key)
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600.0)


def run_agents(sample, prompts: list, cfg: Config, tokenizer, seed: int) -> Batch:
    """`rollout.samples_per_prompt` agent calls per prompt against one AgentServer; their sessions as a Batch."""
    from openrlaif.feedback.rules import load_function
    agent = load_function(cfg.env.agent)
    server = AgentServer(sample, tokenizer, cfg, seed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sessions = [server.open_session(index) for index in range(len(prompts))
                    for _ in range(cfg.rollout.samples_per_prompt)]

        def play(item) -> None:
            key, session = item
            try:
                row = prompts[session.episode.prompt_index].row
                reward = agent(make_client(server.base_url, key), dict(row or {}))
                session.episode.reward = None if reward is None else float(reward)
                session.episode.ended_by_env = True
            except Exception as err:   # the agent's own bug: its episode is masked and counted
                fail(session.episode, err, "agent")
            if session.episode.prompt_ids is None and not session.episode.error:
                fail(session.episode, RuntimeError("the agent made no request"), "agent")
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(play, sessions))
    finally:
        server.shutdown()
        server.server_close()
    episodes = [session.episode for _, session in sessions]
    for episode in episodes:
        if episode.prompt_ids is None:   # no request: an empty row on the dataset's prompt, masked
            episode.prompt_ids, episode.prompt_messages = list(prompts[episode.prompt_index].token_ids), []
            episode.ids, episode.policy, episode.logprobs = [tokenizer.pad_token_id], [0.0], [0.0]
    return episodes_to_batch(prompts, episodes, tokenizer)


__all__ = ["AgentServer", "make_client", "run_agents"]
