#!/usr/bin/env bash
# Run one job on this machine with a local Ray cluster on 127.0.0.1:  launchers/local.sh steps=10 model=tiny
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec .venv/bin/openrlaif train "$@"
