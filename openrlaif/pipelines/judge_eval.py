"""`openrlaif judge-eval`: run the configured judge (local model or HTTP endpoint) over a labelled pairs file
(`data.pairs`: {"prompt", "chosen", "rejected"}, chosen = the gold preference) with both orders of every pair,
and report agreement with the labels, position consistency and failure rate. Writes <output.dir>/judge_eval.json."""
from __future__ import annotations

import json
import os

from openrlaif.checkpointing import RunError
from openrlaif.config import Config, ConfigError, cache_dir, validate_judge
from openrlaif.data.rows import read_rows
from openrlaif.data.pairs import DEMO_PAIRS, split_conversation
from openrlaif.models import resolve_model_path
from openrlaif.pipelines.common import prepare_output_dir, release
from openrlaif.roles import threads_per_worker
from openrlaif.runtime import ray_session


def load_labelled_pairs(path: str, columns: dict | None = None) -> list[tuple[str, str, str, list[dict] | None]]:
    """(prompt, chosen, rejected, conversation): message-style rows give the judge their whole conversation (the
    prompt text is its last user message)."""
    path = DEMO_PAIRS if path == "demo" else path
    out = []
    for where, row in read_rows(path, "data.pairs", '{"prompt", "chosen", "rejected"}', columns):
        if not isinstance(row, dict) or not {"chosen", "rejected"} <= row.keys():
            raise ConfigError(f"{where}: each row needs \"chosen\" and \"rejected\" (and \"prompt\").")
        if isinstance(row["chosen"], list):
            messages, chosen = split_conversation(row["chosen"], where, "chosen")
            _, rejected = split_conversation(row["rejected"], where, "rejected")
            prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            out.append((prompt, chosen, rejected, messages))
        else:
            out.append((row.get("prompt", ""), row["chosen"], row["rejected"], None))
    if not out:
        raise ConfigError(f"data.pairs={path!r} holds no pairs.")
    return out


def share(value: float, count: int) -> float | None:
    """value / count, or None when nothing was judged: no number that reads as a result."""
    return value / count if count else None


def cell(value, width: int) -> str:
    return f"{'n/a':>{width}s}" if value is None else f"{value:{width}.3f}"


def train(cfg: Config) -> dict:
    from openrlaif.roles import start_judge
    pairs = load_labelled_pairs(cfg.data.pairs, cfg.data.columns)
    judge_cfg = cfg.feedback.judge
    judge_path = None
    if judge_cfg.backend == "local":
        judge_path = resolve_model_path(judge_cfg.model or cfg.model.path, cache_dir(cfg.model),
                                        key="feedback.judge.model")
    if judge_cfg.backend == "http":
        from openrlaif.roles import http_backend
        http_backend(judge_cfg).probe()
    out_dir = prepare_output_dir(cfg)
    cpus = judge_cfg.resources.num_cpus * judge_cfg.resources.num_workers if judge_path else 1
    with ray_session(cfg.cluster, cpus):
        group, judge = start_judge(cfg, judge_path, out_dir, threads_per_worker(cfg, judge_cfg.resources.num_workers))
        try:
            if judge_cfg.mode == "pointwise":   # each answer scored alone; a pair agrees when chosen scores higher
                result = judge.pointwise([p[0] for p in pairs] * 2, [p[1] for p in pairs] + [p[2] for p in pairs],
                                         [p[3] for p in pairs] * 2)
                return pointwise_report(cfg, judge, result, pairs, out_dir)
            comparisons = judge.compare([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs],
                                        [p[3] for p in pairs])
            stats = judge.take_stats()
        finally:
            if group is not None:
                group.shutdown()
    probs = [p for p in comparisons.prob if p is not None]
    failed = sum(comparisons.failures.values())

    report = {
        "pairs": len(pairs),
        "judged": comparisons.judged,
        "agreement": share(sum(p > 0.5 for p in probs), len(probs)),   # gold chosen preferred after debiasing
        "mean_p_chosen": share(sum(probs), len(probs)),
        "position_consistency": share(comparisons.judged - comparisons.flips, comparisons.judged),
        "kept_fraction": sum(comparisons.kept) / len(pairs),
        "failure_rate": failed / len(pairs),
        "failures": dict(comparisons.failures),
        "judge": judge.backend.name,
        "judge_seconds": stats.get("judge_seconds", 0.0),
        "judge_requests": stats.get("judge_requests", 0.0),
    }
    path = os.path.join(out_dir, "judge_eval.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"[openrlaif] judge-eval report: {path}")
    if not comparisons.judged:
        release(out_dir)
        causes = "; ".join(f"{kind}: {detail}" for kind, detail in comparisons.details.items())
        raise RunError(f"judge-eval: nothing was judged: all {len(pairs)} pairs failed ({dict(comparisons.failures)}"
                       f"; {causes}). Fix: what the failures name.")

    print(f"\n{'pairs':>6s} {'agree':>7s} {'P(chosen)':>10s} {'consistent':>11s} {'kept':>6s} {'failed':>7s}")
    print(f"{report['pairs']:6d} {cell(report['agreement'], 7)} {cell(report['mean_p_chosen'], 10)} "
          f"{cell(report['position_consistency'], 11)} {report['kept_fraction']:6.3f} {report['failure_rate']:7.3f}")
    release(out_dir)
    return {"checkpoint": None, "metrics": report, "out_dir": out_dir}


def pointwise_report(cfg: Config, judge, result, pairs: list, out_dir: str) -> dict:
    """judge-eval of a pointwise judge: agreement = the share of pairs (both answers scored) whose chosen answer
    scores above the rejected one; ties are counted apart (neither agreement nor disagreement)."""
    size = len(pairs)
    scores = [float(r) if bool(v) else None for r, v in zip(result.rewards, result.valid)]
    chosen, rejected = scores[:size], scores[size:]
    both = [(c, r) for c, r in zip(chosen, rejected) if c is not None and r is not None]
    judged = [s for s in scores if s is not None]

    mean = share(sum(judged), len(judged))
    report = {
        "pairs": size, "mode": "pointwise", "judged": len(both),
        "agreement": share(sum(c > r for c, r in both), len(both)),
        "ties": share(sum(c == r for c, r in both), len(both)),
        "disagreement": share(sum(c < r for c, r in both), len(both)),
        "mean_score_chosen": share(sum(c for c, _ in both), len(both)),
        "mean_score_rejected": share(sum(r for _, r in both), len(both)),
        "score_std": (sum((s - mean) ** 2 for s in judged) / len(judged)) ** 0.5 if judged else None,
        "failure_rate": sum(s is None for s in scores) / len(scores),
        "failures": dict(result.failures),
        "judge": judge.backend.name,
        "judge_seconds": result.metrics.get("judge_seconds", 0.0),
        "judge_requests": result.metrics.get("judge_requests", 0.0),
    }
    path = os.path.join(out_dir, "judge_eval.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"[openrlaif] judge-eval report: {path}")
    release(out_dir)
    if not both:
        causes = "; ".join(f"{kind}: {detail}" for kind, detail in result.details.items())
        raise RunError(f"judge-eval: no pair had both answers scored ({dict(result.failures)}; {causes}). "
                       "Fix: what the failures name.")

    print(f"\n{'pairs':>6s} {'agree':>7s} {'ties':>6s} {'chosen':>7s} {'rejected':>9s} {'spread':>7s} {'failed':>7s}")
    print(f"{size:6d} {cell(report['agreement'], 7)} {cell(report['ties'], 6)} "
          f"{cell(report['mean_score_chosen'], 7)} {cell(report['mean_score_rejected'], 9)} "
          f"{cell(report['score_std'], 7)} {report['failure_rate']:7.3f}")
    return {"checkpoint": None, "metrics": report, "out_dir": out_dir}


# ----------------------------------------------------------------------------------------------------------- checks

def validate(cfg: Config) -> None:
    """pipeline=judge_eval's own checks: the judge it evaluates."""
    validate_judge(cfg.feedback.judge, cfg.pipeline, cfg.rollout.engine)
