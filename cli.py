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

import fusion
from fusion import paper
from fusion.app.serve.limits import ServeLimits, allowed_hosts
from fusion.errors import FusionError, install_extra
from fusion.heads.config import FitConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multimodal (image + text) sentiment analysis: extract embeddings once, "
                       "train fusion heads fast.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect embedding caches.")
app.add_typer(cache_app, name="cache")


def _print_version(asked: bool) -> None:
    if asked:
        print(f"fusion {fusion.__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print fusion's version and exit.")) -> None:
    """Multimodal (image + text) sentiment analysis: extract embeddings once, train fusion heads fast."""



STREAM_HELP = "With --tokens: read each minibatch's sequences from the cache instead of loading them."
STREAM_DEFAULT = "stream when loading would take over half the available memory"
PRECISION_HELP = ("fp32, or bf16: products and activations in bf16, weights and Adam state in fp32 (a GPU, or a CPU "
                  "with AMX or avx512_bf16). Recorded with the results.")
DEVICE_HELP = "auto (cuda when torch sees one), cpu or cuda."
SERVE = ServeLimits()  # fusion serve's defaults (app/serve/limits.py)


@app.command()
def extract(
    dataset: str = typer.Option(..., help="Dataset format: memotion, mvsa-single, mvsa-multi, csv, hf, or demo."),
    root: Path = typer.Option(..., help="Dataset folder as downloaded (csv: the CSV file; hf: a save_to_disk folder "
                                        "or Parquet files)."),
    out: Optional[Path] = typer.Option(None, help="Cache file to write.", show_default="caches/DATASET.h5"),
    text_model: str = typer.Option(paper.TEXT_MODEL, help="Hugging Face name or local folder."),
    image_model: str = typer.Option(paper.IMAGE_MODEL, help="Hugging Face name or local folder."),
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
    dedupe: bool = typer.Option(False, "--dedupe", help="Drop val and test posts whose normalised text or image "
                                                        "pixels duplicate a training post (off: the paper's way)."),
) -> None:
    """Run the frozen encoders once over a dataset and write the embeddings cache (resumable)."""
    from fusion.app.console import console, extract_notes, extract_summary_table, progress_bar

    cache = fusion.extract(dataset=dataset, root=root, out=out, text_model=text_model, image_model=image_model,
                           tokens=tokens, device=device, precision=precision, split_file=split_file, columns=columns,
                           text_pooling=text_pooling, image_pooling=image_pooling, batch_size=batch_size,
                           limit=limit, max_length=max_length, workers=workers, seed=seed,
                           trust_remote_code=trust_remote_code, dedupe=dedupe, progress=progress_bar)
    summary = cache.extraction
    if summary.rank:
        return
    if summary.already_complete:
        console.print(f"{cache.path} is already complete for these settings; nothing to do.")
    console.print(extract_summary_table(summary))
    for line in extract_notes(summary):
        console.print(line)
    for note in summary.notes:
        print(f"fusion: note: {note}", file=sys.stderr)


@cache_app.command("info")
def cache_info(
    file: Path = typer.Argument(..., help="A cache file (or its .partial folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    verify: bool = typer.Option(False, "--verify", help="Also read every byte and check every chunk's checksum."),
) -> None:
    """What a cache holds: dataset, models, dims, counts per split and class, skipped samples, fingerprint."""
    from fusion.app.console import cache_info_tables, console

    cache = fusion.open_cache(file)
    info = {**cache.info, "verified": cache.verify()} if verify else cache.info
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


def _split_file_pairs(values: list[str]) -> list[tuple[str, Path]]:
    """`--split-file NAME=PATH` values as (NAME, PATH); a malformed, unknown or repeated NAME is a usage error."""
    pairs: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise typer.BadParameter(f"{value!r}: expected NAME=PATH, e.g. mvsa-single=splits/clmlf.tsv")
        if name not in paper.DATASETS:
            raise typer.BadParameter(f"{name!r} is not one of {', '.join(paper.DATASETS)}")
        if name in pairs:
            raise typer.BadParameter(f"{name} is given twice")
        pairs[name] = Path(path.strip())
    return list(pairs.items())


@app.command()
def fit(
    cache: Path = typer.Option(..., help="Cache file written by `fusion extract`."),
    head: str = typer.Option(FitConfig.head, help="basic, self_attn, dual_attn, text_only or image_only."),
    lr: float = typer.Option(FitConfig.lr, help="Adam learning rate."),
    dropout: float = typer.Option(FitConfig.dropout, help="Dropout rate of the fusion and classifier."),
    loss: str = typer.Option(FitConfig.loss, help="ce or focal."),
    gamma: float = typer.Option(FitConfig.gamma, help="Focal loss gamma."),
    epochs: int = typer.Option(FitConfig.epochs, min=1, help="Maximum epochs (early stopping on validation)."),
    patience: int = typer.Option(FitConfig.patience, min=1, help="Epochs without improvement before stopping."),
    batch_size: int = typer.Option(FitConfig.batch_size, min=1, help="Minibatch size."),
    metric: Optional[str] = typer.Option(None, help="Validation metric: macro_f1, weighted_f1 or accuracy.",
                                         show_default="the dataset's own: macro F1 for Memotion, weighted F1 for MVSA"),
    seed: int = typer.Option(FitConfig.seed, help="Seed of initialisation, shuffling and dropout."),
    tokens: bool = typer.Option(False, "--tokens", help="Train on token sequences (needs a --tokens cache)."),
    stream: Optional[bool] = typer.Option(None, "--stream/--in-memory", help=STREAM_HELP,
                                         show_default=STREAM_DEFAULT),
    out: Optional[Path] = typer.Option(None, help="Run directory.", show_default="runs/CACHE-HEAD"),
    precision: str = typer.Option(FitConfig.precision, help=PRECISION_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Train one fusion head on a cache; writes config.json, metrics.json and head.safetensors."""
    from fusion.app.console import console, metrics_table, progress_bar

    run = fusion.fit(cache, head=head, lr=lr, dropout=dropout, loss=loss, gamma=gamma, epochs=epochs,
                     patience=patience, seed=seed, batch_size=batch_size, metric=metric, tokens=tokens, stream=stream,
                     precision=precision, device=device, out=out, progress=progress_bar)
    for note in run.notes:
        console.print(f"note: {note}", soft_wrap=True)
    metrics = run.metrics
    console.print(metrics_table(f"{head} on {run.config['cache']['dataset']} (best epoch {metrics['best_epoch']} of "
                                f"{metrics['epochs_run']}, selected on val {run.config['metric']})",
                                {"val": metrics["val"], "test": metrics["test"]}))
    console.print(f"run written to {run.path}")


@app.command()
def grid(
    cache: list[Path] = typer.Option(..., help="Cache file written by `fusion extract`; repeat it to sweep encoders "
                                               "(the same grid on each cache of one dataset, compared on its test "
                                               "rows)."),
    heads: str = typer.Option(",".join(paper.HEADS), help="Heads (add text_only,image_only for ablations)."),
    lrs: str = typer.Option(",".join(f"{lr:g}" for lr in paper.LRS), help="Learning rates."),
    dropouts: str = typer.Option(",".join(f"{d:g}" for d in paper.DROPOUTS), help="Dropout rates."),
    losses: str = typer.Option(",".join(paper.LOSSES), help="ce and focalGAMMA."),
    seeds: int = typer.Option(1, min=1, help="Seeds per configuration (mean and std are reported)."),
    epochs: int = typer.Option(FitConfig.epochs, min=1, help="Maximum epochs per configuration."),
    patience: int = typer.Option(FitConfig.patience, min=1, help="Early-stopping patience."),
    batch_size: int = typer.Option(FitConfig.batch_size, min=1, help="Minibatch size."),
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
    precision: str = typer.Option(FitConfig.precision, help=PRECISION_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    prune: bool = typer.Option(False, "--prune", help="Successive halving inside each head's pass: at epochs 2, 6, "
                                                      "18 keep the best third still training (not the paper's "
                                                      "protocol; pruned rows are kept and marked)."),
) -> None:
    """Train the paper's hyper-parameter grid (144 configurations by default); resumable."""
    from fusion.app.console import console, grid_tables, progress_bar, sweep_table

    choices = dict(heads=_split_list(heads), lrs=_split_list(lrs, float), dropouts=_split_list(dropouts, float),
                   losses=_split_list(losses), seeds=seeds, epochs=epochs, patience=patience, batch_size=batch_size,
                   metric=metric, prune=prune, tokens=tokens, stream=stream, precision=precision, device=device,
                   out=out, progress=progress_bar)
    if len(cache) > 1:
        if storage:
            raise FusionError("--storage shares one cache's grid between machines; a sweep (several --cache) runs "
                              "here")
        swept = fusion.sweep(cache, **choices)
        console.print(sweep_table(swept.document))
        console.print(f"sweep: {swept.path / 'sweep.json'}, {swept.markdown}, {swept.figure}")
        return
    result = fusion.grid(cache[0], storage=storage, study=study, sampler=sampler, trials=trials, **choices)
    for note in result.notes:
        console.print(f"note: {note}", soft_wrap=True)
    for table in grid_tables(result.summaries, result.metric):
        console.print(table)
    console.print(f"{len(result.rows)} results in {result.path / 'results.csv'}; the configuration chosen on "
                  f"validation is in {result.best.path}")


@app.command()
def predict(
    run: Path = typer.Option(..., help="Run directory written by `fusion fit` (or a grid's best/)."),
    image: Optional[Path] = typer.Option(None, help="Image of one post."),
    text: Optional[str] = typer.Option(None, help="Text of one post."),
    csv: Optional[Path] = typer.Option(None, help="CSV with columns image,text."),
    device: str = typer.Option("auto", help="auto, cpu or cuda: the encoders and the head."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line per post instead of a table."),
    explain: bool = typer.Option(False, "--explain", help="Also what the text and the image say alone, and for a "
                                 "dual_attn --tokens run where its attention went (docs/explain.md)."),
    raw: bool = typer.Option(False, "--raw", help="The head's own probabilities, not the calibrated ones."),
    out: Optional[Path] = typer.Option(None, help="With --explain: write NAME.explain.png for each post here."),
) -> None:
    """Label new posts with a trained run: its encoders, then its head (exit 1 if any post failed)."""
    from fusion.app.api import read_posts
    from fusion.app.console import calibration_caption, console, predictions_table

    if csv is None and (image is None or text is None):
        raise FusionError("give --image and --text for one post, or --csv FILE with columns image,text")
    if csv is not None and (image is not None or text is not None):
        raise FusionError("give either --csv or --image/--text, not both")
    if csv is None and not image.is_file():
        raise FusionError(f"--image {image}: no such file")
    if out is not None and not explain:
        raise FusionError("--out writes the explanation figures: add --explain")
    images, texts, lines = read_posts(csv) if csv else ([image], [text], [None])
    predictor = fusion.load_run(run, device=device)
    for note in predictor.notes:
        print(f"fusion: note: {note}", file=sys.stderr)
    answers = predictor.predict(images, texts, explain=explain, raw=raw)
    if as_json:
        for answer in answers:
            print(json.dumps(answer))
    else:
        console.print(predictions_table(images, lines, answers, caption=calibration_caption(predictor.describe(), raw)))
    if out is not None:
        from fusion.app.reporting.explanation import write_explanation_pngs

        for path in write_explanation_pngs(out, images, texts, lines, answers):
            print(f"fusion: wrote {path}", file=sys.stderr)
    failed = [(line, answer["error"]) for line, answer in zip(lines, answers) if "error" in answer]
    for line, error in failed:
        print(f"fusion: {'' if line is None else f'{csv}: line {line}: '}{error}", file=sys.stderr)
    if failed:
        print(f"fusion: {len(failed)} of {len(answers)} posts could not be read", file=sys.stderr)
        raise typer.Exit(1)


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
    max_pixels: int = typer.Option(SERVE.max_pixels, min=1, help="Largest image accepted, in pixels (refused from "
                                                                 "its header, before decoding)."),
    max_text_chars: int = typer.Option(SERVE.max_text_chars, min=1, help="Longest text accepted, in characters."),
    max_queue: int = typer.Option(SERVE.max_queue, min=1, help="Prediction requests inside the server at once; more "
                                                               "are answered 503 with Retry-After."),
    timeout: float = typer.Option(SERVE.timeout_s, min=0.1, help="Seconds for a prediction request, upload "
                                                                 "included; later: 504. Also the shutdown's bound."),
    allow_host: list[str] = typer.Option([], help="Another name clients reach the server by (its Host header); "
                                                  "repeatable; '*' answers any. Default: the bound address and "
                                                  "localhost."),
) -> None:
    """Serve a trained run over HTTP: POST /predict, POST /predict/batch, GET /health, GET /ready, a page at /."""
    from importlib.util import find_spec

    from fusion.app.console import console

    missing = [name for name in ("fastapi", "uvicorn", "multipart") if find_spec(name) is None]
    if missing:
        raise FusionError(f"fusion serve needs {', '.join(missing)}: {install_extra('serve')}")
    predictor = fusion.load_run(run, device=device, precision=precision)
    from fusion.app.serve.server import serve_forever

    for note in predictor.notes:
        print(f"fusion: note: {note}", file=sys.stderr)
    limits = ServeLimits(max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels,
                         max_text_chars=max_text_chars, max_queue=max_queue, timeout_s=timeout,
                         allowed_hosts=allowed_hosts(host, allow_host))
    about = predictor.describe()
    console.print(f"serving run {about['run']} ({about['head']}; {about['text_model']} + {about['image_model']}, "
                  f"{about['device']} {about['precision']}) on http://{host}:{port}/ - Ctrl+C stops")
    if host in ("0.0.0.0", "::") and not allow_host:
        print(f"fusion: note: listening on {host}, but answering only requests addressed to localhost: add "
              "--allow-host NAME for the name or address other machines use (or --allow-host '*')", file=sys.stderr)
    serve_forever(predictor, host=host, port=port, limits=limits)


@app.command()
def report(run: Path = typer.Option(..., help="A run directory or a grid directory.")) -> None:
    """Write figures (per-class F1 by epoch, losses, confusion matrix, grid heatmaps) and report.md."""
    from fusion.app.console import console

    written = fusion.report(run)
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
    from fusion.app.demo import demo_steps, next_steps

    about, steps = demo_steps(out, text_model=text_model, image_model=image_model, size=size, epochs=epochs)
    console.print(about)
    for argv in steps:
        console.rule(f"fusion {argv[0]}")
        code = main(argv)
        if code:
            raise typer.Exit(code)  # the step's own error is printed above
    console.print(f"\nreport: {out / 'grid' / 'report.md'} (figures beside it)")
    console.print("\nnext steps, on what the demo wrote (after `. .venv/bin/activate`, or with .venv/bin/fusion); "
                  "the last one runs the MVSA workflow on the demo's MVSA-format folder with its encoders:")
    for step in next_steps(out, text_model, image_model):
        console.print(f"  {step}", soft_wrap=True, markup=False, highlight=False)


@app.command()
def reproduce(
    data: Path = typer.Option(..., help="Folder holding MVSA_Single/, MVSA/ (or MVSA_Multi/), memotion_dataset_7k/."),
    out: Path = typer.Option(Path("reproduction"), help="Where caches, grids, reproduction.md and figures go."),
    seeds: int = typer.Option(3, min=1, help="Seeds per configuration."),
    text_model: str = typer.Option(paper.TEXT_MODEL, help="Hugging Face name or local folder."),
    image_model: str = typer.Option(paper.IMAGE_MODEL, help="Hugging Face name or local folder."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (extraction)."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 for the encoders."),
    workers: int = typer.Option(max(1, min(8, (os.cpu_count() or 2) // 2)), min=0, help="Image-decoding workers."),
    heads: str = typer.Option(",".join(paper.HEADS + paper.ABLATIONS), help="Heads and ablations."),
    lrs: str = typer.Option(",".join(f"{lr:g}" for lr in paper.LRS), help="Learning rates."),
    dropouts: str = typer.Option(",".join(f"{d:g}" for d in paper.DROPOUTS), help="Dropout rates."),
    losses: str = typer.Option(",".join(paper.LOSSES), help="ce and focalGAMMA."),
    epochs: int = typer.Option(FitConfig.epochs, min=1, help="Maximum epochs per configuration."),
    patience: int = typer.Option(FitConfig.patience, min=1, help="Early-stopping patience."),
    resamples: int = typer.Option(2000, min=100, help="Bootstrap resamples for the intervals."),
    tokens: bool = typer.Option(False, "--tokens", help="Also extract token sequences and train dual_attn on them "
                                "(real attention) beside the pooled heads."),
    split_file: list[str] = typer.Option([], help="NAME=PATH, repeatable: an id,split file fixing the split of "
                                         f"NAME ({', '.join(paper.DATASETS)}), e.g. a published split.",
                                         callback=_split_file_pairs),
    dedupe: bool = typer.Option(False, "--dedupe", help="Drop validation and test posts that duplicate a training "
                                "post (text or pixels). Off: the paper's protocol."),
) -> None:
    """The paper's study in one command: extract each dataset found, train the grid and ablations with several seeds,
    write reproduction.md with intervals beside the published numbers (resumable)."""
    from fusion.app.console import console, progress_bar

    result = fusion.reproduce(data=data, out=out, seeds=seeds, text_model=text_model, image_model=image_model,
                              device=device, precision=precision, workers=workers, heads=_split_list(heads),
                              lrs=_split_list(lrs, float), dropouts=_split_list(dropouts, float),
                              losses=_split_list(losses), epochs=epochs, patience=patience, resamples=resamples,
                              tokens=tokens, split_files=dict(split_file), dedupe=dedupe, progress=progress_bar)
    for name, why in result.skipped.items():
        console.print(f"skipped {name}: {why}")
    console.print(f"reproduction: {result.markdown} ({len(result.figures)} figures)")


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
