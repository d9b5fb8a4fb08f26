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
                  help="Multimodal (image + text) sentiment analysis: extract embeddings once, "
                       "train fusion heads fast.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect embedding caches.")
app.add_typer(cache_app, name="cache")



STREAM_HELP = "With --tokens: read each minibatch's sequences from the cache instead of loading them."
STREAM_DEFAULT = "stream when loading would take over half the available memory"
PRECISION_HELP = ("fp32, or bf16: matmuls in bf16 under autocast, weights and Adam state in fp32 (a GPU, or a CPU "
                  "with AMX or avx512_bf16). Recorded with the results.")
DEVICE_HELP = "auto (cuda when torch sees one), cpu or cuda."


@app.command()
def extract(
    dataset: str = typer.Option(..., help="Dataset format: memotion, mvsa-single, mvsa-multi, csv, hf, or demo."),
    root: Path = typer.Option(..., help="Dataset folder as downloaded (csv: the CSV file; hf: a save_to_disk folder "
                                        "or Parquet files)."),
    out: Optional[Path] = typer.Option(None, help="Cache file to write.", show_default="caches/DATASET.h5"),
    text_model: str = typer.Option("bert-base-uncased", help="Hugging Face name or local folder."),
    image_model: str = typer.Option("facebook/dinov2-small", help="Hugging Face name or local folder."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 for the encoders."),
    batch_size: int = typer.Option(32, min=1, help="Samples per encoder batch."),
    tokens: bool = typer.Option(False, "--tokens", help="Also store whole token and patch sequences."),
    limit: Optional[int] = typer.Option(None, min=1, help="Keep about N samples (same split proportions)."),
    max_length: int = typer.Option(128, min=8, help="Longest text in tokens."),
    workers: Optional[int] = typer.Option(None, min=0, help="Image-decoding workers of each rank.",
                                          show_default="cores / ranks of the node, less 1 beside a GPU, half on CPU"),
    seed: int = typer.Option(0, help="Seed of the train/val/test split."),
    trust_remote_code: bool = typer.Option(False,
                                           help="Allow model code from the hub (off: never run code from data)."),
    split_file: Optional[Path] = typer.Option(None, help="CSV/TSV of id,split (train/val/test) fixing the splits, "
                                                         "e.g. a published split; rows it does not name are left out."),
    text_pooling: Optional[str] = typer.Option(None, help="cls or mean (over real tokens); projected for CLIP/SigLIP.",
                                               show_default="cls; projected for a dual encoder"),
    image_pooling: Optional[str] = typer.Option(None, help="cls, mean (patch tokens), cls+mean; projected for "
                                                           "CLIP/SigLIP.",
                                                show_default="cls; projected for a dual encoder"),
    columns: Optional[str] = typer.Option(None, help="--dataset hf: ROLE=COLUMN pairs, e.g. "
                                                     "image=img,text=caption,label=sentiment[,id=post_id].",
                                          show_default="image,text,label"),
) -> None:
    """Run the frozen encoders once over a dataset and write the embeddings cache (resumable)."""
    from fusion.app.console import console, extract_summary_table, progress_bar
    from fusion.extract.distributed import distributed_context
    from fusion.extract.encoders import quiet_transformers
    from fusion.extract.pipeline import ExtractConfig, extract as run_extract

    quiet_transformers()
    config = ExtractConfig(dataset=dataset, root=root, out=out or Path("caches") / f"{dataset}.h5",
                           text_model=text_model, image_model=image_model, device=device, precision=precision,
                           batch_size=batch_size, tokens=tokens, limit=limit, max_length=max_length,
                           split_seed=seed, workers=workers, trust_remote_code=trust_remote_code,
                           split_file=split_file, text_pooling=text_pooling, image_pooling=image_pooling,
                           columns=columns)
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

    from fusion.app.console import console

    if summary.split_source:
        console.print(f"splits: {summary.split_source['split_source']}")
    if summary.split_counts:
        console.print(f"split file: {summary.split_counts['ids_in_file_not_in_data']} ids not in the data, "
                      f"{summary.split_counts['rows_in_data_not_in_file']} data rows not in the file (left out)")
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
    for note in summary.notes:
        print(f"fusion: note: {note}", file=sys.stderr)


@cache_app.command("info")
def cache_info(
    file: Path = typer.Argument(..., help="A cache file (or its .partial folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    verify: bool = typer.Option(False, "--verify", help="Also read every byte and check every chunk's checksum."),
) -> None:
    """What a cache holds: dataset, models, dims, counts per split and class, skipped samples, fingerprint."""
    from fusion.cache.info import cache_info as read_info, verify_cache
    from fusion.app.console import cache_info_tables, console

    info = read_info(file)
    if verify:
        info["verified"] = verify_cache(file)
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        for table in cache_info_tables(info):
            console.print(table)
    damaged = info.get("verified", {}).get("damaged")
    if damaged:
        for name, reason in damaged.items():
            print(f"fusion: {file}: {name}: {reason}", file=sys.stderr)
        raise typer.Exit(1)
    if verify and not as_json:
        checked = info["verified"]
        console.print(f"verified: {checked['datasets']} datasets, {checked['bytes'] / 2**20:.1f} MiB read, every "
                      f"checksum matches")


def _split_list(value: str, cast=str) -> list:
    try:
        return [cast(item.strip()) for item in value.split(",") if item.strip()]
    except ValueError:
        raise FusionError(f"cannot read the list {value!r}: expected comma-separated values") from None


@app.command()
def fit(
    cache: Path = typer.Option(..., help="Cache file written by `fusion extract`."),
    head: str = typer.Option("self_attn", help="basic, self_attn, dual_attn, text_only or image_only."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    dropout: float = typer.Option(0.2, help="Dropout rate of the fusion and classifier."),
    loss: str = typer.Option("focal", help="ce or focal."),
    gamma: float = typer.Option(2.0, help="Focal loss gamma."),
    epochs: int = typer.Option(30, min=1, help="Maximum epochs (early stopping on validation)."),
    patience: int = typer.Option(5, min=1, help="Epochs without improvement before stopping."),
    batch_size: int = typer.Option(256, min=1, help="Minibatch size."),
    metric: Optional[str] = typer.Option(None, help="Validation metric: macro_f1, weighted_f1 or accuracy.",
                                         show_default="the dataset's own: macro F1 for Memotion, weighted F1 for MVSA"),
    seed: int = typer.Option(0, help="Seed of initialisation, shuffling and dropout."),
    tokens: bool = typer.Option(False, "--tokens", help="Train on token sequences (needs a --tokens cache)."),
    stream: Optional[bool] = typer.Option(None, "--stream/--in-memory", help=STREAM_HELP,
                                         show_default=STREAM_DEFAULT),
    out: Optional[Path] = typer.Option(None, help="Run directory.", show_default="runs/CACHE-HEAD"),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Train one fusion head on a cache; writes config.json, metrics.json and head.safetensors."""
    from fusion.app.console import console, epoch_progress, metrics_table
    from fusion.heads.checkpoint import save_run
    from fusion.heads.config import FitConfig
    from fusion.heads.registry import pooled_dual_attn_note
    from fusion.heads.device import training_device
    from fusion.heads.runs import default_metric
    from fusion.heads.train import train_head

    target = training_device(device, precision)
    features, meta = _load_features(cache, tokens, stream)
    if note := pooled_dual_attn_note([head], tokens):
        console.print(f"note: {note}", soft_wrap=True)
    config = FitConfig(head=head, lr=lr, dropout=dropout, loss=loss, gamma=gamma, epochs=epochs, patience=patience,
                       batch_size=batch_size, metric=metric or default_metric(meta["dataset"]), seed=seed,
                       precision=precision)
    with epoch_progress(f"fit {head}", config.epochs) as on_epoch:
        result = train_head(features, config, on_epoch=on_epoch, device=target)
    run_dir = out or Path("runs") / f"{Path(cache).stem}-{head}"
    save_run(run_dir, result, cache=meta, tokens=tokens)
    console.print(metrics_table(f"{head} on {meta['dataset']} (best epoch {result.best_epoch} of "
                                f"{result.epochs_run}, selected on val {config.metric})",
                                {"val": result.val, "test": result.test}))
    console.print(f"run written to {run_dir}")


@app.command()
def grid(
    cache: list[Path] = typer.Option(..., help="Cache file written by `fusion extract`; repeat it to sweep encoders "
                                               "(the same grid on each cache of one dataset, compared on its test "
                                               "rows)."),
    heads: str = typer.Option("basic,self_attn,dual_attn", help="Heads (add text_only,image_only for ablations)."),
    lrs: str = typer.Option("1e-2,1e-3,1e-4,1e-5", help="Learning rates."),
    dropouts: str = typer.Option("0,0.2,0.5", help="Dropout rates."),
    losses: str = typer.Option("ce,focal2,focal3,focal4", help="ce and focalGAMMA."),
    seeds: int = typer.Option(1, min=1, help="Seeds per configuration (mean and std are reported)."),
    epochs: int = typer.Option(30, min=1, help="Maximum epochs per configuration."),
    patience: int = typer.Option(5, min=1, help="Early-stopping patience."),
    batch_size: int = typer.Option(256, min=1, help="Minibatch size."),
    metric: Optional[str] = typer.Option(None, help="Selection metric on validation.",
                                         show_default="the dataset's own"),
    out: Optional[Path] = typer.Option(None, help="Grid directory (a sweep: one grid directory per cache in it).",
                                       show_default="runs/CACHE-grid, runs/CACHE-sweep for several"),
    storage: Optional[str] = typer.Option(None, help="Optuna storage (journal:PATH or a database URL) shared by "
                                                     "several machines."),
    study: str = typer.Option("fusion-grid", help="Optuna study name (with --storage)."),
    sampler: str = typer.Option("grid", help="With --storage: grid (the whole grid) or tpe (sampled)."),
    trials: Optional[int] = typer.Option(None, min=1, help="With --sampler tpe: trials in this process."),
    tokens: bool = typer.Option(False, "--tokens", help="Train on token sequences (needs a --tokens cache)."),
    stream: Optional[bool] = typer.Option(None, "--stream/--in-memory", help=STREAM_HELP,
                                         show_default=STREAM_DEFAULT),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    prune: bool = typer.Option(False, "--prune", help="Successive halving inside each head's pass: at epochs 2, 6, "
                                                      "18 keep the best third still training (not the paper's "
                                                      "protocol; pruned rows are kept and marked)."),
) -> None:
    """Train the paper's hyper-parameter grid (144 configurations by default); resumable."""
    from fusion.heads.config import FitConfig
    from fusion.heads.device import training_device
    from fusion.heads.grid import grid_configs
    from fusion.app.grid_command import run_grid_command
    from fusion.heads.runs import default_metric

    target = training_device(device, precision)

    def configs_for(meta: dict) -> list:
        base = FitConfig(epochs=epochs, patience=patience, batch_size=batch_size,
                         metric=metric or default_metric(meta["dataset"]), precision=precision)
        return grid_configs(base, heads=_split_list(heads), lrs=_split_list(lrs, float),
                            dropouts=_split_list(dropouts, float), losses=_split_list(losses), seeds=range(seeds))

    if len(cache) > 1:
        from fusion.app.sweep_command import run_sweep_command

        run_sweep_command(cache, configs_for, out or Path("runs") / f"{Path(cache[0]).stem}-sweep",
                          load=lambda path: _load_features(path, tokens, stream), tokens=tokens, storage=storage,
                          device=target, prune=prune)
        return
    features, meta = _load_features(cache[0], tokens, stream)
    run_grid_command(features, meta, configs_for(meta), out or Path("runs") / f"{Path(cache[0]).stem}-grid",
                     storage=storage, study=study, sampler=sampler, trials=trials, tokens=tokens, device=target,
                     prune=prune)


def _load_features(cache: Path, tokens: bool, stream: Optional[bool]):
    from fusion.app.console import console
    from fusion.heads.runs import load_features, should_stream

    if stream and not tokens:
        raise FusionError("--stream applies to token sequences (add --tokens); pooled features are always loaded, "
                          "they take tens of MB")
    if tokens and stream is None:
        stream, needed, available = should_stream(cache)
        if stream:
            console.print(f"loading the token sequences would take {needed / 2**30:.1f} GiB, over half of the "
                          f"{available / 2**30:.1f} GiB available: each minibatch is read from the cache")
    return load_features(cache, tokens=tokens, stream=bool(stream))


@app.command()
def predict(
    run: Path = typer.Option(..., help="Run directory written by `fusion fit` (or a grid's best/)."),
    image: Optional[Path] = typer.Option(None, help="Image of one post."),
    text: Optional[str] = typer.Option(None, help="Text of one post."),
    csv: Optional[Path] = typer.Option(None, help="CSV with columns image,text."),
    device: str = typer.Option("auto", help="auto, cpu or cuda: the encoders and the head."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
) -> None:
    """Label new posts with a trained run: its encoders, then its head."""
    from fusion.app.console import console, predictions_table
    from fusion.heads.checkpoint import load_run
    from fusion.app.predict import Post, posts_from_csv, predict_posts, require_inputs, run_encoders

    require_inputs(image, text, csv)
    from fusion.extract.encoders import quiet_transformers

    loaded = load_run(run)
    quiet_transformers()
    encoders = run_encoders(loaded.cache, device=device)
    from fusion.app.predict import encoder_precision

    precision_note = encoder_precision(loaded.cache, device)[1]
    if precision_note:
        print(f"fusion: note: {precision_note}", file=sys.stderr)
    posts = posts_from_csv(csv) if csv else [Post(image=image, text=text)]
    predictions = predict_posts(loaded.head, encoders, posts, max_length=int(loaded.cache.get("max_length", 128)),
                                tokens=loaded.tokens)
    if as_json:
        for p in predictions:
            print(json.dumps({"image": str(p.post.image), "row": p.post.row, "label": p.label,
                              "probabilities": p.probabilities, "error": p.error}))
    else:
        console.print(predictions_table(predictions))
    failed = [p for p in predictions if p.error]
    if failed:
        print(f"fusion: {len(failed)} of {len(predictions)} posts could not be read", file=sys.stderr)
    if predictions and len(failed) == len(predictions):
        raise typer.Exit(1)  # nothing was predicted: a script must not take this for success


@app.command()
def serve(
    run: Path = typer.Option(..., help="Run directory written by `fusion fit` (or a grid's best/)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 answers anyone who can reach this "
                                               "machine (see README)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    device: str = typer.Option("auto", help="auto, cpu, cuda."),
    precision: Optional[str] = typer.Option(None, help="fp32 or bf16 (fp16 on a GPU) for the encoders.",
                                            show_default="the run's cache precision"),
    max_upload_mb: float = typer.Option(20.0, min=0.001, help="Largest request body accepted, in MB."),
) -> None:
    """Serve a trained run over HTTP: POST /predict, POST /predict/batch, GET /health, and a page at /."""
    from fusion.app.console import console
    from fusion.app.serve_model import ServedModel

    try:
        from fusion.app.serve import serve_forever
    except ImportError as missing:
        raise FusionError(f"fusion serve needs {missing.name}: pip install 'fusion[serve]'") from None
    from fusion.extract.encoders import quiet_transformers

    quiet_transformers()
    model = ServedModel.load(run, device=device, precision=precision)
    about = model.describe()
    console.print(f"serving run {about['run']} ({about['head']}; {about['text_model']} + {about['image_model']}, "
                  f"{about['device']} {about['precision']}) on http://{host}:{port}/ - Ctrl+C stops")
    serve_forever(model, host=host, port=port, max_upload_mb=max_upload_mb)


@app.command()
def report(run: Path = typer.Option(..., help="A run directory or a grid directory.")) -> None:
    """Write figures (per-class F1 by epoch, losses, confusion matrix, grid heatmaps) and report.md."""
    from fusion.app.console import console
    from fusion.app.report import write_report

    written = write_report(run)
    console.print(f"report: {written.markdown}")
    for figure in written.figures:
        console.print(f"  figure: {figure}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Where the demo writes its data, cache and runs."),
    text_model: Optional[str] = typer.Option(None, help="Text encoder.", show_default="the all-MiniLM-L6-v2 package"),
    image_model: Optional[str] = typer.Option(None, help="Image encoder.", show_default="a small random DINOv2"),
    size: int = typer.Option(1500, min=50, help="Synthetic pairs to generate."),
    epochs: int = typer.Option(15, min=1, help="Maximum epochs per grid configuration."),
) -> None:
    """The whole job offline on an embedded synthetic dataset: extract, grid, report."""
    from fusion.app.console import console
    from fusion.app.demo import demo_steps
    from fusion.extract.encoders import quiet_transformers

    quiet_transformers()
    for argv in demo_steps(out, text_model=text_model, image_model=image_model, size=size, epochs=epochs):
        console.rule(f"fusion {argv[0]}")
        code = main(argv)
        if code:
            raise typer.Exit(code)  # the step's own error is printed above
    console.print(f"\nreport: {out / 'grid' / 'report.md'} (figures beside it)")


@app.command()
def reproduce(
    data: Path = typer.Option(..., help="Folder holding MVSA_Single/, MVSA/ (or MVSA_Multi/), memotion_dataset_7k/."),
    out: Path = typer.Option(Path("reproduction"), help="Where caches, grids, reproduction.md and figures go."),
    seeds: int = typer.Option(3, min=1, help="Seeds per configuration."),
    text_model: str = typer.Option("bert-base-uncased", help="Hugging Face name or local folder."),
    image_model: str = typer.Option("facebook/dinov2-small", help="Hugging Face name or local folder."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (extraction)."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 for the encoders."),
    workers: int = typer.Option(max(1, min(8, (os.cpu_count() or 2) // 2)), min=0, help="Image-decoding workers."),
    heads: str = typer.Option("basic,self_attn,dual_attn,text_only,image_only", help="Heads and ablations."),
    lrs: str = typer.Option("1e-2,1e-3,1e-4,1e-5", help="Learning rates."),
    dropouts: str = typer.Option("0,0.2,0.5", help="Dropout rates."),
    losses: str = typer.Option("ce,focal2,focal3,focal4", help="ce and focalGAMMA."),
    epochs: int = typer.Option(30, min=1, help="Maximum epochs per configuration."),
    patience: int = typer.Option(5, min=1, help="Early-stopping patience."),
    resamples: int = typer.Option(2000, min=100, help="Bootstrap resamples for the intervals."),
) -> None:
    """The paper's study in one command: extract each dataset found, train the grid and ablations with several seeds,
    write reproduction.md with intervals beside the published numbers (resumable)."""
    from fusion.app.console import console, progress_bar
    from fusion.app.reproduce import ReproduceConfig, reproduce as run_reproduce
    from fusion.app.reproduction import write_reproduction
    from fusion.extract.encoders import quiet_transformers

    quiet_transformers()
    config = ReproduceConfig(data=data, out=out, seeds=seeds, text_model=text_model, image_model=image_model,
                             device=device, precision=precision, workers=workers, heads=tuple(_split_list(heads)),
                             lrs=tuple(_split_list(lrs, float)), dropouts=tuple(_split_list(dropouts, float)),
                             losses=tuple(_split_list(losses)), epochs=epochs, patience=patience, resamples=resamples)
    reproduction = run_reproduce(config, progress_bar)
    markdown, figures = write_reproduction(reproduction)
    for name, why in reproduction.skipped.items():
        console.print(f"skipped {name}: {why}")
    console.print(f"reproduction: {markdown} ({len(figures)} figures)")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (tests call it with an argv list)."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="fusion", standalone_mode=False)
    except FusionError as error:
        if os.environ.get("FUSION_DEBUG") == "1":
            raise
        print(f"fusion: error: {error}", file=sys.stderr)
        return 1
    except (typer.Abort, KeyboardInterrupt):
        print("fusion: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as error:
        if not _is_usage_error(error):
            raise
        error.show()  # usage line, "Try 'fusion ... --help'", the message (with click's "Did you mean")
        return error.exit_code
    # Without standalone mode click returns a typer.Exit's code instead of raising it (commands return None).
    return code if isinstance(code, int) else 0


def _is_usage_error(error: Exception) -> bool:
    """A click error that knows how to show itself: unknown option or command, bad value, missing value. Checked by
    shape, not class: newer typer releases vendor click (typer._click), whose exceptions are not click's."""
    return isinstance(error, click.ClickException) or (callable(getattr(error, "show", None))
                                                       and isinstance(getattr(error, "exit_code", None), int))


if __name__ == "__main__":
    sys.exit(main())
