"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") and the expected calibration
error: arithmetic on logits and probabilities, no I/O.

A head's logits z are divided by one temperature T > 0: softmax(z / T) ranks the classes as softmax(z) does (dividing
by a positive number keeps the logits' order), so calibration never changes a label; it changes only how sure the
probabilities are. T is fitted on the validation split by minimising the negative log-likelihood with
torch.optim.LBFGS over log T (so T stays positive), for M heads at once: their NLLs are independent, so the minimum
of the sum is each head's own minimum.

ECE: the rows binned by their top probability into 15 equal-width bins (lo, hi] over [0, 1]; the sum over bins of
(rows in the bin / all rows) x |accuracy in the bin - mean top probability in the bin|.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ECE_BINS = 15
# A validation split a head separates perfectly drives T towards 0 (every probability towards 1) and a constant one
# towards infinity; neither says anything about new posts, so T is kept within these bounds.
TEMPERATURE_RANGE = (0.05, 20.0)


def nll(logits: Tensor, labels: Tensor, temperature: Tensor | float = 1.0) -> Tensor:
    """Mean negative log-likelihood of softmax(logits / T): logits (..., N, C), labels (N,), T (...) -> (...)."""
    temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    log_probs = torch.log_softmax(logits / temperature[..., None, None], dim=-1)
    index = labels.to(logits.device).expand(logits.shape[:-1]).unsqueeze(-1)
    return -log_probs.gather(-1, index).squeeze(-1).mean(dim=-1)


def fit_temperatures(logits: Tensor, labels: Tensor, *, max_iter: int = 100) -> Tensor:
    """One temperature per head: logits (M, N, C) on validation, labels (N,) -> (M,) float64, each within
    TEMPERATURE_RANGE. A head whose logits are not all finite (a diverged run) keeps T = 1."""
    logits = logits.detach().to(torch.float64)
    finite = torch.isfinite(logits).flatten(1).all(dim=1)
    usable = torch.where(finite[:, None, None], logits, torch.zeros_like(logits))
    log_t = torch.zeros(logits.shape[0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    low, high = (float(np.log(bound)) for bound in TEMPERATURE_RANGE)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nll(usable, labels, log_t.clamp(low, high).exp()).sum()
        loss.backward()
        return loss

    if logits.shape[1]:
        optimizer.step(closure)
    temperatures = log_t.detach().clamp(low, high).exp()
    return torch.where(finite, temperatures, torch.ones_like(temperatures))


def calibrated(logits: Tensor, temperature: float | None) -> Tensor:
    """Probabilities softmax(logits / T); T None (an uncalibrated run) gives the head's own softmax."""
    return torch.softmax(logits if temperature is None else logits / temperature, dim=-1)


def reliability_bins(probabilities, labels, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of the top probability: its edges ("low", "high"), "count", mean top probability
    ("confidence") and "accuracy" (both 0 in an empty bin). probabilities (N, C), labels (N,)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    confidence, predicted = probabilities.max(axis=1), probabilities.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # searchsorted counts the inner edges below each confidence: the bin (lo, hi] it falls in
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(which, minlength=bins).astype(np.float64)
    sums = {name: np.bincount(which, weights=values, minlength=bins) for name, values in
            (("confidence", confidence), ("accuracy", (predicted == labels).astype(np.float64)))}
    mean = {name: np.divide(total, count, out=np.zeros(bins), where=count > 0) for name, total in sums.items()}
    return {"low": edges[:-1], "high": edges[1:], "count": count, **mean}


def expected_calibration_error(probabilities, labels, bins: int = ECE_BINS) -> float:
    """ECE over `bins` equal-width bins of the top probability (module docstring); 0 for no rows."""
    table = reliability_bins(probabilities, labels, bins)
    total = table["count"].sum()
    if not total:
        return 0.0
    return float(np.sum(table["count"] / total * np.abs(table["accuracy"] - table["confidence"])))
