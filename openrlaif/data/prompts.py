"""Prompt datasets: jsonl rows of {"prompt": "..."} or {"messages": [{"role", "content"}, ...]}, rendered with
the model's chat template. Every problem is reported with the file and line and the fix."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

from openrlaif.config import ConfigError
from openrlaif.data.jsonl import check_prompt_length
from openrlaif.data.rows import read_rows

DEMO_PROMPTS = os.path.join(os.path.dirname(__file__), "demo_prompts.jsonl")
DEMO_EVAL_PROMPTS = os.path.join(os.path.dirname(__file__), "demo_eval_prompts.jsonl")   # held out: eval.prompts=demo
DEMO_CALCULATOR = os.path.join(os.path.dirname(__file__), "demo_calculator.jsonl")   # data.prompts=calculator


@dataclass
class Prompt:
    text: str              # the last user message, as the judge shows it
    token_ids: list[int]   # the chat-templated prompt, ending with the assistant generation prompt
    messages: list[dict] | None = None   # the whole conversation (system prompt included), for writing datasets
    row: dict | None = None              # the jsonl row itself (an environment reads e.g. its "answer")


def _messages(row, where: str, system_prompt: str) -> list[dict]:
    if not isinstance(row, dict) or not ({"prompt", "messages"} & row.keys()):
        raise ConfigError(f"{where}: each row must be an object with a \"prompt\" string or a \"messages\" list, "
                          f"got {str(row)[:80]!r}.")
    if "messages" in row:
        messages = row["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)):
            raise ConfigError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects.")
        if messages[-1]["role"] != "user":
            raise ConfigError(f"{where}: the last message must come from the user (the policy answers it), "
                              f"got role {messages[-1]['role']!r}.")
    else:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ConfigError(f"{where}: \"prompt\" must be a non-empty string.")
        messages = [{"role": "user", "content": row["prompt"]}]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def load_prompts(path: str, tokenizer, max_prompt_tokens: int, system_prompt: str = "",
                 key: str = "data.prompts", env=None, columns: dict | None = None,
                 overlong: str = "error") -> list[Prompt]:
    """`env`: a callable returning a new environment, whose reset(row) gives the conversation to answer (a tool
    environment adds its system prompt); without one, the row's own conversation. `columns`: data.columns.
    `overlong` (data.overlong), for a templated prompt over max_prompt_tokens: error (stop at start-up, naming the
    row), filter (leave it out; the count is printed), truncate_left (keep its last max_prompt_tokens tokens)."""
    shipped = {"demo": DEMO_EVAL_PROMPTS if key == "eval.prompts" else DEMO_PROMPTS, "calculator": DEMO_CALCULATOR}
    path = shipped.get(path, path)
    prompts, filtered, truncated = [], 0, 0
    for where, row in read_rows(path, key, '{"prompt": ...} or {"messages": [...]}', columns):
        messages = _messages(row, where, system_prompt)
        row = {**row, "messages": messages}
        tools = None
        if env is not None:
            instance = env()
            try:
                messages = instance.reset(row)
            except Exception as err:
                raise ConfigError(f"{where}: the environment's reset(row) raised {type(err).__name__}: {err}. Fix: "
                                  "the row (the fields its environment reads) or the environment (env.name).") from None
            tools = template_tools(instance, tokenizer)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            **({"tools": tools} if tools else {}))
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if len(ids) > max_prompt_tokens and overlong != "error":
            if overlong == "filter":
                filtered += 1
                continue
            ids = ids[-max_prompt_tokens:]   # truncate_left: the end of the prompt, where the question is
            truncated += 1
        check_prompt_length(where, len(ids), max_prompt_tokens)
        prompts.append(Prompt(messages[-1]["content"], ids, messages, row))
    if filtered or truncated:
        print(f"[openrlaif] {key}: {filtered or truncated} of {filtered + len(prompts)} prompts were over "
              f"data.max_prompt_tokens={max_prompt_tokens}: {'left out' if filtered else 'cut on the left'} "
              f"(data.overlong={overlong})", flush=True)
    if not prompts and filtered:
        raise ConfigError(f"{key}={path!r}: every prompt is over data.max_prompt_tokens={max_prompt_tokens}, so "
                          "data.overlong=filter left none. Fix: raise data.max_prompt_tokens.")
    if not prompts:
        raise ConfigError(f"{key}={path!r} holds no prompts. Fix: add {{\"prompt\": ...}} rows, one per line.")
    return prompts


def template_takes_tools(tokenizer) -> bool:
    """The tokenizer's chat template (any of its named ones) reads a `tools` argument."""
    template = tokenizer.chat_template
    return any("tools" in text for text in (template.values() if isinstance(template, dict) else [template or ""]))


def template_tools(env, tokenizer) -> list[dict] | None:
    """The tool schemas an environment hands the chat template (`tool_schemas()`, tool_format=template); a
    ConfigError when the tokenizer's template takes none (it would drop them silently)."""
    schemas = getattr(env, "tool_schemas", lambda: [])()
    if not schemas:
        return None
    if not template_takes_tools(tokenizer):
        raise ConfigError("env.kwargs.tool_format=template passes the tools' schemas to the chat template, but this "
                          "model's template takes no `tools` (SmolLM2's, the tiny test model's). Fix: "
                          "env.kwargs.tool_format=tags (plain tags described in the system prompt), or a model whose "
                          "template renders tools (Qwen2.5, Hermes, Llama 3.1).")
    return schemas


class PromptStream:
    """Endless, seeded pass over the prompts: reshuffled each epoch; `position` is enough to resume."""

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.prompts, self.batch_size, self.seed, self.shuffle = prompts, batch_size, seed, shuffle
        self.position = 0  # prompts handed out so far

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Prompt]:
        batch = []
        while len(batch) < self.batch_size:
            epoch, offset = divmod(self.position, len(self.prompts))
            batch.append(self.prompts[self._order(epoch)[offset]])
            self.position += 1
        return batch
