"""Reading jsonl files with errors that name the file, the line and the fix."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

from openrlaif.config import ConfigError


def read_jsonl(path: str, key: str, expected: str) -> Iterator[tuple[str, object]]:
    """Yield ("<path>:<line>", row) for every non-blank line. `key` is the config key that named the file and
    `expected` the row shape, both used in the messages."""
    if not path or not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r}: no such file. Fix: point {key} at a jsonl file of {expected} rows, "
                          f"or use {key}=demo.")
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            where = f"{path}:{line_number}"
            try:   # a UTF-8 byte-order mark at the start of the file is allowed (editors on Windows write one)
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{where}: not UTF-8 (byte {err.start + 1} of the line is {raw[err.start]:#04x}). "
                                  "Fix: save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg}). Each line must be one JSON object.") from None


def check_prompt_length(where: str, length: int, max_prompt_tokens: int) -> None:
    if length > max_prompt_tokens:
        raise ConfigError(f"{where}: the templated prompt has {length} tokens, more than "
                          f"data.max_prompt_tokens={max_prompt_tokens}. Fix: raise data.max_prompt_tokens or "
                          "shorten the prompt.")
