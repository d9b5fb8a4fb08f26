"""The hyper-parameter search over heads: the grid (vectorised passes, resumable), a shared Optuna study, pruning by
successive halving, and the grid's output files."""
