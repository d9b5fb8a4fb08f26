"""The three sentiment classes, in the order every array and table uses."""

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(LABELS)}
SPLITS: tuple[str, ...] = ("train", "val", "test")
