#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): what of openrlaif runs on one GPU without Ray or vLLM. At most 8 minutes;
# prints a table and writes gpu_check.json under $OUT when it is set. Without CUDA it says so and exits 0.
#
# The GPU machine lacks DeepSpeed and what DeepSpeed needs beyond its own packages (pydantic, hjson): they travel
# as wheels in .gpu_wheels/, made here with `make gpu-wheels` (Python 3.12, manylinux x86-64), and are installed
# into a temporary folder on PYTHONPATH, not into the machine's Python. With the device tool:
#   make gpu-wheels      # once, on the CPU machine
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=540)
# Arguments go to gpu_check.py (--device cpu runs the checks on the CPU; --models tiny; --stages 0 3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .gpu_wheels ] && ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  SITE=$(mktemp -d -t openrlaif-gpu-wheels-XXXX)
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" .gpu_wheels/*.whl \
    || echo "gpu_check: installing the carried wheels failed; the DeepSpeed checks will say so" >&2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
