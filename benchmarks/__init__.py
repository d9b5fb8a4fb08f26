"""The benchmarks: one script per figure the README and docs quote, each measuring its ratios in one run.

    .venv/bin/python -m fusion.benchmarks.fit_speed --help      # likewise extract_speed, grid_speed, serve_speed, ...
    bash benchmarks/gpu_check.sh                                # the GPU machine check (no install needed)

common.py holds what they share: their options, the synthetic inputs several of them build, and the ending every one
prints (the machine, the date, the command, then one JSON object as the last line). A script that needs another's
measurement imports it from that script (grid_speed trains fit_speed's plain head; gpu_check times extraction as
extract_speed does). The top layer of pyproject.toml's layers contract: a benchmark may import any part of fusion,
and nothing in fusion imports a benchmark.
"""

import os

# Set here, before any benchmark imports transformers: their encoders are folders they write themselves, so the hub is
# never asked; and extraction forks image-decoding workers after tokenizing, where parallel tokenizers would warn.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
