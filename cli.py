"""The `fusion` command: parses arguments, calls the library, draws progress and tables.

    fusion extract --dataset mvsa-single --root data/MVSA_Single --out caches/mvsa-single.h5
    fusion cache info caches/mvsa-single.h5
    fusion fit --cache caches/mvsa-single.h5 --head self_attn
    fusion grid --cache caches/mvsa-single.h5

Known failures print one line and exit 1; set FUSION_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from fusion.errors import FusionError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multimodal (image + text) sentiment analysis: extract embeddings once, train fusion heads fast.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect embedding caches.")
app.add_typer(cache_app, name="cache")



def _quiet_transformers() -> None:
    """Hide transformers' own progress bars and advisory warnings; ours say what matters."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@app.command()
def extract(
    dataset: str = typer.Option(..., help="Dataset format: memotion, mvsa-single, mvsa-multi, csv, or demo."),
    root: Path = typer.Option(..., help="Dataset folder as downloaded (csv: the CSV file)."),
    out: Optional[Path] = typer.Option(None, help="Cache file to write [default: caches/DATASET.h5]."),
    text_model: str = typer.Option("bert-base-uncased", help="Hugging Face name or local folder."),
    image_model: str = typer.Option("facebook/dinov2-small", help="Hugging Face name or local folder."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 for the encoders."),
    batch_size: int = typer.Option(32, min=1, help="Samples per encoder batch."),
    tokens: bool = typer.Option(False, "--tokens", help="Also store whole token and patch sequences."),
    limit: Optional[int] = typer.Option(None, min=1, help="Keep about N samples (same split proportions)."),
    max_length: int = typer.Option(128, min=8, help="Longest text in tokens."),
    workers: int = typer.Option(max(1, min(8, (os.cpu_count() or 2) // 2)), min=0, help="Image-decoding workers."),
    seed: int = typer.Option(0, help="Seed of the train/val/test split."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off: never run code from data)."),
) -> None:
    """Run the frozen encoders once over a dataset and write the embeddings cache (resumable)."""
    from fusion.console import console, extract_summary_table, progress_bar
    from fusion.extract.distributed import distributed_context
    from fusion.extract.pipeline import ExtractConfig, extract as run_extract

    _quiet_transformers()
    config = ExtractConfig(dataset=dataset, root=root, out=out or Path("caches") / f"{dataset}.h5",
                           text_model=text_model, image_model=image_model, device=device, precision=precision,
                           batch_size=batch_size, tokens=tokens, limit=limit, max_length=max_length,
                           split_seed=seed, workers=workers, trust_remote_code=trust_remote_code)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    with distributed_context() as (rank, world_size):
        with progress_bar(f"extract {dataset}" + (f" rank {rank}" if world_size > 1 else ""), "samples") as update:
            summary = run_extract(config, update, rank=rank, world_size=world_size)
    if rank:
        return
    if summary.already_complete:
        console.print(f"{config.out} is already complete for these settings; nothing to do.")
    console.print(extract_summary_table(summary))
    _print_extract_notes(summary)


def _print_extract_notes(summary) -> None:
    from collections import Counter

    from fusion.console import console

    reasons = Counter(reason for _, _, reason in summary.skipped)
    console.print(f"skipped: {len(summary.skipped)}" + "".join(f"\n  {n} x {r}" for r, n in reasons.most_common()))
    if summary.cleaning:
        console.print("dropped by the dataset's cleaning rule: " +
                      ", ".join(f"{k} {v}" for k, v in summary.cleaning.items()))
    if summary.text_fallbacks:
        console.print("texts not in UTF-8, decoded as: " +
                      ", ".join(f"{k} {v}" for k, v in summary.text_fallbacks.items()))
    console.print(f"computed {summary.rows_computed} of {summary.rows_total} rows in {summary.seconds:.1f} s "
                  f"({summary.samples_per_second:.1f} samples/s)")


@cache_app.command("info")
def cache_info(
    file: Path = typer.Argument(..., help="A cache file (or its .partial folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """What a cache holds: dataset, models, dims, counts per split and class, skipped samples, fingerprint."""
    from fusion.cache.info import cache_info as read_info
    from fusion.console import cache_info_tables, console

    info = read_info(file)
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    for table in cache_info_tables(info):
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (tests call it with an argv list)."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="fusion", standalone_mode=False)
    except FusionError as error:
        if os.environ.get("FUSION_DEBUG") == "1":
            raise
        print(f"fusion: error: {error}", file=sys.stderr)
        return 1
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("fusion: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
