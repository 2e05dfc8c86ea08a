"""scripts/gpu_check.sh as the GPU machine runs it: here, without CUDA, it says so and exits 0; with --device cpu
the same checks run on the CPU (gloo where the GPU has NCCL), the role classes in-process as on a machine
without Ray, and every one passes."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gpu_check(out, *args):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    return proc, json.loads((out / "gpu_check.json").read_text())


def test_gpu_check_says_when_there_is_no_gpu_and_runs_its_checks_on_cpu(tmp_path):
    if not torch.cuda.is_available():
        proc, report = gpu_check(tmp_path / "plain")
        assert proc.returncode == 0 and "no CUDA device here" in proc.stdout
        assert report == {"status": "no_cuda", "checks": []}
    proc, report = gpu_check(tmp_path / "cpu", "--device", "cpu", "--models", "tiny", "--stages", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {check["check"]: check for check in report["checks"]}
    assert set(checks) == {"zero3_bf16_tiny", "logprobs_vs_cpu_tiny", "hf_rollout_engine",
                           "hf_judge", "packed_weights_from_device", "collective_sync_gloo"}
    assert all(check["ok"] for check in checks.values()), checks
    assert "16/16 matrices moved" in checks["zero3_bf16_tiny"]["detail"]
    assert "(equal)" in checks["collective_sync_gloo"]["detail"]
    assert report["environment"]["device"] == "cpu" and "gpu_check: 6 of 6 checks passed" in proc.stdout
