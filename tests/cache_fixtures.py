"""Caches for tests, built through the real PartialCache + finalize path (no encoders involved).

    from cache_fixtures import write_synthetic_cache
    path = write_synthetic_cache(tmp_path / "cache.h5", n_per_split=(30, 10, 10), dt=16, di=24, tokens=False, seed=0)
    data = read_cache(path)           # data.splits["train"].text is (30 - skipped, 16) float16

Embeddings are class prototypes times `signal` plus unit noise, so a head can learn the labels from either modality
(signal=0 gives pure noise). With tokens=True every row also gets text tokens of a random length (1..text_length,
row 0 of them equal to the pooled text) with a mask, and `patches` image tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusion.cache.partial import PartialCache, Plan
from fusion.cache.writer import finalize
from fusion.labels import LABELS, SPLITS

SKIP_REASONS = ("not an image", "truncated beyond repair")


def write_synthetic_cache(path: Path, n_per_split: int | tuple[int, int, int] = (12, 4, 4), *, dt: int = 16,
                          di: int = 24, tokens: bool = False, seed: int = 0, n_skipped: int = 1,
                          batch_size: int = 5, signal: float = 2.0, text_length: int = 6, patches: int = 5,
                          dataset: str = "synthetic") -> Path:
    """Writes a complete cache at `path` and returns the path. `n_per_split` counts rows before skipping;
    `n_skipped` rows (chosen at random) end up under /skipped instead of their split. `dataset`: the name the cache
    says it holds (its attribute), which chooses the selection metric."""
    path = Path(path)
    plan = synthetic_plan(n_per_split, dt=dt, di=di, tokens=tokens, seed=seed)
    plan.attrs["dataset"] = dataset
    rows = synthetic_rows(plan, dt=dt, di=di, tokens=tokens, seed=seed, signal=signal, n_skipped=n_skipped,
                          text_length=text_length, patches=patches)
    with PartialCache.open(path, plan=plan) as partial:
        write_batches(partial, rows, partial.pending(), batch_size=batch_size, seed=seed)
    return finalize([partial.directory], path)


def synthetic_plan(n_per_split: int | tuple[int, int, int] = (12, 4, 4), *, dt: int = 16, di: int = 24,
                   tokens: bool = False, seed: int = 0) -> Plan:
    counts = (n_per_split,) * len(SPLITS) if isinstance(n_per_split, int) else tuple(n_per_split)
    rng = np.random.default_rng(seed)
    splits = [split for split, count in zip(SPLITS, counts) for _ in range(count)]
    labels = [int(label) for count in counts for label in rng.permutation(np.arange(count) % len(LABELS))]
    ids = [f"{split}-{number:04d}" for split, count in zip(SPLITS, counts) for number in range(count)]
    attrs = {"dataset": "synthetic", "text_model": "tiny-text", "image_model": "tiny-image", "text_pooling": "cls",
             "image_pooling": "cls_layernorm", "max_length": 8, "image_size": 32, "split_seed": seed,
             "precision": "fp32", "tokens": tokens, "text_dim": dt, "image_dim": di, "text_model_revision": None}
    return Plan(fingerprint=f"synthetic-{seed}-{dt}-{di}-{int(tokens)}-{'-'.join(map(str, counts))}", attrs=attrs,
                ids=ids, splits=splits, labels=labels)


def synthetic_rows(plan: Plan, *, dt: int = 16, di: int = 24, tokens: bool = False, seed: int = 0,
                   signal: float = 2.0, n_skipped: int = 1, text_length: int = 6, patches: int = 5) -> dict:
    """Every plan row's arrays (float16, as stored) plus `skipped`: {row: reason}. Token text is padded to
    `text_length`; `text_length_of` gives each row's true length."""
    rng = np.random.default_rng(seed + 1)
    labels, rows = np.asarray(plan.labels), len(plan.ids)
    arrays = {name: (signal * rng.standard_normal((len(LABELS), dim))[labels]
                     + rng.standard_normal((rows, dim))).astype(np.float16)
              for name, dim in (("text", dt), ("image", di))}
    if tokens:
        lengths = rng.integers(1, text_length + 1, size=rows)
        mask = np.arange(text_length)[None, :] < lengths[:, None]
        text_tokens = (rng.standard_normal((rows, text_length, dt)) * mask[..., None]).astype(np.float16)
        text_tokens[:, 0] = arrays["text"]
        arrays.update(text_tokens=text_tokens, text_mask=mask, text_length_of=lengths,
                      image_tokens=rng.standard_normal((rows, patches, di)).astype(np.float16))
    skipped_rows = rng.choice(rows, size=min(n_skipped, rows), replace=False)
    arrays["skipped"] = {int(row): SKIP_REASONS[number % len(SKIP_REASONS)]
                         for number, row in enumerate(sorted(skipped_rows))}
    return arrays


def write_batches(partial: PartialCache, rows: dict, indices: np.ndarray, *, batch_size: int = 5,
                  seed: int = 0) -> None:
    """Writes `indices` in shuffled batches (like the length-sorted batches of extraction, rows are scattered)."""
    shuffled = np.random.default_rng(seed + 2).permutation(np.asarray(indices, dtype=np.int64))
    for start in range(0, len(shuffled), batch_size):
        batch = np.sort(shuffled[start:start + batch_size])
        partial.write_batch(batch, batch_arrays(rows, batch), {row: rows["skipped"][row] for row in batch.tolist()
                                                               if row in rows["skipped"]})


def batch_arrays(rows: dict, batch: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays extraction would hand over for `batch`: skipped rows left out, text tokens cut to the batch's
    longest text."""
    kept = np.array([row for row in batch.tolist() if row not in rows["skipped"]], dtype=np.int64)
    if not len(kept):
        return {}
    arrays = {"text": rows["text"][kept], "image": rows["image"][kept]}
    if "text_tokens" in rows:
        longest = int(rows["text_length_of"][kept].max())
        arrays.update(text_tokens=rows["text_tokens"][kept, :longest], text_mask=rows["text_mask"][kept, :longest],
                      image_tokens=rows["image_tokens"][kept])
    return arrays
