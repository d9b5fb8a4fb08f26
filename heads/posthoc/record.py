"""What training records about each head beside its weights (heads/train.py train_many calls `record_posthoc` last):

- its temperature, fitted on the validation split's logits of the best weights (heads/posthoc/calibration.py), with
  the validation NLL and the test split's ECE before and after, as `result.calibration`;
- the test split's raw logits, kept with the test predictions for the report's reliability diagram;
- the training split's mean pooled embeddings (`result.train_means`), which stand in for a modality when a prediction
  is explained by what the other modality says alone (heads/posthoc/explain.py).

The logits are computed in float32 without autocast, as prediction computes them, whatever precision trained the
head; the heads of one architecture are stacked and computed together, as training computes them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusion.heads.features import Modality, SplitFeatures
from fusion.heads.models import head_forward
from fusion.heads.posthoc.calibration import (ECE_BINS, calibrated, expected_calibration_error, fit_temperatures,
                                              nll)
from fusion.heads.registry import HEADS
from fusion.heads.result import FitResult

# Floats a logits chunk may hold at once (the chunk's tokens as read and each model's queries and scores): ~128 MB.
CHUNK_VALUES = 1 << 25
LOGIT_DIGITS = 5  # test logits as stored in test_predictions.json


def record_posthoc(features: dict[str, SplitFeatures], results: list[FitResult], device=None) -> None:
    """Fills each result's calibration, test logits and train_means (see the module docstring), in place."""
    means = train_means(features["train"])
    groups: dict[tuple, list[FitResult]] = {}
    for result in results:
        groups.setdefault((result.config.head, result.config.proj_dim, result.config.hidden), []).append(result)
    val, test = features["val"], features.get("test")
    for (head, _, _), group in groups.items():
        params = {name: torch.stack([result.state_dict[name] for result in group]) for name in group[0].state_dict}
        val_logits = split_logits(head, params, val, device)
        temperatures = fit_temperatures(val_logits, val.label)
        test_logits = split_logits(head, params, test, device) if test is not None and len(test) else None
        for index, result in enumerate(group):
            temperature = float(temperatures[index])
            result.train_means = means
            result.calibration = {
                "temperature": temperature, "fitted_on": "val", "bins": ECE_BINS,
                "val_nll_raw": float(nll(val_logits[index], val.label)),
                "val_nll": float(nll(val_logits[index], val.label, temperature))}
            if test_logits is not None:
                labels = test.label.cpu().numpy()
                result.calibration.update(
                    test_ece_raw=expected_calibration_error(calibrated(test_logits[index], None), labels),
                    test_ece=expected_calibration_error(calibrated(test_logits[index], temperature), labels))
                if result.test_predictions is not None:
                    result.test_predictions.logits = test_logits[index].round(decimals=LOGIT_DIGITS).tolist()


def train_means(train: SplitFeatures) -> dict[str, Tensor]:
    """The mean pooled embedding (token 0) of each modality over the training split, float32 on the CPU."""
    pooled = train.latents_only()
    return {name: modality.tokens[:, 0].to(torch.float64).mean(dim=0).float().cpu()
            for name, modality in (("text", pooled.text), ("image", pooled.image))}


@torch.no_grad()
def split_logits(head: str, params: dict[str, Tensor], split: SplitFeatures, device=None) -> Tensor:
    """Logits (M, N, 3) of M stacked heads of one architecture over a split (in memory or streamed), on the CPU."""
    spec = HEADS[head]
    if spec.fusion != "dual_attn":  # only cross-modal attention reads past token 0
        split = split.latents_only()
    device = torch.device(device) if device is not None else split.label.device
    params = {name: tensor.to(device=device, dtype=torch.float32) for name, tensor in params.items()}
    models = next(iter(params.values())).shape[0]
    per_row = split.tokens_per_row * (max(split.dims) + models) + 2 * models * (sum(split.dims) + 256)
    chunk = max(1, min(4096, CHUNK_VALUES // per_row))
    parts = []
    for rows in split.batches(slice(start, start + chunk) for start in range(0, len(split), chunk)):
        text, image = (Modality(m.tokens.to(device, torch.float32), m.mask.to(device)) for m in (rows.text, rows.image))
        parts.append(head_forward(spec, params, text, image).float().cpu())
    return torch.cat(parts, dim=1) if parts else torch.empty(models, 0, 3)
