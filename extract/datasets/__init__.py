"""The dataset readers: each dataset as it is distributed (MVSA, Memotion, a CSV, Hugging Face folders, the demo),
its splits, and a registry by name (registry.py)."""
