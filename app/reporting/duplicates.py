"""How many posts of a split also occur in an earlier one: the lines report.md and reproduction.md print from the
counts that `fusion extract` recorded in the cache (extract/duplicates.py), carried into results.json by
heads/runs.py cache_meta."""

from __future__ import annotations

from fusion.labels import SPLITS


def split_pairs(record: dict) -> list[tuple[str, dict]]:
    """The record's split pairs in split order (train-val, train-test, val-test): the cache stores JSON with sorted
    keys."""
    return sorted(record.get("pairs", {}).items(), key=lambda item: [SPLITS.index(s) for s in item[0].split("-")])


def duplicate_lines(cache: dict) -> list[str]:
    """One bullet: the counts per split pair, and whether --dedupe dropped the val/test posts seen in training."""
    record = cache.get("duplicates")
    if not record or not record.get("pairs"):
        return ["- Duplicates across splits: not counted (a cache written before fusion counted them)."]
    pairs = ", ".join(f"{pair.replace('-', '–')} {n['either']} (text {n['text']}, image {n['image']})"
                      for pair, n in split_pairs(record))
    if record.get("dedupe"):
        dropped = record.get("dropped", {})
        action = (f"`--dedupe` dropped the {dropped.get('val', 0)} validation and "
                  f"{dropped.get('test', 0)} test posts that duplicated a training post.")
    else:
        action = ("They were kept, as the paper's protocol does (`fusion extract --dedupe` drops the validation and "
                  "test posts that duplicate a training post).")
    return [f"- Duplicates across splits (posts of the later split whose normalised text or image pixels also occur "
            f"in the earlier one): {pairs}. {action}"]
