"""Tool use: the policy calls a tool, the tool's result comes back as a `tool` message, until it answers without a
call (or the turn/token budget ends the episode).

Two call formats are read, whichever the policy writes:
* the chat-template format of Hermes / Qwen-style templates: `<tool_call>{"name": "python", "arguments":
  {"code": "print(6*7)"}}</tool_call>`;
* a plain tag format for templates without tool calls (SmolLM2's, the tiny test model's): `<python>print(6*7)
  </python>` or `<calculator>6*7</calculator>`.

Tools: `calculator` (arithmetic, evaluated from the parsed expression tree in the driver: + - * / // % ** and
parentheses on numbers, nothing else) and `python` (the code runs in `sandbox.run_python`: no network, CPU, memory
and file-size limits, a temporary working directory, killed on timeout). A malformed call, an unknown tool, a
tool's error or timeout becomes the observation the policy reads next and is counted as `env/tool_errors/<kind>`;
the run goes on.

`tool_format=template` (env.kwargs) hands the tools' JSON schemas to a chat template that takes `tools=` (Qwen2.5,
Hermes, Llama 3.1 and others render them in their own words); the system prompt then only says to answer without
a call when done, and the policy calls tools in its template's format. `tags` (the default) describes the plain tags
in the system prompt instead, for any template.

With an `answer` in the row the episode's reward is exact-answer: 1 if the last number of the final (tool-free)
turn equals the answer, else 0; without one the reward is None and the run's `feedback` scores the trajectory."""
from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections import Counter

from openrlaif.envs.base import EnvStep
from openrlaif.envs.sandbox import run_python

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
PLAIN_CALL = re.compile(r"<(python|calculator)>(.*?)</\1>", re.S)
UNCLOSED = re.compile(r"<(tool_call|python|calculator)>")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

SYSTEM = ("You can use tools. To compute, write <calculator>expression</calculator> (arithmetic only) or "
          "<python>code that prints the result</python>; the result comes back in the next message. When you "
          "know the answer, reply with it and no tool call.")

TEMPLATE_SYSTEM = "You can call tools to compute. When you know the answer, reply with it and no tool call."

# The tools as the OpenAI / transformers function schemas a chat template's `tools=` takes (tool_format=template).
SCHEMAS = {
    "calculator": {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {
            "type": "string", "description": "the expression, e.g. 53*31"}}, "required": ["expression"]}}},
    "python": {"type": "function", "function": {
        "name": "python", "description": "Run Python code in a sandbox (no network) and return what it prints.",
        "parameters": {"type": "object", "properties": {"code": {
            "type": "string", "description": "the program; print the result"}}, "required": ["code"]}}},
}

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> float:
    """The value of an arithmetic expression; ValueError for anything else (names, calls, huge powers)."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        return value(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except (SyntaxError, TypeError, OverflowError) as err:
        raise ValueError(str(err) or type(err).__name__) from None


def parse_call(turn: str) -> tuple[str, str] | tuple[None, str] | None:
    """(tool, argument) for the turn's first tool call; (None, why) for a malformed one; None for no call."""
    match = TOOL_CALL.search(turn)
    if match:
        try:
            call = json.loads(match.group(1))
            name, arguments = call["name"], call.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            argument = arguments.get("code", arguments.get("expression")) if isinstance(arguments, dict) else None
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return None, f"the tool call is not JSON of the form {{\"name\": ..., \"arguments\": {{...}}}} ({err})"
        if not isinstance(argument, str):
            return None, "the tool call's arguments need \"code\" (python) or \"expression\" (calculator)"
        return str(name), argument
    match = PLAIN_CALL.search(turn)
    if match:
        return match.group(1), match.group(2)
    if UNCLOSED.search(turn):
        return None, "a tool tag was opened but never closed"
    return None


class ToolUse:
    """kwargs (env.kwargs): timeout_s, cpu_s, memory_mb for the python tool; tools (the names allowed);
    tool_format (tags | template: the schemas go to the chat template's `tools=`); system_prompt ("" = the
    format's own); isolate_fs (the python tool sees a read-only file system without the users' folders)."""

    def __init__(self, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512,
                 tools: tuple[str, ...] | list[str] = ("calculator", "python"), system_prompt: str = "",
                 tool_format: str = "tags", isolate_fs: bool = True) -> None:
        from openrlaif.config import ConfigError
        if tool_format not in ("tags", "template"):
            raise ConfigError(f"env.kwargs.tool_format={tool_format!r} must be tags (plain tags, described in the "
                              "system prompt) or template (the tools' schemas passed to the chat template).")
        unknown = sorted(set(tools) - set(SCHEMAS))
        if unknown:
            raise ConfigError(f"env.kwargs.tools: {unknown} are not tools here; the tools are {sorted(SCHEMAS)}.")
        self.timeout_s, self.cpu_s, self.memory_mb = timeout_s, cpu_s, memory_mb
        self.tools, self.tool_format, self.isolate_fs = tuple(tools), tool_format, isolate_fs
        self.system_prompt = system_prompt or (SYSTEM if tool_format == "tags" else TEMPLATE_SYSTEM)
        self.answer: str | None = None

    def tool_schemas(self) -> list[dict]:
        """What the prompt's chat template is given as `tools=` (tool_format=template), else []."""
        return [SCHEMAS[name] for name in self.tools] if self.tool_format == "template" else []

    def reset(self, row: dict) -> list[dict]:
        self.answer = None if row.get("answer") is None else str(row["answer"])
        messages = list(row["messages"])
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def step(self, messages: list[dict], assistant_turn: str) -> EnvStep:
        call = parse_call(assistant_turn)
        if call is None:   # no tool call: the final answer
            return EnvStep(None, self.reward(assistant_turn), {"final": True})
        tool, argument = call
        counts = Counter({"tool_calls": 1})
        if tool is None:
            result, error = f"Error: {argument}.", "malformed"
        elif tool not in self.tools:
            result, error = f"Error: unknown tool {tool!r}; the tools are {', '.join(self.tools)}.", "unknown_tool"
        elif tool == "calculator":
            try:
                value = calculate(argument)
                result, error = (f"{value:.10g}" if isinstance(value, float) else str(value)), None
            except ValueError as err:
                result, error = f"Error: {err}.", "error"
        else:
            run = run_python(argument, self.timeout_s, self.cpu_s, self.memory_mb, isolate_fs=self.isolate_fs)
            result, error = (run.output.strip() or "(no output)") if run.error is None else f"Error: {run.output}", run.error
            if run.isolation and "netns" not in run.isolation:
                counts["sandbox_without_netns"] += 1
            if run.isolation and self.isolate_fs and "fs" not in run.isolation:
                counts["sandbox_without_fs"] += 1
        if error:
            counts[f"tool_errors/{error}"] += 1
        return EnvStep([{"role": "tool", "content": result}], None, {"tool": tool}, counts)

    def reward(self, final_turn: str) -> float | None:
        if self.answer is None:
            return None
        numbers = NUMBER.findall(final_turn.replace(",", ""))
        if not numbers:
            return 0.0
        try:
            return float(math.isclose(float(numbers[-1]), float(self.answer), rel_tol=1e-9, abs_tol=1e-9))
        except ValueError:   # a non-numeric answer: compare the text
            return float(final_turn.strip().lower().endswith(self.answer.strip().lower()))
