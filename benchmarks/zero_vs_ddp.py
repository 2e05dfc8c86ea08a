"""One actor update (PPO-clip policy loss, AdamW, grad clip 1.0) at world size 2 under DeepSpeed ZeRO 0/1/2/3
through our Ray actor workers, vs plain torch DDP (gloo) on the same model, batch and loss. Reports samples/s,
tokens/s, achieved FLOP/s and MFU against this machine's fp32 matmul peak, which the script measures itself.

FLOPs per step = 6 · N · tokens + 6 · vocab · hidden · response tokens + 12 · layers · hidden · Σ seq²
(attention scores and values, forward and backward), with N the weights of every matmul in the layers. The LM
head runs on response positions only (`logits_to_keep`); the embedding lookup is not a matmul.

    .venv/bin/python benchmarks/zero_vs_ddp.py                  # SmolLM2-135M, 8 samples x 64 tokens
    .venv/bin/python benchmarks/zero_vs_ddp.py --model tiny --steps 6
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_report  # noqa: E402

WORLD = 2


def matmul_peak(seconds: float = 3.0, n: int = 1024, dtype=torch.float32) -> float:
    """FLOP/s of square matmuls in `dtype` on all cores (the best of repeated runs). bf16 through F.linear, the
    kernel nn.Linear runs (torch.mm in bf16 takes a far slower path on CPUs without AVX512-BF16)."""
    torch.set_num_threads(os.cpu_count())
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    product = torch.mm if dtype == torch.float32 else torch.nn.functional.linear
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(4):
            product(a, b)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - start))
    return best


def batch_for(vocab: int, size: int, prompt_len: int, response_len: int, seed: int = 0):
    from openrlaif.batch import Batch
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, vocab, (size, prompt_len + response_len), generator=g)
    return Batch({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                  "response_mask": torch.ones(size, response_len), "sample_mask": torch.ones(size),
                  "advantages": torch.randn(size, generator=g)})


def step_flops(model_path: str, batch) -> float:
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_path)
    head = c.head_dim if getattr(c, "head_dim", None) else c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head
    per_layer = c.hidden_size * (c.num_attention_heads * head) * 2 + c.hidden_size * kv * 2 \
        + 3 * c.hidden_size * c.intermediate_size
    n = c.num_hidden_layers * per_layer
    seq = batch["attention_mask"].sum(-1).float()
    tokens = float(seq.sum())
    lm_head = 6 * c.vocab_size * c.hidden_size * float(batch["response_mask"].sum())
    return 6 * n * tokens + lm_head + 12 * c.num_hidden_layers * c.num_attention_heads * head * float((seq ** 2).sum())


def run_zero(model_path: str, stage: int, batch, steps: int) -> list[float]:
    import ray

    from openrlaif.config import ActorConfig, AlgorithmConfig, Config, ModelConfig, RoleResources
    from openrlaif.roles import start_actor

    cfg = Config(model=ModelConfig(path=model_path),
                 actor=ActorConfig(zero_stage=stage, lr=1e-6, micro_batch_size=len(batch) // WORLD,
                                   resources=RoleResources(num_workers=WORLD, num_cpus=1)),
                 algorithm=AlgorithmConfig(kl_coef=0.0))
    cfg.cluster.threads_per_worker = max(1, os.cpu_count() // WORLD)
    group = start_actor(cfg, model_path, len(batch))
    try:
        ray.get(group.call(lambda w: w.ready.remote()))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            ray.get(group.map(lambda w, shard: w.train_step.remote(shard), batch.split(WORLD)))
            times.append(time.perf_counter() - start)
        return times
    finally:
        group.shutdown()


def ddp_worker(rank: int, model_path: str, batch, steps: int, port: int, threads: int, out) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from openrlaif.algorithms import POLICY_LOSSES
    from openrlaif.workers.common import load_causal_lm, response_logprobs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    model = DistributedDataParallel(load_causal_lm(model_path, "float32"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    shard = batch.split(WORLD)[rank]
    mask = shard["response_mask"]
    tokens = torch.tensor(float(mask.sum()))
    dist.all_reduce(tokens)
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        logprobs = response_logprobs(model, shard)
        out_loss = POLICY_LOSSES["ppo_clip"](logprobs, logprobs.detach(), shard["advantages"], mask, clip_eps=0.2,
                                             clip_eps_high=None, dual_clip=None, ref_logprobs=None, kl_coef=0.0,
                                             kl_estimator="k3", entropy=None, entropy_coef=0.0,
                                             loss_agg="token_mean", num_tokens=float(tokens))
        optimizer.zero_grad(set_to_none=True)
        (out_loss.loss * WORLD).backward()       # DDP averages over ranks; the loss is already the global mean
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def run_ddp(model_path: str, batch, steps: int) -> list[float]:
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = max(1, os.cpu_count() // WORLD)
    procs = [ctx.Process(target=ddp_worker, args=(r, model_path, batch, steps, port, threads, queue))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    times = queue.get(timeout=1800)
    for p in procs:
        p.join()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="samples per step, all ranks together")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3], help="the ZeRO stages beside DDP")
    args = parser.parse_args()
    import ray

    from openrlaif.config import ModelConfig, cache_dir
    from openrlaif.models import resolve_model_path
    from openrlaif.runtime import init_local_ray
    from transformers import AutoConfig

    model_path = resolve_model_path(args.model, cache_dir(ModelConfig()))
    batch = batch_for(AutoConfig.from_pretrained(model_path).vocab_size, args.batch, args.prompt_len, args.response_len)
    flops = step_flops(model_path, batch)
    peak = matmul_peak()
    peak_bf16 = matmul_peak(dtype=torch.bfloat16)   # the ceiling a bf16 step could reach (issue: 4.3× here)
    print(f"[zero_vs_ddp] matmul peak fp32 {peak / 1e9:.1f}, bf16 {peak_bf16 / 1e9:.1f} GFLOP/s on "
          f"{os.cpu_count()} cores; {flops / 1e9:.1f} GFLOP per step")
    runs = {"ddp (torch, gloo)": lambda: run_ddp(model_path, batch, args.steps)}
    init_local_ray(num_cpus=WORLD * 2)
    rows = []
    try:
        for stage in args.stages:
            runs[f"zero-{stage} (deepspeed, gloo)"] = lambda stage=stage: run_zero(model_path, stage, batch, args.steps)
        for name, fn in runs.items():
            times = fn()[args.warmup:]
            step_s = statistics.median(times)
            tokens = float(batch["attention_mask"].sum())
            rows.append({"name": name, "step_s": step_s, "samples_per_s": len(batch) / step_s,
                         "tokens_per_s": tokens / step_s, "gflops": flops / step_s / 1e9,
                         "mfu": flops / step_s / peak, "mfu_vs_bf16_peak": flops / step_s / peak_bf16,
                         "all_step_s": [round(t, 4) for t in times]})
            print(f"[zero_vs_ddp] {name}: {step_s:.3f} s/step")
    finally:
        ray.shutdown()
    ddp = rows[0]["step_s"]
    for row in rows:
        row["ddp_over_this"] = ddp / row["step_s"]
    print()
    print_table(rows, [("name", "engine", "s"), ("step_s", "step s", ".3f"), ("samples_per_s", "samples/s", ".2f"),
                       ("tokens_per_s", "tokens/s", ".0f"), ("gflops", "GFLOP/s", ".1f"), ("mfu", "MFU", ".1%"),
                       ("mfu_vs_bf16_peak", "MFU vs bf16 peak", ".1%"),
                       ("ddp_over_this", "DDP s / this s", ".2f")])
    write_report("zero_vs_ddp", {"model": args.model, "world_size": WORLD, "batch": args.batch,
                                 "prompt_len": args.prompt_len, "response_len": args.response_len,
                                 "peak_gflops": peak / 1e9, "peak_bf16_gflops": peak_bf16 / 1e9,
                                 "step_gflop": flops / 1e9,
                                 "command": "benchmarks/zero_vs_ddp.py " + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
