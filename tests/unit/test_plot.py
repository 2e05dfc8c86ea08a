"""`openrlaif plot`: metrics.jsonl -> PNG of line charts."""
import json

from PIL import Image

from openrlaif.plot import COLUMNS, PANEL_H, PANEL_W, main, read_series


def write_metrics(path, rows, tail=""):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)


def test_read_series_keeps_finite_values_and_skips_cut_lines(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, [{"step": 1, "reward/mean": 0.5, "train/kl": None},
                            {"step": 2, "reward/mean": 0.75, "train/kl": 0.01}], tail='{"step": 3, "rew')
    series = read_series(str(metrics))
    assert series["reward/mean"] == [(1, 0.5), (2, 0.75)] and series["train/kl"] == [(2, 0.01)]


def test_plot_draws_one_panel_per_metric_with_data(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", [{"step": s, "reward/mean": s / 10, "train/loss": 1 / s,
                                                "feedback/judge_flip_rate": 0.5} for s in range(1, 6)])
    assert main([str(tmp_path), "--keys", "reward/mean,train/loss,feedback/judge_flip_rate,train/kl"]) == 0
    image = Image.open(tmp_path / "metrics.png").convert("RGB")
    assert image.size == (PANEL_W * COLUMNS, PANEL_H + 24)   # 3 panels with data: one row (train/kl has none)
    blue = sum(1 for pixel in image.getdata() if pixel == (31, 119, 180))
    assert blue > 100                                         # the lines and points were drawn


def test_plot_errors_name_the_fix(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2 and "not found" in capsys.readouterr().err
    write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "reward/mean": 0.5}])
    assert main([str(tmp_path), "--keys", "train/kl"]) == 2 and "--keys" in capsys.readouterr().err
    assert main([str(tmp_path), "--bogus", "1"]) == 2


def test_rows_without_a_step_are_skipped(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", [{"reward/mean": 9.0}, {"step": 1, "reward/mean": 0.5}, ["x"]])
    assert read_series(str(tmp_path / "metrics.jsonl"))["reward/mean"] == [(1, 0.5)]
