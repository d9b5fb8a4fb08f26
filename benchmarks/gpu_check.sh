#!/usr/bin/env bash
# The GPU machine check, in one call on a bare machine: its own python3 with a CUDA build of torch and the packages
# fusion needs (transformers, h5py, numpy, typer, rich, scikit-learn, safetensors, pillow, filelock), no install,
# no venv, no network. Not part of the tests. What it measures: benchmarks/gpu_check.py's docstring (run here as
# `python -m fusion.benchmarks.gpu_check`).
#
#     bash benchmarks/gpu_check.sh                       # from anywhere; about 4 minutes; last line: one JSON object
#     N=8192 BATCH=256 PY=/opt/torch/bin/python3 bash benchmarks/gpu_check.sh
#
# The repository root is the package `fusion` (pyproject maps it), so it cannot be imported from its own folder:
# a temporary folder holding a `fusion` symlink to the root goes first on PYTHONPATH instead of an install, so
# `python -m fusion.benchmarks.gpu_check` finds this checkout.
# Exit codes: 0 done (a step's failure is inside the JSON), 2 no python, 3 no GPU, 4 fusion not importable,
# 124 over the time limit.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
PY=${PY:-python3}
LIMIT=${LIMIT:-295}

json_line() {  # {"gpu_check": "stopped", "reason": "..."} without relying on python
    local reason=${1//\\/\\\\}
    printf '{"gpu_check": "stopped", "reason": "%s"}\n' "${reason//\"/\\\"}"
}

stop() {  # one line on stderr, the JSON line last on stdout
    echo "gpu_check: $1" >&2
    json_line "$1"
    exit "$2"
}

command -v "$PY" >/dev/null 2>&1 || stop "no python at PY=$PY; set PY=/path/to/python3 (the one with torch)" 2
case $PY in  # a relative path (PY=.venv/bin/python) must survive the cd into the shim below
    /*) ;;
    */*) PY="$PWD/$PY" ;;
esac

SHIM=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-shim.XXXXXX") || stop "cannot make a temporary folder" 2
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO" "$SHIM/fusion"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$SHIM" || exit 2  # nothing of the checkout's root on sys.path but through the symlink

echo "preflight: $(command -v "$PY") ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
if ! "$PY" -m fusion.cli --help >/dev/null 2>"$SHIM/help.err"; then
    stop "fusion --help failed through the import shim: $(tail -n 1 "$SHIM/help.err")" 4
fi
FROM=$("$PY" -c 'import os, fusion; print(os.path.dirname(os.path.realpath(fusion.__file__)))' 2>&1)
echo "preflight: fusion --help: ok (fusion from $FROM)"

timeout "$LIMIT" "$PY" -m fusion.benchmarks.gpu_check "$@" | tee "$SHIM/out.log"
code=${PIPESTATUS[0]}
last=$(tail -n 1 "$SHIM/out.log")
if [[ $code == 124 ]]; then
    stop "stopped after LIMIT=$LIMIT s; nothing above is a complete result" 124
elif [[ $last != "{"* ]]; then
    stop "python -m fusion.benchmarks.gpu_check ended with exit code $code before its JSON line (see above)" \
        "$(( code ? code : 1 ))"
fi
exit "$code"
