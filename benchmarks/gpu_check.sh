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
#
# LIMIT counts from this script's start, python's start-up and the preflight included. The check itself stops its
# running step FINISH_S seconds before it (GPU_CHECK_DEADLINE) and prints its JSON line; should python have to be
# killed all the same, the line printed here carries the steps finished so far (GPU_CHECK_PARTIAL).
set -uo pipefail

START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
PY=${PY:-python3}
LIMIT=${LIMIT:-295}
FINISH_S=${FINISH_S:-15}

json_line() {  # {"gpu_check": "stopped", "reason": "...", "steps": {...}} without relying on python
    local reason=${1//\\/\\\\} steps=null
    if [[ -n ${SHIM:-} && -s $SHIM/partial.json ]]; then
        steps=$(cat "$SHIM/partial.json")  # written whole by each step (fusion/atomic.py): valid JSON or absent
    fi
    printf '{"gpu_check": "stopped", "reason": "%s", "steps": %s}\n' "${reason//\"/\\\"}" "$steps"
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
export GPU_CHECK_DEADLINE=$(( START + LIMIT - FINISH_S )) GPU_CHECK_PARTIAL="$SHIM/partial.json"
cd "$SHIM" || exit 2  # nothing of the checkout's root on sys.path but through the symlink

echo "preflight: $(command -v "$PY") ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
if ! "$PY" -m fusion.cli --help >/dev/null 2>"$SHIM/help.err"; then
    stop "fusion --help failed through the import shim: $(tail -n 1 "$SHIM/help.err")" 4
fi
FROM=$("$PY" -c 'import os, fusion; print(os.path.dirname(os.path.realpath(fusion.__file__)))' 2>&1)
echo "preflight: fusion --help: ok (fusion from $FROM)"

LEFT=$(( START + LIMIT - $(date +%s) ))
(( LEFT > 0 )) || stop "LIMIT=$LIMIT s spent before the check started (python's start-up and the preflight)" 124
timeout "$LEFT" "$PY" -m fusion.benchmarks.gpu_check "$@" | tee "$SHIM/out.log"
code=${PIPESTATUS[0]}
last=$(tail -n 1 "$SHIM/out.log")
if [[ $code == 124 ]]; then
    stop "killed at LIMIT=$LIMIT s (its own deadline did not stop it); steps: those finished before" 124
elif [[ $last != "{"* ]]; then
    stop "python -m fusion.benchmarks.gpu_check ended with exit code $code before its JSON line (see above)" \
        "$(( code ? code : 1 ))"
fi
exit "$code"
