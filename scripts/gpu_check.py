"""The GPU check: what of openrlaif can run on one GPU without Ray or vLLM (the project's lent H200 has CUDA
PyTorch, transformers and peft, nothing else of ours): the actor's DeepSpeed step (NCCL, world size 1, ZeRO 0-3,
bf16) on the tiny model and on a SmolLM2-shaped model, log-probs on GPU vs CPU, the HF rollout engine and HF judge
on CUDA, packed weights from CUDA memory, and the collective weight sync over NCCL between two processes.

Run it through scripts/gpu_check.sh (installs the carried wheels, bounds the time). The role classes run
in-process (workers/remote.py: no Ray). Prints a table; writes gpu_check.json under $OUT (or --out). Without
CUDA it says so and exits 0; `--device cpu` runs every check on the CPU instead (gloo for NCCL), which is how
the suite tests this script.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

os.environ["OPENRLAIF_IN_PROCESS"] = "1"   # role classes as plain classes, whether Ray is installed or not
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_models(folder: str, wanted: list[str]) -> dict[str, str]:
    """The tiny random Llama (with its tokenizer) and, from SmolLM2-135M's own config.json, a randomly
    initialised model of its shape (its weights, 270 MB, exceed what a GPU call may carry)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from openrlaif.models.tiny import build_tiny_llama
    paths = {"tiny": build_tiny_llama(os.path.join(folder, "tiny"))}
    if "smollm2" in wanted:
        config = AutoConfig.from_pretrained(os.path.join(HERE, "smollm2_config.json"))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        paths["smollm2"] = os.path.join(folder, "smollm2")
        model.save_pretrained(paths["smollm2"])
    return paths


def synthetic_batch(vocab: int, size: int = 8, prompt_len: int = 16, response_len: int = 32):
    import torch

    from openrlaif.batch import Batch
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab, (size, prompt_len + response_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.ones(size, response_len)
    for row in range(size):   # some left padding, some short responses
        attention_mask[row, :row % 3] = 0
        response_mask[row, response_len - row % 4:] = 0
        attention_mask[row, prompt_len + response_len - row % 4:] = 0
    return Batch({"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
                  "sample_mask": torch.ones(size), "advantages": torch.randn(size, generator=generator)})


# ---- checks that run in a process of their own (torch.distributed is initialised once per process) ----

def zero_step(model_path: str, stage: int, device: str) -> dict:
    """Two PPO-clip steps of the actor role on DeepSpeed, bf16, world size 1, at ZeRO `stage`. The project runs
    one worker at stage 0 (nothing to partition); here the stage is taken as asked, to exercise each."""
    import torch

    from openrlaif.config import ActorConfig, AlgorithmConfig
    from openrlaif.workers import engine
    engine.effective_zero_stage = lambda cfg, world_size: cfg.zero_stage   # the stage as asked, at world size 1
    from openrlaif.workers.actor import ActorWorker
    cfg = ActorConfig(zero_stage=stage, lr=1e-4, micro_batch_size=4)
    worker = ActorWorker(model_path, cfg, AlgorithmConfig(kl_coef=0.0), temperature=1.0, rank=0, world_size=1,
                         master_addr="127.0.0.1", master_port=free_port(),
                         backend="nccl" if device == "cuda" else "gloo", dtype="bfloat16", step_batch_size=8,
                         threads=4, seed=0)
    before = {k: v.clone() for k, v in worker.full_state_dict().items()}
    vocab = worker.engine.module.config.vocab_size
    batch = synthetic_batch(vocab)
    batch["old_logprobs"] = worker.logprobs(batch)
    seconds, losses = [], []
    for _ in range(2):
        start = time.perf_counter()
        metrics = worker.train_step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
    after = worker.full_state_dict()
    # every matrix moves; a norm's weights of 1.0 may not in the bf16 module (its step is below bf16's resolution)
    matrices = [k for k in before if before[k].dim() > 1]
    moved = sum(not torch.equal(before[k], after[k]) for k in matrices)
    ok = all(x == x and abs(x) < 1e6 for x in losses) and moved == len(matrices)
    return {"ok": ok, "detail": f"loss {losses[0]:.4f} -> {losses[1]:.4f}, {moved}/{len(matrices)} matrices moved, "
                                f"step {seconds[1]:.3f} s, engine on {worker.engine.device}",
            "step_s": seconds[1], "device": str(worker.engine.device),
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None}


def sync_member(rank: int, port: int, model_path: str, device: str, queue) -> None:
    """One end of the collective weight sync (rollout/collective.py): rank 0 sends the model, rank 1 receives it
    and compares it with the model it loads itself."""
    try:
        import torch
        from safetensors.torch import load_file

        from openrlaif.rollout.collective import SyncGroup
        if device == "cuda":
            torch.cuda.set_device(0)
        group = SyncGroup("127.0.0.1", port, rank, 2, device=device, timeout_s=120)
        state = load_file(os.path.join(model_path, "model.safetensors"))
        start = time.perf_counter()
        if rank == 0:
            sent = group.send(list(state.items()))
            queue.put({"rank": 0, "bytes": sent, "s": time.perf_counter() - start})
        else:
            received = dict(group.receive())
            equal = received.keys() == state.keys() and all(
                torch.equal(received[k].cpu(), state[k]) for k in state)
            queue.put({"rank": 1, "equal": equal, "s": time.perf_counter() - start,
                       "device": str(next(iter(received.values())).device)})
    except Exception as error:   # noqa: BLE001 - reported in the table
        queue.put({"rank": rank, "error": f"{type(error).__name__}: {error}"})


def collective_sync(model_path: str, device: str) -> dict:
    import multiprocessing as mp
    context = mp.get_context("spawn")
    queue, port = context.Queue(), free_port()
    members = [context.Process(target=sync_member, args=(rank, port, model_path, device, queue)) for rank in (0, 1)]
    for member in members:
        member.start()
    results = {}
    for _ in members:
        result = queue.get(timeout=180)
        results[result["rank"]] = result
    for member in members:
        member.join(timeout=30)
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        return {"ok": False, "detail": "; ".join(errors)}
    mib = results[0]["bytes"] / 2 ** 20
    return {"ok": results[1]["equal"], "detail": f"{mib:.1f} MiB in {results[1]['s']:.3f} s "
                                                 f"({'equal' if results[1]['equal'] else 'DIFFERENT'}), "
                                                 f"received on {results[1]['device']}"}


# ---- checks that run in the main process ----

def logprobs_vs_cpu(model_path: str, device: str) -> dict:
    """The same response log-probs on the device and on the CPU (float32, TF32 off), and the bf16 gap."""
    import torch

    from openrlaif.workers.common import load_causal_lm, response_logprobs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cpu_model = load_causal_lm(model_path, "float32").eval()
    batch = synthetic_batch(cpu_model.config.vocab_size)
    mask = batch["response_mask"].bool()
    with torch.no_grad():
        reference = response_logprobs(cpu_model, batch)
        gaps = {}
        for dtype in ("float32", "bfloat16"):
            model = load_causal_lm(model_path, dtype).to(device).eval()
            values = response_logprobs(model, batch.to(device)).float().cpu()
            gaps[dtype] = float((values - reference)[mask].abs().max())
    return {"ok": gaps["float32"] < 1e-4, "detail": f"max |gap| float32 {gaps['float32']:.2e}, "
                                                     f"bfloat16 {gaps['bfloat16']:.3f} (vs float32 on the CPU)"}


def hf_rollout(model_path: str, device: str) -> dict:
    """The HF rollout engine samples on the device; its log-probs equal a teacher-forced forward's."""
    import torch

    from openrlaif.config import RolloutConfig
    from openrlaif.rollout.types import SamplingSpec
    from openrlaif.workers.rollout import RolloutWorker
    worker = RolloutWorker(model_path, RolloutConfig(engine="hf"), max_model_len=128, threads=4, seed=0)
    start = time.perf_counter()
    completions = worker.generate([[1, 5, 6, 7], [1, 9]], SamplingSpec(n=4, max_new_tokens=16, seed=3))
    seconds = time.perf_counter() - start
    model = worker.engine.model
    prompts = {0: [1, 5, 6, 7], 1: [1, 9]}
    gap = 0.0
    with torch.no_grad():
        for c in completions:
            ids = torch.tensor([prompts[c.prompt_index] + c.token_ids], device=model.device)
            logits = model(ids).logits[0, len(prompts[c.prompt_index]) - 1:-1].float().log_softmax(-1)
            expected = logits.gather(-1, ids[0, len(prompts[c.prompt_index]):, None]).squeeze(-1).cpu()
            gap = max(gap, float((expected - torch.tensor(c.logprobs)).abs().max()))
    on = str(model.device)
    return {"ok": len(completions) == 8 and gap < 1e-3 and on.startswith(device),
            "detail": f"8 samples in {seconds:.2f} s on {on}, log-prob gap to a forward {gap:.1e}"}


def hf_judge(model_path: str, device: str) -> dict:
    """The HF judge reads label probabilities on the device (pointwise labels, a pairwise A/B)."""
    from openrlaif.feedback.backends import JudgeRequest
    from openrlaif.feedback.judge import JudgeWorker
    worker = JudgeWorker(model_path, dtype="float32", threads=4, seed=0, engine="hf")
    requests = [JudgeRequest(messages=[{"role": "user", "content": "Rate the answer from 1 to 5: the sun is hot"}],
                             labels=["1", "2", "3", "4", "5"]),
                JudgeRequest(messages=[{"role": "user", "content": "Which is better, A or B?"}], labels=["A", "B"])]
    replies = worker.complete(requests)
    masses = [sum(r.label_probs.values()) for r in replies]
    on = str(worker.engine.device)
    ok = all(r.failure is None for r in replies) and all(0 < m <= 1 + 1e-5 for m in masses) and on.startswith(device)
    return {"ok": ok, "detail": f"label mass {masses[0]:.3f} / {masses[1]:.3f} on {on}"}


def packed_from_device(model_path: str, device: str) -> dict:
    """Weights packed for the object store straight from device memory come back equal."""
    import torch
    from safetensors.torch import load_file

    from openrlaif.workers.weights import PackedWeights
    state = {k: v.to(device) for k, v in load_file(os.path.join(model_path, "model.safetensors")).items()}
    state |= {"bf16.copy": next(iter(state.values())).to(torch.bfloat16)}
    named = PackedWeights(state).named_tensors()
    equal = all(torch.equal(tensor, state[name].cpu()) for name, tensor in named)
    return {"ok": equal, "detail": f"{len(named)} tensors from {device} memory, float32 and bfloat16, equal"}


def in_subprocess(args: list[str], timeout: float) -> dict:
    """A check in a fresh interpreter (a torch.distributed group per process); its RESULT line."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"ok": False, "detail": f"exit {proc.returncode}: " + " | ".join(tail)}


def run_check(name: str, fn, *args) -> dict:
    start = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as error:   # noqa: BLE001 - every check reports, none stops the others
        result = {"ok": False, "detail": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()[-2000:]}
    result |= {"check": name, "seconds": time.perf_counter() - start}
    print(f"  {'ok  ' if result['ok'] else 'FAIL'} {name:28s} {result['seconds']:6.1f} s  {result['detail']}",
          flush=True)
    return result


def environment(device: str) -> dict:
    import torch
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
           "device": device, "cuda": torch.version.cuda}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import deepspeed
        env["deepspeed"] = deepspeed.__version__
    except Exception as error:   # noqa: BLE001
        env["deepspeed"] = f"missing ({type(error).__name__}): carry it, see scripts/gpu_check.sh"
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--zero", nargs=3, help=argparse.SUPPRESS)   # model path, stage, device
    args = parser.parse_args()
    if args.zero:
        import transformers
        transformers.utils.logging.disable_progress_bar()
        print("RESULT " + json.dumps(zero_step(args.zero[0], int(args.zero[1]), args.zero[2])), flush=True)
        return 0
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    report = {"status": "ran"}
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing checked. "
              "Run it on a GPU machine, or with --device cpu to exercise the checks on the CPU.")
        report = {"status": "no_cuda", "checks": []}
    else:
        report["environment"] = environment(args.device)
        print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()), flush=True)
        folder = tempfile.mkdtemp(prefix="openrlaif-gpu-check-")
        paths = build_models(folder, args.models)
        tiny = paths["tiny"]
        checks = []
        for model in args.models:
            for stage in args.stages:
                checks.append(run_check(f"zero{stage}_bf16_{model}", in_subprocess,
                                        ["--zero", paths[model], str(stage), args.device], 240))
        checks.append(run_check("logprobs_vs_cpu_tiny", logprobs_vs_cpu, tiny, args.device))
        if "smollm2" in paths:
            checks.append(run_check("logprobs_vs_cpu_smollm2", logprobs_vs_cpu, paths["smollm2"], args.device))
        checks.append(run_check("hf_rollout_engine", hf_rollout, tiny, args.device))
        checks.append(run_check("hf_judge", hf_judge, tiny, args.device))
        checks.append(run_check("packed_weights_from_device", packed_from_device, tiny, args.device))
        checks.append(run_check(f"collective_sync_{'nccl' if args.device == 'cuda' else 'gloo'}", collective_sync,
                                paths.get("smollm2", tiny), args.device))
        report["checks"] = checks
        passed = sum(c["ok"] for c in checks)
        print(f"gpu_check: {passed} of {len(checks)} checks passed")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as handle:
            json.dump(report, handle, indent=2)
    return 0 if all(c["ok"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
