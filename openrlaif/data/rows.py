"""Dataset rows as users bring them: jsonl, parquet (verl's), or a local Hugging Face dataset folder (what
`datasets`' save_to_disk writes, TRL's), read with pyarrow only (nothing from a hub). Every row comes with where it
came from (`file:line` for jsonl, `file:row N` otherwise), and `data.columns` renames the file's columns to the
names a loader reads ({"prompt": "question"}: the loader's "prompt" is the file's "question")."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

from openrlaif.config import ConfigError
from openrlaif.data.jsonl import read_jsonl


def read_rows(path: str, key: str, expected: str, columns: dict | None = None) -> Iterator[tuple[str, object]]:
    """Yield (where, row) for every row of `path`: a .jsonl file (any name but .parquet), a .parquet file, a
    folder of .parquet files, or an HF dataset folder (a Dataset, or a DatasetDict whose "train" split is read).
    `key` names the config key that gave the path (for the messages), `expected` the row shape."""
    rows = _rows(path, key, expected)
    if not columns:
        yield from rows
        return
    mapping = dict(columns)
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            yield where, row
            continue
        missing = [source for source in mapping.values() if source not in row]
        if missing:
            raise ConfigError(f"{where}: data.columns maps {', '.join(f'{k}={v}' for k, v in mapping.items())}, but "
                              f"this row has no column {', '.join(map(repr, missing))} (it has {sorted(row)}). Fix: "
                              "+data.columns.<name>=<one of its columns>.")
        yield where, {**{k: v for k, v in row.items() if k not in mapping.values()},
                      **{name: row[source] for name, source in mapping.items()}}


def _rows(path: str, key: str, expected: str) -> Iterator[tuple[str, object]]:
    if path and os.path.isdir(path):
        yield from _folder(path, key, expected)
    elif path and path.endswith(".parquet") and os.path.isfile(path):
        yield from _table_rows(path, _read_parquet(path, key))
    else:
        yield from read_jsonl(path, key, expected)


def _folder(path: str, key: str, expected: str) -> Iterator[tuple[str, object]]:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):   # a DatasetDict: one folder per split
        with open(os.path.join(path, "dataset_dict.json")) as handle:
            splits = json.load(handle).get("splits", [])
        if "train" not in splits:
            raise ConfigError(f"{key}={path!r} is a dataset with the splits {splits} and no 'train'. Fix: "
                              f"{key}={os.path.join(path, splits[0]) if splits else path + '/<split>'}.")
        path = os.path.join(path, "train")
    state_path = os.path.join(path, "state.json")
    if os.path.isfile(state_path):   # datasets' save_to_disk: Arrow IPC stream files listed in state.json
        with open(state_path) as handle:
            files = [entry["filename"] for entry in json.load(handle).get("_data_files", [])]
        for name in files:
            yield from _table_rows(os.path.join(path, name), _read_arrow(os.path.join(path, name), key))
        return
    parquet = sorted(glob.glob(os.path.join(path, "*.parquet")))
    if not parquet:
        raise ConfigError(f"{key}={path!r} is a folder without a dataset in it (no state.json of datasets' "
                          f"save_to_disk, no .parquet files). Fix: point {key} at a .jsonl or .parquet file of "
                          f"{expected} rows, or at a dataset folder.")
    for file in parquet:
        yield from _table_rows(file, _read_parquet(file, key))


def _read_parquet(path: str, key: str):
    pq = _pyarrow(key).parquet
    try:
        return pq.read_table(path)
    except Exception as err:   # noqa: BLE001 - a damaged or non-parquet file: say which and why
        raise ConfigError(f"{key}: {path} is not a readable parquet file ({type(err).__name__}: {err}).") from None


def _read_arrow(path: str, key: str):
    pa = _pyarrow(key)
    try:
        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).read_all()
    except Exception as err:   # noqa: BLE001
        raise ConfigError(f"{key}: {path} is not a readable Arrow file of a saved dataset "
                          f"({type(err).__name__}: {err}).") from None


def _table_rows(path: str, table) -> Iterator[tuple[str, dict]]:
    index = 0
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            index += 1
            yield f"{path}:row {index}", row


def _pyarrow(key: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key}: reading parquet or a saved dataset needs pyarrow. Fix: pip install pyarrow, or "
                          "convert the data to jsonl.") from None
    return pyarrow
