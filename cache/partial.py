"""Work in progress: `NAME.partial/`, a folder that a kill -9 at any moment cannot corrupt.

    NAME.partial/
        plan.json                       fingerprint, root attrs, and every row's id/split/label in global order
        batch-r0000-000000000042.npz    one finished batch: rank 0, smallest row index 42
        rank0.lock                      held while rank 0 writes

Every file appears under its final name by `os.replace` of a fully written, fsynced temporary file, so a file with a
final name is complete; a temporary left by a killed run is never read. Resuming means: the rows named in the batch
files are done, the rest are pending. Several ranks write into one folder, each with its own lock and file names.

A batch file (numpy .npz, loaded with allow_pickle=False) holds:
    index          (B,) int64        global rows embedded, in the order of the arrays' rows
    text, image    (B, D) float16    pooled embeddings (absent when B == 0)
    text_tokens    (B, Lb, Dt) f16   optional, padded to the batch's longest text
    text_mask      (B, Lb) bool      optional, False on padding
    image_tokens   (B, P, Di) f16    optional
    skipped_index  (S,) int64        global rows that could not be embedded
    skipped_reason (S,) unicode      why, one short reason per skipped row
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from fusion.atomic import write_atomic, write_bytes_atomic
from fusion.cache.fingerprint import json_default
from fusion.errors import CacheError, CacheLockedError
from fusion.labels import SPLITS

PARTIAL_FORMAT = 1
PLAN_FILE = "plan.json"
POOLED_ARRAYS = ("text", "image")
TOKEN_ARRAYS = ("text_tokens", "text_mask", "image_tokens")
FLOAT_ARRAYS = ("text", "image", "text_tokens", "image_tokens")
RUN_ATTRS = {"created", "torch_version", "transformers_version"}  # may differ between the runs that fill one folder


@dataclass(frozen=True)
class Plan:
    """Every row of the cache before any is computed: row i is (ids[i], splits[i], labels[i])."""
    fingerprint: str
    attrs: dict
    ids: list[str]
    splits: list[str]
    labels: list[int]  # -1 is allowed for rows that are bound to be skipped (e.g. already missing on disk)

    def __post_init__(self):
        if not len(self.ids) == len(self.splits) == len(self.labels):
            raise ValueError(f"plan has {len(self.ids)} ids, {len(self.splits)} splits, {len(self.labels)} labels")
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"plan has unknown split(s) {sorted(unknown)}; expected {SPLITS}")


@dataclass
class BatchRef:
    """What a batch file claims, read without loading its embeddings."""
    path: Path
    index: np.ndarray
    skipped_index: np.ndarray
    skipped_reason: np.ndarray
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class PartialState:
    directory: Path
    plan: Plan
    batches: list[BatchRef]
    damaged: list[Path]  # files with a final name that cannot be read: never trusted


FORMAT_VERSION = 1  # of the HDF5 layout and its attributes; written by writer.py, checked by reader.py and info.py


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def batch_name(rank: int, first: int) -> str:
    return f"batch-r{rank:04d}-{first:012d}.npz"


class PartialCache:
    """One rank's writer into `NAME.partial/`; use as a context manager or call close()."""

    def __init__(self, directory: Path, out: Path, plan: Plan, rank: int, lock: FileLock, done: np.ndarray):
        self.directory, self.out, self.plan, self.rank = directory, out, plan, rank
        self._lock, self._done = lock, done

    @classmethod
    def open(cls, out: Path, *, plan: Plan, rank: int = 0) -> "PartialCache":
        """Makes or reopens the partial folder of `out`, locked for `rank`; refuses one made for other settings."""
        out = Path(out)
        directory = partial_dir(out)
        if directory.exists() and not directory.is_dir():
            raise CacheError(f"{directory} is in the way: it should be the folder of a partial cache; move it away")
        directory.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(directory / f"rank{rank}.lock", out)
        try:
            _ensure_plan(directory, plan, rank)
            done = _done_rows(directory, rank, len(plan.ids))
        except BaseException:
            lock.release()
            raise
        return cls(directory, out, plan, rank, lock, done)

    def pending(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Global row indices in [start, stop) that are neither embedded nor skipped yet, in order."""
        stop = len(self.plan.ids) if stop is None else stop
        return start + np.flatnonzero(~self._done[start:stop]).astype(np.int64)

    def write_batch(self, indices: np.ndarray, arrays: dict[str, np.ndarray], skipped: dict[int, str]) -> None:
        """Writes one batch atomically. `arrays` rows follow `indices` with the skipped rows left out."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) == 0:
            return
        self._check_indices(indices, skipped)
        is_skipped = np.isin(indices, np.fromiter(skipped, dtype=np.int64, count=len(skipped)))
        embedded = indices[~is_skipped]
        payload = self._payload(embedded, arrays)
        skipped_rows = indices[is_skipped]
        payload["skipped_index"] = skipped_rows
        payload["skipped_reason"] = np.array([str(skipped[int(i)]) for i in skipped_rows], dtype=str).reshape(-1)
        target = self.directory / batch_name(self.rank, int(indices.min()))
        save_npz_atomic(target, payload, temp_prefix=_temp_prefix(self.rank))
        self._done[indices] = True

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> "PartialCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_indices(self, indices: np.ndarray, skipped: dict[int, str]) -> None:
        # These are bugs in the caller, not user errors: a row written twice would make the merge ambiguous.
        if indices.min() < 0 or indices.max() >= len(self.plan.ids):
            raise ValueError(f"batch rows must lie in 0..{len(self.plan.ids) - 1}")
        if len(np.unique(indices)) != len(indices):
            raise ValueError("batch names a row twice")
        if self._done[indices].any():
            raise ValueError(f"rows already written: {indices[self._done[indices]][:5].tolist()}")
        if not set(int(i) for i in skipped) <= set(indices.tolist()):
            raise ValueError("skipped rows must be among the batch's indices")

    def _payload(self, embedded: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payload = {"index": embedded}
        if len(embedded) == 0:
            return payload
        with_tokens = all(name in arrays for name in TOKEN_ARRAYS)
        if any(name in arrays for name in TOKEN_ARRAYS) and not with_tokens:
            raise ValueError(f"token arrays come together: {TOKEN_ARRAYS}")
        if "tokens" in self.plan.attrs and bool(self.plan.attrs["tokens"]) != with_tokens:
            raise ValueError(f"the plan says tokens={self.plan.attrs['tokens']} but the batch has tokens={with_tokens}")
        for name in POOLED_ARRAYS + (TOKEN_ARRAYS if with_tokens else ()):
            payload[name] = self._checked(name, arrays, embedded)
        if with_tokens and payload["text_mask"].shape != payload["text_tokens"].shape[:2]:
            raise ValueError("text_mask must have the shape of text_tokens' first two axes")
        return payload

    def _checked(self, name: str, arrays: dict[str, np.ndarray], embedded: np.ndarray) -> np.ndarray:
        if name not in arrays:
            raise ValueError(f"batch with embedded rows lacks {name!r}")
        value = np.asarray(arrays[name])
        value = value.astype(bool) if name == "text_mask" else value.astype(np.float16, copy=False)
        ndim = 2 if name in POOLED_ARRAYS + ("text_mask",) else 3
        if value.ndim != ndim or len(value) != len(embedded):
            raise ValueError(f"{name} has shape {value.shape}; expected {ndim} axes and {len(embedded)} rows")
        if name in FLOAT_ARRAYS:
            self._check_finite(name, value, embedded)
        return value

    def _check_finite(self, name: str, value: np.ndarray, embedded: np.ndarray) -> None:
        """Caught here rather than at read time: the run that produced them is the one that can be changed."""
        bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
        if bad.any():
            row = int(embedded[np.flatnonzero(bad)[0]])
            raise CacheError(f"{self.out}: the encoder produced NaN or Inf in {name} for {int(bad.sum())} row(s) "
                             f"(first: id {self.plan.ids[row]!r} in {self.plan.splits[row]}) as stored in float16; "
                             f"a model run in fp16/bf16 can overflow, try --precision fp32")


def acquire_lock(lock_path: Path, out: Path) -> FileLock:
    lock = FileLock(lock_path)
    try:
        lock.acquire(blocking=False)
    except Timeout as error:
        raise CacheLockedError(f"another fusion process is writing {out} (lock {lock_path})") from error
    return lock


def _ensure_plan(directory: Path, plan: Plan, rank: int) -> None:
    """Writes plan.json once; a partial made for other settings or other rows is refused, never mixed."""
    path = directory / PLAN_FILE
    if not path.exists():
        body = {"partial_format": PARTIAL_FORMAT, **asdict(plan), "labels": [int(label) for label in plan.labels]}
        text = json.dumps(body, ensure_ascii=False, default=json_default)
        write_bytes_atomic(path, text.encode(), temp_prefix=_temp_prefix(rank))
        return
    existing = read_plan(directory)
    same_rows = (existing.ids, existing.splits, existing.labels) == (list(plan.ids), list(plan.splits),
                                                                      list(plan.labels))
    if existing.fingerprint != plan.fingerprint or not same_rows:
        raise CacheError(f"{directory}: this partial cache was made for other settings (fingerprint "
                         f"{existing.fingerprint[:12]}, requested {plan.fingerprint[:12]}); delete it or use --out")
    # Same fingerprint, so every attribute but the run's own ones must match too; one that differs was altered, and
    # finalize would copy it into the cache.
    wanted = json.loads(json.dumps(plan.attrs, default=json_default))
    for key in sorted((set(wanted) | set(existing.attrs)) - RUN_ATTRS):
        if key not in existing.attrs or key not in wanted or existing.attrs[key] != wanted[key]:
            raise CacheError(f"{path}: damaged plan (attribute {key[:40]!r} is "
                             f"{str(existing.attrs.get(key, 'absent'))[:40]!r}, the settings say "
                             f"{str(wanted.get(key, 'absent'))[:40]!r}); delete {directory} and run `fusion extract` "
                             f"again")


def read_plan(directory: Path) -> Plan:
    path = directory / PLAN_FILE
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(body, dict) or body.get("partial_format") != PARTIAL_FORMAT:
            raise ValueError(f"not a plan of partial format {PARTIAL_FORMAT}")
        _check_plan_types(body)
        return Plan(fingerprint=body["fingerprint"], attrs=body["attrs"], ids=body["ids"], splits=body["splits"],
                    labels=body["labels"])
    except FileNotFoundError as error:
        raise CacheError(f"{directory}: not a partial cache (no {PLAN_FILE})") from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CacheError(f"{path}: damaged plan ({error}); delete {directory} and run `fusion extract` "
                         f"again") from error


def _check_plan_types(body: dict) -> None:
    """JSON read back from disk is validated before anything compares or indexes with it."""
    expected = {"fingerprint": str, "attrs": dict, "ids": list, "splits": list, "labels": list}
    for key, kind in expected.items():
        if not isinstance(body.get(key), kind):
            raise ValueError(f"{key} should be a {kind.__name__}")
    if not all(isinstance(value, str) for value in body["ids"] + body["splits"]):
        raise ValueError("ids and splits should be strings")
    if not all(type(value) is int for value in body["labels"]):
        raise ValueError("labels should be integers")


def _done_rows(directory: Path, rank: int, rows: int) -> np.ndarray:
    """Rows named by readable batch files of any rank; this rank's leftover temporaries and damaged files go."""
    for temp in directory.glob(_temp_prefix(rank) + "*"):
        temp.unlink(missing_ok=True)  # we hold this rank's lock, so nobody is still writing it
    batches, damaged = scan_batches(directory, rows)
    for path in damaged:
        path.unlink(missing_ok=True)
    done = np.zeros(rows, dtype=bool)
    for batch in batches:
        done[batch.index] = True
        done[batch.skipped_index] = True
    return done


def scan_partial(directory: Path) -> PartialState:
    """Read-only look at a partial folder (used by finalize and cache info)."""
    plan = read_plan(directory)
    batches, damaged = scan_batches(directory, len(plan.ids))
    return PartialState(directory=directory, plan=plan, batches=batches, damaged=damaged)


def scan_batches(directory: Path, rows: int) -> tuple[list[BatchRef], list[Path]]:
    batches, damaged = [], []
    for path in sorted(directory.glob("batch-r*.npz")):
        try:
            batches.append(read_batch_ref(path, rows))
        except Exception:  # anything unreadable (truncated zip, bad header, wrong keys) is simply not trusted
            damaged.append(path)
    return batches, damaged


def read_batch_ref(path: Path, rows: int) -> BatchRef:
    """The index arrays and every member's shape; the embeddings themselves stay on disk."""
    with np.load(path, allow_pickle=False) as npz:
        ref = BatchRef(path=path, index=npz["index"], skipped_index=npz["skipped_index"],
                       skipped_reason=npz["skipped_reason"])
    ref.shapes = npz_shapes(path)
    claimed = np.concatenate([ref.index, ref.skipped_index])
    if claimed.dtype.kind != "i" or ref.skipped_reason.dtype.kind != "U" or len(ref.skipped_reason) != len(
            ref.skipped_index):
        raise ValueError(f"{path}: wrong index arrays")
    if len(claimed) and (claimed.min() < 0 or claimed.max() >= rows or len(np.unique(claimed)) != len(claimed)):
        raise ValueError(f"{path}: rows out of range or repeated")
    if len(ref.index) and any(ref.shapes.get(name, (None,))[0] != len(ref.index) for name in POOLED_ARRAYS):
        raise ValueError(f"{path}: arrays do not match the index")
    return ref


def npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from the .npy headers inside the zip, without reading the data."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = reader(handle)
            if dtype.hasobject:  # never written by us; np.load(allow_pickle=False) would refuse it at finalize
                raise ValueError(f"{path}: {member} holds Python objects (a pickle), not numbers")
            shapes[member.removesuffix(".npy")] = tuple(shape)
    return shapes


def _temp_prefix(rank: int) -> str:
    return f".tmp-r{rank:04d}-"


def save_npz_atomic(target: Path, arrays: dict[str, np.ndarray], *, temp_prefix: str) -> None:
    write_atomic(target, lambda handle: np.savez(handle, **arrays), temp_prefix=temp_prefix)
