"""Weight sync in buckets vs the whole model at once (`rollout.sync_bucket_mb`), through Ray's object store vs a
collective group of its own (`rollout.weight_sync`, gloo here), in float32 and bfloat16 (`rollout.dtype`): the
trainer's rank-0 peak memory during a sync and the sync's time, ZeRO-3 over 2 actor workers, the rollout engine
loading what they send.

Each setting runs in a fresh process (its own Ray cluster): the roles start, rank 0's peak resident memory is reset
(/proc/self/clear_refs) and the first sync is measured (`--warm-up`: the second, after one unmeasured): the growth of rank 0's peak RSS
over its RSS before the sync, the most gathered bytes it held at once (`sync/gathered_mib_peak`), the buckets and
the seconds. Ratios are of settings measured side by side in one run.

    .venv/bin/python benchmarks/weight_sync.py                     # SmolLM2-135M (540 MB in float32), vLLM
    .venv/bin/python benchmarks/weight_sync.py --warm-up --buckets 64 --dtypes float32 bfloat16   # the paths
    .venv/bin/python benchmarks/weight_sync.py --model tiny --engine hf --buckets 0 0.3
    .venv/bin/python benchmarks/weight_sync.py --warm-up --buckets 0 --paths object_store lora_adapter lora_merged

The lora_* paths train a LoRA policy (actor.lora.rank=--lora-rank on every linear layer) and send the adapters alone
(`lora_adapter`: vLLM loads them as a new adapter) or the merged weights (`lora_merged`, through the object store),
beside the full weights of a policy without adapters (`object_store`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, fresh_process, print_table, write_report  # noqa: E402


def measure(model: str, engine: str, bucket_mb: float, warm_up: bool, path: str, dtype: str, lora_rank: int = 0) -> dict:
    import tempfile

    import ray

    from openrlaif.roles import prepare_run, start_roles
    from openrlaif.rollout.weight_sync import sync_weights
    from openrlaif.runtime import init_local_ray
    out = tempfile.mkdtemp(prefix="openrlaif-bench-sync-")
    lora = ([f"actor.lora.rank={lora_rank}", f"actor.lora.sync={path.removeprefix('lora_')}"]
            if path.startswith("lora_") else [])
    cfg = config([f"model={model}", "feedback=function", "algorithm.kl_coef=0", "actor.zero_stage=3",
                  "actor.resources.num_workers=2", f"rollout.engine={engine}", "rollout.kv_cache_gib=0.25",
                  f"rollout.sync_bucket_mb={bucket_mb}", f"rollout.dtype={dtype}", "cluster.threads_per_worker=1",
                  f"rollout.weight_sync={'object_store' if lora else path}", f"output.dir={out}", *lora])
    run = prepare_run(cfg)
    init_local_ray(max(4, int(run.cpus_needed) + 1))
    roles = start_roles(cfg, run)
    try:
        if warm_up:   # the plan, first allocations (whose freed memory the measured sync may then reuse)
            sync_weights(roles, cfg, 0)
        rank0 = roles.actor.workers[0]
        before = ray.get(rank0.reset_peak_memory.remote())
        start = time.perf_counter()
        metrics = sync_weights(roles, cfg, 1)
        seconds = time.perf_counter() - start
        peak = ray.get(rank0.peak_memory_mib.remote())
    finally:
        roles.shutdown()
        ray.shutdown()
    return {"model": model, "engine": engine, "path": path, "dtype": dtype, "bucket_mb": bucket_mb,
            "buckets": metrics["sync/buckets"], "sent_mib": metrics["sync/mib"],
            "gathered_mib_peak": metrics["sync/gathered_mib_peak"], "rank0_rss_growth_mib": peak - before,
            "sync_s": seconds, "engine_load_s": metrics["sync/engine_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--buckets", nargs="+", type=float, default=[0, 64, 16])
    parser.add_argument("--paths", nargs="+", default=["object_store", "collective"])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--warm-up", action="store_true", help="measure the second sync, not the first")
    parser.add_argument("--lora-rank", type=int, default=16, help="the rank of the lora_* paths' adapters")
    parser.add_argument("--report", default="weight_sync", help="the JSON's name in the results folder")
    parser.add_argument("--setting", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(measure(args.model, args.engine, args.worker, args.warm_up, *args.setting,
                                             args.lora_rank)))
        return
    rows = []
    for dtype in args.dtypes:
        for path in args.paths:
            for bucket_mb in args.buckets:
                row = fresh_process([__file__, "--worker", str(bucket_mb), "--setting", path, dtype, "--model",
                                     args.model, "--engine", args.engine, "--lora-rank", str(args.lora_rank)]
                                    + ["--warm-up"] * args.warm_up,
                                    f"{path} {dtype} sync_bucket_mb={bucket_mb}")
                if row is not None:
                    rows.append(row)
    for row in rows:   # ratios within one run: to the whole model by the same path, to the object store
        whole = next((r for r in rows if r["bucket_mb"] == 0 and (r["path"], r["dtype"]) == (row["path"], row["dtype"])),
                     None)
        if whole:
            row["rss_growth_vs_whole"] = row["rank0_rss_growth_mib"] / max(whole["rank0_rss_growth_mib"], 1e-9)
            row["time_vs_whole"] = row["sync_s"] / whole["sync_s"]
        store = next((r for r in rows if r["path"] == "object_store"
                      and (r["bucket_mb"], r["dtype"]) == (row["bucket_mb"], row["dtype"])), None)
        if store:
            row["time_vs_object_store"] = row["sync_s"] / store["sync_s"]
            row["bytes_vs_object_store"] = row["sent_mib"] / max(store["sent_mib"], 1e-9)
    print()
    print_table(rows, [("path", "path", "s"), ("dtype", "dtype", "s"), ("bucket_mb", "bucket MiB", "g"),
                       ("buckets", "buckets", ".0f"), ("sent_mib", "sent MiB", ".1f"),
                       ("gathered_mib_peak", "gathered MiB", ".1f"), ("rank0_rss_growth_mib", "rank-0 RSS +MiB", ".1f"),
                       ("rss_growth_vs_whole", "vs whole", ".2f"), ("sync_s", "sync s", ".2f"),
                       ("time_vs_whole", "time vs whole", ".2f"), ("time_vs_object_store", "vs object store", ".2f"),
                       ("bytes_vs_object_store", "MiB vs object store", ".3f")])
    write_report(args.report, {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows})


if __name__ == "__main__":
    main()
