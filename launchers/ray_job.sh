#!/usr/bin/env bash
# Submit `openrlaif train <overrides>` to a running Ray cluster with `ray job submit`, and follow its logs.
#
#   launchers/ray_job.sh [--address http://HEAD:8265] [--env KEY=VALUE]... [--no-wait] [--dry-run] -- <overrides>
#
#   launchers/ray_job.sh --address http://10.0.0.1:8265 --env HF_HOME=/shared/hf -- \
#       algorithm=grpo model.path=/shared/models/qwen steps=200 output.dir=/shared/runs/grpo-1
#
# What it does:
#   * uploads this checkout as the job's working dir (without .venv, .git, runs/, caches); the cluster's Python
#     must have openrlaif's dependencies (docker/Dockerfile, or `pip install -e .[cpu|gpu]` on every node);
#   * passes --env KEY=VALUE pairs (and OPENRLAIF_CACHE, WANDB_*, HF_* if set here) as the job's env vars;
#   * joins the cluster from inside the job (cluster.address=auto) and writes to an absolute output.dir: the job's
#     cwd is a temporary copy, so a relative dir would be lost. Default: $OPENRLAIF_RUNS (or ./runs)/<timestamp>,
#     which must be a path the head node can write (a shared filesystem on multi-node clusters).
#
# Address: --address, else $RAY_ADDRESS, else http://127.0.0.1:8265. Ray 2.60 clusters have token auth on by
# default: the client reads the token from ~/.ray/auth_token when RAY_AUTH_MODE=token (set here when that file
# exists and RAY_AUTH_MODE is unset), or from $RAY_AUTH_TOKEN.
# Follow a job later:  ray job logs --address ADDR --follow <id>     Stop it:  ray job stop --address ADDR <id>
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
wait_flag=()
dry_run=0
env_pairs=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --env) env_pairs+=("$2"); shift 2 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (overrides go after --). See --help." >&2; exit 2 ;;
  esac
done
overrides=("$@")

for name in OPENRLAIF_CACHE HF_HOME HF_HUB_OFFLINE WANDB_MODE WANDB_PROJECT WANDB_API_KEY; do
  if [[ -n "${!name:-}" ]]; then env_pairs+=("$name=${!name}"); fi
done

has_output_dir=0
for override in "${overrides[@]+"${overrides[@]}"}"; do
  [[ "$override" == output.dir=* ]] && has_output_dir=1
done
if [[ $has_output_dir -eq 0 ]]; then
  runs="${OPENRLAIF_RUNS:-$root/runs}"
  overrides+=("output.dir=$runs/$(date +%Y%m%d-%H%M%S)-$RANDOM")
fi

runtime_env="$(python3 - "${env_pairs[@]+"${env_pairs[@]}"}" <<'PY'
import json, sys
env = {}
for pair in sys.argv[1:]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        sys.exit(f"error: --env {pair!r} must be KEY=VALUE")
    env[key] = value
print(json.dumps({"env_vars": env,
                  "excludes": [".venv/", ".git/", "runs/", "outputs/", "**/__pycache__/", "*.egg-info/",
                               ".pytest_cache/", "benchmarks/results/"]}))
PY
)"

if [[ -z "${RAY_AUTH_MODE:-}" && -z "${RAY_AUTH_TOKEN:-}" && -f "$HOME/.ray/auth_token" ]]; then
  export RAY_AUTH_MODE=token
fi

command=(ray job submit --address "$address" --working-dir "$root" --runtime-env-json "$runtime_env"
         "${wait_flag[@]+"${wait_flag[@]}"}" -- python -m openrlaif train cluster.address=auto
         "${overrides[@]}")
if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${command[@]}"; echo
  exit 0
fi
ray_bin="$(command -v ray || true)"
if [[ -z "$ray_bin" && -x "$root/.venv/bin/ray" ]]; then command[0]="$root/.venv/bin/ray"; fi
# A head that just started may not have its job agent up yet ("No available agent"): retry that, nothing else.
output="$(mktemp)"
trap 'rm -f "$output"' EXIT
for attempt in 1 2 3 4 5 6 7 8 9 10; do
  set +e
  "${command[@]}" 2>&1 | tee "$output"
  status=${PIPESTATUS[0]}
  set -e
  if [[ $status -ne 0 ]] && grep -q "Failed to connect to Ray at address" "$output"; then
    echo "error: no Ray cluster answers at $address. Fix: start the head (ray start --head --dashboard-host=..." \
         "--dashboard-port=...), or pass its job server with --address http://HEAD:8265 (or RAY_ADDRESS)." >&2
    exit "$status"
  fi
  if [[ $status -eq 0 ]] || ! grep -q "No available agent" "$output"; then exit "$status"; fi
  echo "[openrlaif] the cluster's job agent is not up yet; retrying in 3 s ($attempt/10)" >&2
  sleep 3
done
exit "$status"
