"""Classification metrics in the layout of metrics.json, from the 3x3 confusion counts.

Training scores every model on validation after every epoch, thousands of times in a grid; scikit-learn's checks cost
about 7 ms a call, and on small datasets they took a fifth of a grid's time. The counts come from one np.bincount and
every metric is a line of arithmetic on them, with scikit-learn's definitions (zero_division 0);
tests/test_heads.py checks each against scikit-learn.
"""

from __future__ import annotations

import numpy as np

from fusion.labels import LABELS

CLASS_IDS = list(range(len(LABELS)))


def confusion_counts(y_true, y_pred) -> list[list[int]]:
    """3x3 counts, rows the true class and columns the predicted one (negative, neutral, positive)."""
    return _confusion(y_true, y_pred).tolist()


def classification_metrics(y_true, y_pred) -> dict:
    """accuracy, macro_f1, weighted_f1 and per_class_f1 {negative, neutral, positive} (labels 0..2).

    Per class, F1 = 2 TP / (2 TP + FP + FN), 0 when the class is neither present nor predicted; macro F1 is their
    mean, weighted F1 their mean weighted by each class's support."""
    counts = _confusion(y_true, y_pred)
    true_positives = np.diag(counts).astype(np.float64)
    support = counts.sum(axis=1)
    denominator = support + counts.sum(axis=0)  # 2 TP + FP + FN
    f1 = np.divide(2 * true_positives, denominator, out=np.zeros(len(LABELS)), where=denominator > 0)
    total = int(support.sum())
    return {
        "accuracy": float(true_positives.sum() / total) if total else 0.0,
        "macro_f1": float(np.mean(f1)),
        "weighted_f1": float(np.average(f1, weights=support)) if total else 0.0,
        "per_class_f1": {name: float(score) for name, score in zip(LABELS, f1)},
    }


def _confusion(y_true, y_pred) -> np.ndarray:
    y_true, y_pred = np.asarray(y_true, dtype=np.int64).ravel(), np.asarray(y_pred, dtype=np.int64).ravel()
    classes = len(LABELS)
    return np.bincount(classes * y_true + y_pred, minlength=classes * classes).reshape(classes, classes)
