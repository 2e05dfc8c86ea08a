"""`openrlaif plot <run dir | metrics.jsonl> [--out file.png] [--keys k1,k2,...]`: the metrics of a run as one PNG
of small line charts (reward, KL, loss, judge metrics over steps). Drawn with Pillow, which the install already
has; no plotting library needed. A key `a+b+c` draws those series on one panel (one scale, a legend). A run with
eval.* gets, first, the panel "reward/mean+eval/train_reward+eval/<name>_reward": the training reward and the
measured one side by side, so over-optimisation (train up, gold down) shows at a glance."""
from __future__ import annotations

import json
import math
import os
import sys

DEFAULT_KEYS = ["reward/mean", "train/kl", "train/loss", "train/reward_accuracy", "train/grad_norm",
                "feedback/failure_rate", "feedback/judge_flip_rate", "feedback/judge_kept_fraction",
                "feedback/judge_seconds", "response/length_mean", "label/pairs", "time/step_s"]
PANEL_W, PANEL_H, MARGIN, COLUMNS = 360, 220, 44, 3
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def default_keys(series: dict) -> list[str]:
    """DEFAULT_KEYS, after a train-vs-eval reward panel (and eval/kl) when the run logged eval.*."""
    measured = sorted(k for k in series if k.startswith("eval/") and k.endswith("_reward")
                      and k != "eval/train_reward")
    if not measured:
        return DEFAULT_KEYS
    overlay = "+".join(["reward/mean"] + [k for k in ("eval/train_reward",) if k in series] + measured)
    return [overlay] + ["eval/kl", "eval/response_length"] + DEFAULT_KEYS


def read_series(path: str) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] over the finite values of a metrics.jsonl (cut lines are skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path) as handle:
        for line in handle:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):   # a cut line, or a row that is not one step's metrics
                continue
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def render(series: dict[str, list[tuple[int, float]]], keys: list[str], out_path: str, title: str) -> list[str]:
    """Write the PNG; returns the keys drawn (those with at least one value)."""
    from PIL import Image, ImageDraw
    drawn = [key for key in keys if any(series.get(part) for part in key.split("+"))]
    if not drawn:
        raise ValueError(f"none of {keys} has a finite value in the metrics; pick others with --keys")
    rows = math.ceil(len(drawn) / COLUMNS)
    image = Image.new("RGB", (PANEL_W * min(COLUMNS, len(drawn)), PANEL_H * rows + 24), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black")
    for index, key in enumerate(drawn):
        left, top = (index % COLUMNS) * PANEL_W, 24 + (index // COLUMNS) * PANEL_H
        panel(draw, {part: series[part] for part in key.split("+") if series.get(part)}, key, left, top)
    image.save(out_path)
    return drawn


def panel(draw, lines: dict[str, list[tuple[int, float]]], key: str, left: int, top: int) -> None:
    """One chart; several series share its scale, each in its own colour, named under the chart."""
    x0, y0, x1, y1 = left + MARGIN, top + 20, left + PANEL_W - 12, top + PANEL_H - 28
    every = [point for points in lines.values() for point in points]
    steps, values = [s for s, _ in every], [v for _, v in every]
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    first, last = min(steps), max(steps)
    span = max(last - first, 1)

    def xy(step: int, value: float) -> tuple[float, float]:
        return x0 + (step - first) / span * (x1 - x0), y1 - (value - lo) / (hi - lo) * (y1 - y0)

    draw.text((left + 8, top + 4), key if len(lines) == 1 else "train vs eval" if key.startswith("reward/mean+")
              else "", fill="black")
    draw.rectangle([x0, y0, x1, y1], outline=(180, 180, 180))
    for value in (lo, hi):
        draw.text((left + 2, xy(first, value)[1] - 6), f"{value:.3g}", fill=(90, 90, 90))
    draw.text((x0, y1 + 6), str(first), fill=(90, 90, 90))
    draw.text((x1 - 24, y1 + 6), str(last), fill=(90, 90, 90))
    legend_x = left + (110 if key.startswith("reward/mean+") else 8)
    for index, (name, points) in enumerate(lines.items()):
        colour = COLOURS[index % len(COLOURS)]
        coords = [xy(s, v) for s, v in points]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for x, y in coords:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        if len(lines) > 1:   # "reward/mean" -> "train", "eval/gold_reward" -> "eval gold"
            label = "train" if name == "reward/mean" else name.replace("eval/", "eval ").replace("_reward", "")
            draw.text((legend_x, top + 4), label, fill=colour)
            legend_x += 6 * len(label) + 10


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    source, out, keys = argv[0], None, None
    rest = argv[1:]
    while rest:
        flag, value, rest = rest[0], (rest[1] if len(rest) > 1 else None), rest[2:]
        if flag == "--out" and value:
            out = value
        elif flag == "--keys" and value:
            keys = [k for k in value.split(",") if k]
        else:
            print(f"error: unknown or incomplete option {flag!r}. Usage: openrlaif plot RUN_DIR [--out F.png] "
                  "[--keys a,b]", file=sys.stderr)
            return 2
    path = os.path.join(source, "metrics.jsonl") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        print(f"error: {path} not found. Fix: pass a run's output.dir or its metrics.jsonl.", file=sys.stderr)
        return 2
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.png")
    try:
        series = read_series(path)
        drawn = render(series, keys or default_keys(series), out, title=os.path.abspath(path))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[openrlaif] {len(drawn)} charts ({', '.join(drawn)}): {out}")
    return 0
