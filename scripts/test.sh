#!/usr/bin/env bash
# `make test`: the whole suite as two pytest streams side by side, the CLI tests (tests/e2e, each in processes and
# Ray clusters of their own) beside the unit and integration tests (one Ray cluster). A test spends about a third
# of its time waiting (processes and Ray starting, models loading, sockets), so two streams share the 2 cores of
# a CI machine better than one: measured 48.7 min in one stream (2026-12-07). Each stream has its own pytest temp
# folder; the e2e stream's output is printed when both are done. Exit status: the first failing stream's (pytest's
# own codes: 1 failures, 5 nothing collected, ...), 0 when both pass.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ARGS=(-p no:cacheprovider -q -rfEs --durations=25)
LOG=$(mktemp -t openrlaif-e2e-XXXX.log)
BASE=$(mktemp -d -t openrlaif-pytest-XXXX)
"$PY" -m pytest "${ARGS[@]}" --basetemp="$BASE/e2e" tests/e2e >"$LOG" 2>&1 &
e2e=$!
trap 'kill $e2e 2>/dev/null' INT TERM
"$PY" -m pytest "${ARGS[@]}" --basetemp="$BASE/rest" tests/unit tests/integration
rest=$?
wait $e2e
e2e_code=$?
echo
echo "================================ tests/e2e (run beside the above) ================================"
cat "$LOG"
rm -rf "$LOG" "$BASE"
echo "[make test] unit + integration: exit $rest; e2e: exit $e2e_code"
[ "$rest" -ne 0 ] && exit "$rest"
exit "$e2e_code"
