"""Serving under load: `fusion serve` (a child process, the real command, its default limits) on loopback, driven by
1, 16, 64 and 256 concurrent clients, then by 24 concurrent uploads of a flat 8000 x 8000 PNG; every answer counted,
and the server's peak resident memory in each case.

    .venv/bin/python -m fusion.benchmarks.serve_load         # the demo's encoders; a few minutes on 2 busy cores
    .venv/bin/python -m fusion.benchmarks.serve_load --clients 1,16 --requests 2 --big 2    # a quick look

Encoders, data and run: serve_speed's (the demo's all-MiniLM-L6-v2 and small random DINOv2, a self_attn head fitted
on the demo's posts). Loopback only, and nothing runs unbounded: each client sends a fixed number of requests, each
request has a client-side limit, and each case a wall-clock limit after which what is left counts as unanswered.

Per case (`clients` concurrent clients, each sending `--requests` posts one after another; a client answered 503
waits the Retry-After the server gave before its next post, as a well-behaved client does):
- posts_per_s: answers 200 per second of the case; p50/p95/p99_ms: latency of the answers 200;
- answered_503: refused for the queue bound; answered_504: past the server's --timeout; non_503_5xx: those 504s and
  any other 5xx (must be 0); unanswered: no HTTP answer within the client's limit, or a broken connection (must be 0);
- peak_rss_mb: the server process's peak resident memory during the case (VmHWM, reset before each case where
  Linux allows it; else the highest of VmRSS read every 20 ms); mean_batch: posts per encoder batch.
big_png: `--big` concurrent uploads of a flat 8000 x 8000 RGB PNG (64 MP, about 0.2 MB compressed, 256 MB
decoded), with the same counts and peak_rss_mb (aim: under 2.5 GB on 2 cores).
batching_gain_16_over_1: posts_per_s at 16 clients over 1, in this run. The last line is one JSON object.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time

import httpx
import numpy as np

from fusion.app.serve.limits import ServeLimits
from fusion.benchmarks.common import (OtherLoad, add_threads, finish, memory_kb, new_parser, reset_peak_memory,
                                      use_threads)
from fusion.benchmarks.serve_speed import add_run_options, free_port, run_of, start_server
from fusion.extract.encoders import quiet_transformers

BIG_SIDE = 8000
CASE_LIMIT_S = 600.0  # no case runs longer; what is left then counts as unanswered
POOL_CLIENTS = 8  # clients sharing one connection pool


class PeakMemory:
    """The peak resident memory of a process over a stretch of time: VmHWM since a reset, and VmRSS sampled on a
    thread as a floor (and the figure, where the reset is not allowed)."""

    def __init__(self, pid: int):
        self.pid, self.sampled_kb, self._stop = pid, 0, threading.Event()
        self.reset = reset_peak_memory(pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.sampled_kb = max(self.sampled_kb, memory_kb("VmRSS", self.pid))
            except (OSError, AttributeError):
                return

    def stop_mb(self) -> float:
        self._stop.set()
        self._thread.join()
        peak = max(self.sampled_kb, memory_kb("VmHWM", self.pid) if self.reset else 0)
        return round(peak / 1024, 1)


async def one_client(client: httpx.AsyncClient, url: str, uploads: list[tuple[bytes, str]], first: int,
                     requests: int, tally: dict) -> None:
    for k in range(requests):
        image, text = uploads[(first + k) % len(uploads)]
        started = time.perf_counter()
        try:
            response = await client.post(f"{url}/predict", files={"image": ("post.png", image)}, data={"text": text})
        except httpx.HTTPError as error:  # a timeout, a refused or broken connection: no answer (counted below)
            tally["errors"].add(type(error).__name__)
            continue
        if response.status_code == 200:
            tally["latencies"].append(time.perf_counter() - started)
        elif response.status_code == 503:
            tally["answered_503"] += 1
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
        elif response.status_code == 504:
            tally["answered_504"] += 1
        elif response.status_code >= 500:
            tally["other_5xx"] += 1
            tally["errors"].add(f"{response.status_code}: {response.text[:120]}")
        else:
            tally["other_4xx"] += 1
            tally["errors"].add(f"{response.status_code}: {response.text[:120]}")


async def run_case(url: str, uploads: list[tuple[bytes, str]], clients: int, requests: int,
                   request_limit_s: float) -> dict:
    """`clients` concurrent clients sending `requests` posts each; the counts and latencies of their answers.
    The clients share HTTP connection pools POOL_CLIENTS at a time: one pool for 256 connections costs this process
    more CPU than the server spends answering (httpx's pool does work per request that grows with its size)."""
    tally = {"latencies": [], "answered_503": 0, "answered_504": 0, "other_5xx": 0, "other_4xx": 0, "errors": set()}
    pools = [httpx.AsyncClient(timeout=request_limit_s, limits=httpx.Limits(max_connections=POOL_CLIENTS,
                                                                           max_keepalive_connections=POOL_CLIENTS))
             for _ in range(-(-clients // POOL_CLIENTS))]
    try:
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(one_client(pools[c // POOL_CLIENTS], url, uploads, c * requests, requests,
                                                  tally)) for c in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=CASE_LIMIT_S)
        for task in pending:
            task.cancel()
        seconds = time.perf_counter() - started
    finally:
        await asyncio.gather(*(pool.aclose() for pool in pools))
    answered = len(tally["latencies"]) + sum(tally[key] for key in ("answered_503", "answered_504", "other_5xx",
                                                                     "other_4xx"))
    unanswered = clients * requests - answered  # errors, and whatever the case limit cancelled
    latencies_ms = np.array(tally["latencies"]) * 1000
    quantiles = np.percentile(latencies_ms, [50, 95, 99]).round(1).tolist() if len(latencies_ms) else [None] * 3
    return {"clients": clients, "requests": clients * requests, "answered_200": len(latencies_ms),
            "answered_503": tally["answered_503"], "answered_504": tally["answered_504"],
            "non_503_5xx": tally["answered_504"] + tally["other_5xx"], "other_4xx": tally["other_4xx"],
            "unanswered": unanswered, "seconds": round(seconds, 2),
            "posts_per_s": round(len(latencies_ms) / seconds, 2), "p50_ms": quantiles[0], "p95_ms": quantiles[1],
            "p99_ms": quantiles[2], "problems": sorted(tally["errors"])[:5]}


def measured_case(url: str, pid: int, uploads: list[tuple[bytes, str]], clients: int, requests: int,
                  request_limit_s: float) -> dict:
    """run_case, with the server's peak memory and its posts per encoder batch over the case."""
    before = ready(url)
    memory = PeakMemory(pid)
    result = asyncio.run(run_case(url, uploads, clients, requests, request_limit_s))
    result["peak_rss_mb"] = memory.stop_mb()
    result["peak_from"] = "VmHWM since reset" if memory.reset else "VmRSS every 20 ms"
    after = ready(url)
    batches = after["batches_run"] - before["batches_run"]
    result["mean_batch"] = round((after["posts_predicted"] - before["posts_predicted"]) / max(1, batches), 2)
    return result


def flat_png(side: int = BIG_SIDE) -> bytes:
    """A flat RGB PNG of side x side pixels: small on the wire, side * side * 4 bytes once decoded by Pillow."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 200)).save(out, "PNG", compress_level=9)
    return out.getvalue()


def ready(url: str) -> dict:
    return httpx.get(f"{url}/ready", timeout=30).json()


def print_case(name: str, case: dict) -> None:
    print(f"{name}: {case['posts_per_s']} posts/s, p50 {case['p50_ms']} ms, p95 {case['p95_ms']} ms, p99 "
          f"{case['p99_ms']} ms; 200: {case['answered_200']}, 503: {case['answered_503']}, 5xx but 503: "
          f"{case['non_503_5xx']}, unanswered: {case['unanswered']}; {case['mean_batch']} posts per batch; "
          f"server peak RSS {case['peak_rss_mb']} MB"
          + (f"; problems: {case['problems']}" if case["problems"] else ""), flush=True)


def parse_args(argv: list[str] | None):
    parser = new_parser(__doc__)
    add_run_options(parser, "keep the encoders, data, cache and run here (shared with serve_speed; reused by later "
                            "runs)")
    parser.add_argument("--clients", default="1,16,64,256", help="concurrent clients per case, comma-separated")
    parser.add_argument("--requests", type=int, default=16, help="posts each client sends in a case")
    parser.add_argument("--big", type=int, default=24, help="concurrent uploads of the large flat PNG (0: none)")
    parser.add_argument("--big-side", type=int, default=BIG_SIDE, help="its width and height in pixels")
    add_threads(parser, 1, help="torch threads in the server: on a shared 2-core machine two threads that wait on "
                                "each other are many times slower than one")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    use_threads(args.threads)
    quiet_transformers()
    run, posts = run_of(args)
    uploads = [(image.read_bytes(), text) for image, text in posts]
    limits = ServeLimits()
    request_limit_s = limits.timeout_s + 30  # the server answers 504 at its own timeout first
    load = OtherLoad()
    port = free_port()
    server = start_server(run, port, args.workdir / "server-load.log", args.threads)
    url = f"http://127.0.0.1:{port}"
    cases: dict = {}
    try:
        asyncio.run(run_case(url, uploads, 1, 2, request_limit_s))  # warm-up: a connection, the first forwards
        about = ready(url)
        served = httpx.get(f"{url}/health", timeout=30).json()
        print(f"server: pid {server.pid}, {about['device']} {about['precision']}, {about['decode_slots']} decode "
              f"slots, --max-queue {about['queue']['max_queue']}, --timeout {limits.timeout_s:g} s; torch threads "
              f"{args.threads}; cores {len(os.sched_getaffinity(0))}", flush=True)
        for clients in [int(n) for n in args.clients.split(",") if n.strip()]:
            cases[str(clients)] = measured_case(url, server.pid, uploads, clients, args.requests, request_limit_s)
            print_case(f"{clients} clients x {args.requests} posts", cases[str(clients)])
        if args.big:
            big = [(flat_png(args.big_side), "a very large and very flat picture")]
            cases["big_png"] = measured_case(url, server.pid, big, args.big, 1, request_limit_s)
            cases["big_png"].update(side=args.big_side, upload_kb=len(big[0][0]) // 1024)
            print_case(f"{args.big} concurrent {args.big_side} x {args.big_side} PNG uploads "
                       f"({len(big[0][0]) // 1024} KB each)", cases["big_png"])
        counters = ready(url)
    finally:
        server.terminate()
        server.wait(timeout=60)
    others = load.cores()
    gain = (cases["16"]["posts_per_s"] / cases["1"]["posts_per_s"]
            if "16" in cases and "1" in cases and cases["1"]["posts_per_s"] else None)
    summary = {"cases": cases, "batching_gain_16_over_1": None if gain is None else round(gain, 2),
               "non_503_5xx_total": sum(case["non_503_5xx"] for case in cases.values()),
               "unanswered_total": sum(case["unanswered"] for case in cases.values()),
               "peak_rss_mb_max": max((case["peak_rss_mb"] for case in cases.values()), default=None),
               "server_counters": {key: counters[key] for key in ("batches_run", "posts_predicted", "refused_busy",
                                                                   "timed_out", "dropped_client_gone")},
               "mean_batch": round(counters["posts_predicted"] / max(1, counters["batches_run"]), 2),
               "limits": {"max_queue": limits.max_queue, "timeout_s": limits.timeout_s,
                          "max_pixels": limits.max_pixels, "decode_slots": counters["decode_slots"]},
               "other_load_cores": round(others, 2), "torch_threads": args.threads,
               "encoders": f"{served['text_model']} + {served['image_model']} on {about['device']}"}
    return finish(summary, other_cores=others)


if __name__ == "__main__":
    main()
