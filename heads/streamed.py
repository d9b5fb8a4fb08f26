"""A token split that stays in the cache file: training reads each minibatch's sequences when it needs them.

Only the pooled vectors (token 0 of each modality) and the labels are held in memory, which is all that every head
but dual_attn reads. A minibatch's sequences come from disk (fusion.cache.reader.TokenRows) and become float32
Modalities exactly as in features_from_cache, so a streamed split trains to the same numbers as one in memory.
A background thread reads ahead while the current minibatch trains: torch's kernels release Python's lock, so the
read overlaps them.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from torch import Tensor

from fusion.cache.reader import TokenRows
from fusion.heads.features import SplitFeatures, token_features

READ_AHEAD = 2  # minibatches in flight: one being read while one waits, so a slow read rarely stalls training


class StreamedSplit:
    """The SplitFeatures interface training uses (len, label, dims, tokens_per_row, latents_only, rows, batches)."""

    def __init__(self, reader: TokenRows, split: str, pooled: SplitFeatures):
        self.reader, self.split, self.pooled = reader, split, pooled
        shapes = reader.shapes[split]
        self.tokens_per_row = shapes["text_tokens"][1] + shapes["image_tokens"][1]

    def __len__(self) -> int:
        return len(self.pooled)

    @property
    def label(self) -> Tensor:
        return self.pooled.label

    @property
    def ids(self) -> list[str] | None:
        return self.pooled.ids

    @property
    def dims(self) -> tuple[int, int]:
        return self.pooled.dims

    def latents_only(self) -> SplitFeatures:
        return self.pooled

    def rows(self, index: Tensor | slice) -> SplitFeatures:
        arrays = self.reader.rows(self.split, index if isinstance(index, slice) else index.numpy())
        pooled = self.pooled.rows(index)
        return token_features(arrays["text_tokens"], arrays["text_mask"], arrays["image_tokens"],
                              pooled.text.tokens[:, 0], pooled.image.tokens[:, 0], pooled.label)

    def batches(self, selections: Iterable[Tensor | slice]) -> Iterator[SplitFeatures]:
        selections = iter(selections)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusion-read") as reader:
            # islice, not zip: zip would draw one selection past the limit and drop it
            pending = deque(reader.submit(self.rows, s) for s in islice(selections, READ_AHEAD))
            while pending:
                batch = pending.popleft().result()
                following = next(selections, None)
                if following is not None:
                    pending.append(reader.submit(self.rows, following))
                yield batch
