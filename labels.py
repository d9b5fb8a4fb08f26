"""The three sentiment classes, in the order every array and table uses."""

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(LABELS)}
SPLITS: tuple[str, ...] = ("train", "val", "test")

# How datasets name the three splits (a CSV's split column, a Hugging Face dataset's split names).
SPLIT_ALIASES: dict[str, str] = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                                 "test": "test"}
# The numeric convention many sentiment datasets use: -1 negative, 0 neutral, 1 positive.
NUMERIC_LABELS: dict[int, int] = {-1: 0, 0: 1, 1: 2}


def numeric_label(value: object) -> int | None:
    """The class of a -1/0/1 label given as a number or as text ("+1" too, "1.0" not); None for anything else."""
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-") not in ("0", "1") or text.count("+") + text.count("-") > 1:
            return None
        value = int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return NUMERIC_LABELS.get(value)
    return None
