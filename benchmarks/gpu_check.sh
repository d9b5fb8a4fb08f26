#!/usr/bin/env bash
# Extraction and grid speed on a GPU machine: `fusion extract` samples/s in fp32 and bf16, the ratio to the encoders'
# pure forward on the same prepared batches, bf16's speed-up and its cosine similarity to fp32; then the paper's grid
# (benchmarks/grid_speed.py --device cuda). Not part of the tests.
#
#     benchmarks/gpu_check.sh                  # from anywhere; needs .venv with a CUDA build of torch
#     N=8192 BATCH=256 benchmarks/gpu_check.sh # bigger run
#
# Budget: under 10 minutes, 5 for extraction (random bert-base / dinov2-small shaped models are written once, the JPEGs
# in parallel; each precision then runs one extraction and one pure forward) and 5 for the grid. The memory (RSS)
# check is CPU-only and skipped here.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
N=${N:-4096}
BATCH=${BATCH:-128}
CORES=$(nproc)
# Decoding and resizing JPEGs is the CPU's share of the work: give it every core but the two the main loop uses.
WORKERS=${WORKERS:-$(( CORES > 3 ? CORES - 2 : 1 ))}
PRECISIONS=${PRECISIONS:-fp32,bf16}

"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device; install a CUDA build (make venv TORCH_SPEC=...)")
print(f"gpu: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
echo "cpus: $CORES, decode workers: $WORKERS, N=$N, batch $BATCH, precisions $PRECISIONS"

# timeout: a stuck run reports as a failure instead of eating the machine's time.
timeout 290 "$PY" benchmarks/extract_speed.py --device cuda --n "$N" --batch-size "$BATCH" \
    --workers "$WORKERS" --precisions "$PRECISIONS" --skip-rss

# Stage 2 on the GPU: the paper's 144-configuration grid at MVSA-Multi size with --prune in bf16, against complete
# plain runs (GRID=0 skips it).
if [ "${GRID:-1}" != 0 ]; then
    exec timeout 290 "$PY" benchmarks/grid_speed.py --device cuda --plain-sample "${PLAIN_SAMPLE:-1}"
fi
