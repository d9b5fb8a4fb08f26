"""What the benchmarks share: their common options, the synthetic inputs several of them build, what several of them
time or read (a grid end to end, the peak matrix-product rate their "of limit" figures divide by, this process's
memory), and the ending every one of them prints.

The ending (finish): a line describing the machine (cores, torch threads, the CPU's bf16 units, what other processes
used during the run: these machines are shared), a line with the date and the exact command, then the benchmark's
figures as one JSON object, always the last line printed.

torch, numpy, PIL and transformers are imported inside the functions that use them: gpu_check imports this module
before its preflight, which must be able to report a missing package instead of failing on an import.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import re
import resource
import shlex
import sys
import time
from pathlib import Path

from fusion.device import ENCODER_PRECISIONS, bf16_units
from fusion.heads.config import loss_label

# The paper's encoders: bert-base-uncased (768-d, max_length 128) and dinov2-small at 224 px (384-d, CLS + 16 x 16
# patches).
TEXT_DIM, IMAGE_DIM = 768, 384
TEXT_LENGTH, PATCHES = 128, 257
MVSA_MULTI = {"train": 13_624, "val": 1_700, "test": 1_700}  # after cleaning, split 8:1:1


# ------------------------------------------------------------------ options


def new_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_threads(parser: argparse.ArgumentParser, default: int | None, help: str | None = None) -> None:
    """--threads: torch's intra-op threads; None leaves torch's own choice."""
    parser.add_argument("--threads", type=int, default=default,
                        help=help or "torch threads" + (" [torch's default]" if default is None else ""))


def use_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_device(parser: argparse.ArgumentParser, default: str, help: str = "cpu, cuda or cuda:N") -> None:
    parser.add_argument("--device", default=default, help=help)


def add_precisions(parser: argparse.ArgumentParser, default: str) -> None:
    """--precisions: the encoders' precisions to measure, comma-separated; the first is the baseline."""
    parser.add_argument("--precisions", type=precision_list, default=precision_list(default),
                        help=f"comma-separated, among {', '.join(ENCODER_PRECISIONS)}; the first is the baseline "
                             f"[{default}]")


def precision_list(text: str) -> list[str]:
    precisions = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in precisions if name not in ENCODER_PRECISIONS]
    if unknown or not precisions:
        raise argparse.ArgumentTypeError(f"{text!r}: give some of {', '.join(ENCODER_PRECISIONS)}, comma-separated")
    return precisions


def add_workdir(parser: argparse.ArgumentParser, default: Path | None = None,
                help: str = "keep models and data here (reused by later runs) [a temporary folder]") -> None:
    parser.add_argument("--workdir", type=Path, default=default, help=help)


def add_repeats(parser: argparse.ArgumentParser, default: int, help: str) -> None:
    parser.add_argument("--repeats", type=int, default=default, help=help)


# ------------------------------------------------------------------ the ending


class OtherLoad:
    """CPU seconds used on the machine by everything but this process tree, over the run (other developers)."""

    def __init__(self):
        self.started, self.busy, self.ours = time.perf_counter(), self._busy(), self._ours()

    @staticmethod
    def _busy() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait

    @staticmethod
    def _ours() -> float:
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    def cores(self) -> float:
        others = (self._busy() - self.busy) - (self._ours() - self.ours)
        return max(0.0, others / (time.perf_counter() - self.started))


def machine_description(other_cores: float) -> str:
    import torch

    return (f"machine: {os.cpu_count()} cpus, torch {torch.__version__} with {torch.get_num_threads()} threads, CPU "
            f"bf16 units: {bf16_units()}; other processes used {other_cores:.2f} cores on average during the run; "
            f"load average now {os.getloadavg()[0]:.2f}")


def finish(summary: dict, *, other_cores: float) -> dict:
    """How every benchmark ends: the machine, the date and the command line, then `summary` as one JSON object on
    the last line. `other_cores`: OtherLoad.cores() at the end of the run."""
    print(machine_description(other_cores))
    print(f"run: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; command: {shlex.join(sys.orig_argv)}")
    print(json.dumps(summary), flush=True)
    return summary


# ------------------------------------------------------------------ grids, features, the peak GEMM rate, memory


def config_name(row_or_config: dict) -> str:
    """A grid row's configuration, or a saved config, as the benchmarks print it: "self_attn lr 0.001 dropout 0.2
    focal2" (the seed left out: rows of several seeds share it)."""
    config = row_or_config.get("config", row_or_config)
    return (f"{config['head']} lr {config['lr']:g} dropout {config['dropout']:g} "
            f"{loss_label(config['loss'], config['gamma'])}")



def timed_grid(features: dict, configs: list, *, prune=None, device="cpu") -> tuple[list[dict], float]:
    """`run_grid` (heads/search/grid.py) into a throwaway folder: its rows, and its seconds end to end."""
    import tempfile

    from fusion.heads.search.grid import run_grid

    with tempfile.TemporaryDirectory() as out:
        synchronize(device)
        started = time.perf_counter()
        rows = run_grid(features, configs, Path(out), prune=prune, device=device)
        synchronize(device)
        return rows, time.perf_counter() - started


def signal_features(sizes: dict[str, int] = MVSA_MULTI, *, text_dim: int = TEXT_DIM, image_dim: int = IMAGE_DIM,
                    separation: float = 1.0, seed: int = 0) -> dict:
    """Pooled features by split. Three equal-prior classes; each modality is N(class mean, I), the means `separation`
    from the origin in random directions, so both modalities carry part of the label (about 0.7 accuracy is
    reachable)."""
    import torch
    import torch.nn.functional as F

    from fusion.heads.features import split_features

    generator = torch.Generator().manual_seed(seed)
    means = [F.normalize(torch.randn(3, dim, generator=generator), dim=1) * separation
             for dim in (text_dim, image_dim)]
    features = {}
    for split, n in sizes.items():
        label = torch.randint(0, 3, (n,), generator=generator)
        text = means[0][label] + torch.randn(n, text_dim, generator=generator)
        image = means[1][label] + torch.randn(n, image_dim, generator=generator)
        features[split] = split_features(text, image, label)
    return features


def synchronize(device) -> None:
    """Waits for a GPU's queued work, so a timer read next measures it; nothing on a CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(dtype, budget: float = 1.0, device="cpu") -> float:
    """Peak FLOP/s of a square torch.mm in `dtype`: the size doubles from 256 until one product takes a fortieth of
    the budget (or 2048), so an emulated precision does not take minutes; then the fastest of the products timed one
    by one over the budget (a shared machine's slow spells lower the mean, not the peak)."""
    import torch

    size = 256
    while True:
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        timed_mm(a, b)
        fastest = timed_mm(a, b)
        if fastest > budget / 40 or size >= 2048:
            break
        size *= 2
    deadline = time.perf_counter() + budget
    while time.perf_counter() < deadline:
        fastest = min(fastest, timed_mm(a, b))
    return 2 * size ** 3 / fastest


def timed_mm(a, b) -> float:
    import torch

    start = time.perf_counter()
    torch.mm(a, b)
    synchronize(a.device)
    return time.perf_counter() - start


def memory_kb(field: str, pid: int | str = "self") -> int:
    """A field of /proc/PID/status (this process by default) in kB: VmRSS (resident now) or VmHWM (the peak). Not
    ru_maxrss, which Linux carries over fork and exec, so a child process would report its parent's peak."""
    return int(re.search(field + r":\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1))


def reset_peak_memory(pid: int | str = "self") -> bool:
    """Sets a process's VmHWM back to its VmRSS (Linux: 5 written to /proc/PID/clear_refs), so the next reading
    of VmHWM is the peak since now. False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ------------------------------------------------------------------ synthetic encoders and posts

VOCAB_SIZE = 30522  # bert-base-uncased
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
COMMON = ("the a an is was are to of and in on for with my this that it so not no very really just love hate "
          "good great bad sad happy today day night game match team city food coffee phone music show movie new "
          "old best worst ever never time people work home weekend trip photo morning amazing awful lol omg rt "
          "can't don't i'm you we they he she what when why how here there now").split()
CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"
PHOTO_SIZE = (640, 480)


@functools.cache
def syllables() -> list[str]:
    return [c + v + e for c in CONSONANTS for v in VOWELS for e in ("", *CONSONANTS)]


def bert_vocab() -> list[str]:
    """Special tokens, characters, common words, syllable words and ##pieces, then [unusedN] up to 30,522,
    so WordPiece does the work it does on real tweets (common words whole, rare ones split)."""
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    pieces = syllables()
    words = COMMON + pieces + [a + b for a in pieces[:60] for b in pieces[:100]]
    vocab = list(dict.fromkeys(SPECIAL + chars + ["##" + c for c in chars] + words + ["##" + p for p in pieces]))
    vocab = vocab[:VOCAB_SIZE]
    return vocab + [f"[unused{i}]" for i in range(VOCAB_SIZE - len(vocab))]


def write_encoders(folder: Path, *, small: bool = False) -> tuple[Path, Path]:
    """Random encoders of the bert-base-uncased and dinov2-small shapes (`small`: two layers each, for a dry run)
    with bert-base's 30,522-entry WordPiece tokenizer and dinov2-small's preprocessing (shortest edge 256, centre crop
    224), saved with save_pretrained so they load through the same path as real names; written once per folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast, Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_bit import BitImageProcessor

    bert, dinov2 = (folder / "bert-small", folder / "dinov2-2-layers") if small else \
        (folder / "bert-base-shape", folder / "dinov2-small-shape")
    if not (bert / "config.json").exists():
        torch.manual_seed(0)
        vocab = bert_vocab()
        BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True).save_pretrained(bert)
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if small \
            else {}
        BertModel(BertConfig(**shape)).save_pretrained(bert)
    if not (dinov2 / "config.json").exists():
        torch.manual_seed(1)
        shape = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=224) if small else \
            dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518)
        Dinov2Model(Dinov2Config(**shape)).save_pretrained(dinov2)
        BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                          resample=3, image_mean=[0.485, 0.456, 0.406],
                          image_std=[0.229, 0.224, 0.225]).save_pretrained(dinov2)
    return bert, dinov2


def tweet(rng, pieces: list[str]) -> str:
    """6-40 words: mostly common words, some rare ones WordPiece must split, a hashtag, a mention, a link."""
    words = []
    for _ in range(int(rng.integers(6, 41))):
        roll = rng.random()
        if roll < 0.6:
            words.append(COMMON[int(rng.integers(len(COMMON)))])
        else:
            words.append("".join(pieces[int(i)] for i in rng.integers(0, len(pieces), int(rng.integers(2, 5)))))
    words.insert(int(rng.integers(len(words))), "#" + words[-1])
    if rng.random() < 0.3:
        words.append(f"@user{int(rng.integers(1000))} http://t.co/{int(rng.integers(1e9)):x}")
    return " ".join(words).capitalize() + "!"


def photo(rng):
    """A smooth random scene with fine noise: compresses and decodes like a photo, not like pure noise."""
    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize(PHOTO_SIZE, Image.BICUBIC), dtype=np.int16)
    noisy = image + rng.integers(-12, 13, image.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_post(data: Path, seed: int, sample: int) -> None:
    import numpy as np

    rng = np.random.default_rng([seed, sample])  # per sample, so the files do not depend on how writing is split
    (data / f"{sample}.txt").write_text(tweet(rng, syllables()), encoding="utf-8")
    photo(rng).save(data / f"{sample}.jpg", "JPEG", quality=90)


def write_mvsa_single(root: Path, n: int, seed: int = 0) -> Path:
    """root/MVSA_Single with n tweet-like texts and 640x480 JPEG photos whose text and image labels agree (none
    dropped by cleaning); written once per root."""
    folder = root / "MVSA_Single"
    if (folder / "labelResultAll.txt").exists():
        return folder
    (folder / "data").mkdir(parents=True, exist_ok=True)
    jobs = [(folder / "data", seed, sample) for sample in range(1, n + 1)]
    with multiprocessing.Pool(max(1, min(16, (os.cpu_count() or 1)))) as pool:
        pool.starmap(write_post, jobs, chunksize=32)
    labels = ("negative", "neutral", "positive")
    lines = ["ID\ttext,image"] + [f"{sample}\t{labels[sample % 3]},{labels[sample % 3]}" for sample in range(1, n + 1)]
    (folder / "labelResultAll.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")  # last: marks it complete
    return folder
