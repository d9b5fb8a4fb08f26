"""`fusion serve` through a real HTTP client against a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fault_helpers import png_claiming
from hostile_images import matrix
from serve_fixtures import make_tiny_run, running_server

from fusion.app.serve.batcher import MicroBatcher
from fusion.app.serve.limits import ServeLimits, allowed_hosts, host_name
from fusion.app.serve.server import create_app, uvicorn_config
from fusion.app.predictor import Predictor
from fusion.cli import main
from fusion.labels import LABELS

pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_models):
    return make_tiny_run(tmp_path_factory.mktemp("serve"), tiny_models)


@pytest.fixture(scope="module")
def model(tiny_run):
    return Predictor.load(tiny_run.run, device="cpu")


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, ServeLimits(max_upload_bytes=LIMIT_BYTES))
    with running_server(app) as url:
        yield url, app


def _post(url: str, image: Path | bytes, text: str | None, **kwargs) -> httpx.Response:
    content = image.read_bytes() if isinstance(image, Path) else image
    return httpx.post(f"{url}/predict", files={"image": ("post.jpg", content)},
                      data={} if text is None else {"text": text}, timeout=60, **kwargs)


def _predicted_by_cli(run: Path, image: Path, text: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--image", str(image), "--text", text, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_answers_what_fusion_predict_prints(server, tiny_run, capsys):
    url, _ = server
    for image, text in [(tiny_run.images[0], tiny_run.texts[0]), (tiny_run.images[5], "not bad at all")]:
        answer = _post(url, image, text)
        assert answer.status_code == 200, answer.text
        expected = _predicted_by_cli(tiny_run.run, image, text, capsys)
        assert answer.json()["probabilities"] == expected["probabilities"]  # the same floats, not just close
        assert answer.json()["label"] == expected["label"] and "truncated" not in answer.json()


def test_explain_and_raw_on_predict_and_batch_give_what_the_api_gives(server, tiny_run, model):
    url, _ = server
    image, text = tiny_run.images[0], tiny_run.texts[0]
    [explained] = model.predict([image], [text], explain=True)
    answer = _post(url, image, text, params={"explain": "true"})
    assert answer.status_code == 200 and answer.json() == explained
    assert set(explained["explanation"]) == {"text_only", "image_only"}  # a pooled run: the modalities alone
    [raw] = model.predict([image], [text], raw=True)
    assert _post(url, image, text, params={"raw": "true"}).json() == raw and raw["calibration"] == "raw"
    assert _post(url, image, text).json()["calibration"] == "calibrated"
    batch = httpx.post(f"{url}/predict/batch?explain=true", timeout=60,
                       files=[("image", ("a.jpg", image.read_bytes())), ("image", ("b.jpg", b"not an image"))],
                       data={"text": [text, "b"]})
    assert batch.status_code == 200 and batch.json()["results"][0] == explained
    assert "error" in batch.json()["results"][1]
    refused = _post(url, image, text, params={"explain": "perhaps"})
    assert refused.status_code == 422 and "explain" in refused.json()["error"]


def test_a_text_over_the_models_length_is_cut_as_extraction_cuts_it_and_the_answer_says_so(server, tiny_run, model,
                                                                                         capsys):
    url, _ = server
    long_text = " ".join(["happy"] * (model.max_length + 20))
    answer = _post(url, tiny_run.images[1], long_text).json()
    assert answer["truncated"] is True and str(model.max_length) in answer["note"]
    assert answer["probabilities"] == _predicted_by_cli(tiny_run.run, tiny_run.images[1], long_text,
                                                        capsys)["probabilities"]
    fits = " ".join(["happy"] * (model.max_length - 2))  # with [CLS] and [SEP]: exactly max_length tokens
    assert "truncated" not in _post(url, tiny_run.images[1], fits).json()


def _reference(model: Predictor, tiny_run, indices) -> torch.Tensor:
    """fusion predict's numbers for each post alone (batch size 1: no padding shared with other posts)."""
    rows = []
    for i in indices:
        [answer] = model.predict([tiny_run.images[i]], [tiny_run.texts[i]], batch_size=1)
        rows.append([answer["probabilities"][name] for name in LABELS])
    return torch.tensor(rows)


def _answered(answers: list[dict]) -> torch.Tensor:
    return torch.tensor([[a["probabilities"][name] for name in LABELS] for a in answers])


def test_sixteen_concurrent_clients_are_all_answered_correctly(server, model, tiny_run):
    url, _ = server
    indices = [i % len(tiny_run.images) for i in range(16)]

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        response = await client.post(f"{url}/predict", data={"text": tiny_run.texts[i]},
                                     files={"image": ("x.jpg", tiny_run.images[i].read_bytes())})
        assert response.status_code == 200, response.text
        return response.json()

    async def all_at_once() -> list[dict]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=16)) as client:
            return await asyncio.gather(*(one(client, i) for i in indices))

    answers = asyncio.run(all_at_once())
    # Posts batched with others are padded to a longer text: the float16 embeddings may then differ in the last bit.
    torch.testing.assert_close(_answered(answers), _reference(model, tiny_run, indices), atol=1e-3, rtol=0)


def test_a_batch_request_is_one_encoder_batch_and_reports_an_unreadable_image_on_its_post(server, model, tiny_run):
    url, app = server
    files = [("image", ("a.jpg", tiny_run.images[2].read_bytes())), ("image", ("b.jpg", b"not an image")),
             ("image", ("c.jpg", tiny_run.images[3].read_bytes()))]
    data = {"text": [tiny_run.texts[2], "so sad", tiny_run.texts[3]]}
    batches_before = app.state.batcher.batches_run
    response = httpx.post(f"{url}/predict/batch", files=files, data=data, timeout=60)
    assert response.status_code == 200, response.text
    first, bad, last = response.json()["results"]
    assert bad == {"error": "post 1: image: not an image (cannot identify image file)"}
    torch.testing.assert_close(_answered([first, last]), _reference(model, tiny_run, [2, 3]), atol=1e-3, rtol=0)
    assert app.state.batcher.batches_run == batches_before + 1


def _chunked(data: bytes, size: int = 8192):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def _multipart(image: bytes, text: str) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files={"image": ("x.png", image)}, data={"text": text})
    return request.read(), request.headers["content-type"]


def test_every_bad_input_is_refused_with_a_4xx_and_a_reason_and_the_server_keeps_serving(server, tiny_run):
    url, _ = server
    image = tiny_run.images[0]
    big, big_type = _multipart(b"\xff" * (2 * LIMIT_BYTES), "hi")
    refusals = {
        "not an image": (_post(url, b"GIF89a but not really", "hi"), 400, "not an image"),
        "empty file": (_post(url, b"", "hi"), 400, "empty file"),
        "bomb": (_post(url, png_claiming(60_000, 60_000), "hi"), 400, "decompression bomb"),
        "no text": (_post(url, image, None), 422, "missing field 'text'"),
        "no image": (httpx.post(f"{url}/predict", data={"text": "hi"}, timeout=60), 422, "missing field 'image'"),
        "not multipart": (httpx.post(f"{url}/predict", json={"text": "hi"}, timeout=60), 422, "missing field"),
        "declared too large": (httpx.post(f"{url}/predict", content=big, headers={"content-type": big_type},
                                          timeout=60), 413, "limit"),
        "streamed too large": (httpx.post(f"{url}/predict", content=_chunked(big), timeout=60,
                                          headers={"content-type": big_type}), 413, "limit"),
        "unpaired batch": (httpx.post(f"{url}/predict/batch", files=[("image", ("a.jpg", image.read_bytes()))],
                                      data={"text": ["a", "b"]}, timeout=60), 400, "one text per image"),
    }
    for case, (response, status, says) in refusals.items():
        assert response.status_code == status, (case, response.status_code, response.text)
        assert says in response.json()["error"], (case, response.json())
        assert len(response.json()["error"].splitlines()) == 1
    health = httpx.get(f"{url}/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert _post(url, image, "still here").status_code == 200


def test_uploads_leave_no_file_behind_and_their_names_are_never_used(server, tiny_run, tmp_path):
    url, _ = server
    before = set(Path(tempfile.gettempdir()).glob("fusion-serve-*"))
    target = tmp_path / "planted.jpg"
    name = os.path.relpath(target, Path.cwd())  # a client-chosen name that points at a real place
    for content in (tiny_run.images[0].read_bytes(), b"junk"):
        httpx.post(f"{url}/predict", files={"image": (name, content)}, data={"text": "hi"}, timeout=60)
    assert not target.exists()
    assert set(Path(tempfile.gettempdir()).glob("fusion-serve-*")) == before


def test_health_names_the_run_its_encoders_and_cache_and_the_page_has_no_external_assets(server, model):
    url, _ = server
    health = httpx.get(f"{url}/health", timeout=60).json()
    cache = model.loaded.cache
    assert health["cache_fingerprint"] == cache["fingerprint"] and health["head"] == "self_attn"
    models = Path(cache["text_model"]).parent.name
    assert health["text_model"] == f"{models}/bert" and health["image_model"] == f"{models}/dinov2"
    assert health["run"] == f"{model.run_dir.parent.name}/run" and str(model.run_dir.parent) not in str(health)
    page = httpx.get(url, timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/predict" in page.text and "http://" not in page.text and "https://" not in page.text
    assert "//" not in "".join(part.split('"')[1] for part in page.text.split("src=")[1:])


def test_the_batcher_gathers_what_waits_into_one_batch():
    release, seen = threading.Event(), []

    def run_batch(items):
        seen.append(list(items))
        release.wait(timeout=30)
        return [item * 10 for item in items]

    batcher = MicroBatcher(run_batch, max_batch=8, wait_s=0.0)
    batcher.start()

    async def clients():
        first = asyncio.ensure_future(batcher.submit([0]))
        while not seen:  # the worker holds the first job; everything after it queues up meanwhile
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit([i, i + 100])) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(clients())
    batcher.stop()
    assert first == [0] and rest == [[10 * i, 10 * (i + 100)] for i in range(1, 6)]
    # 5 jobs of 2 items wait: 4 fit in a batch of 8, never split; the fifth goes next.
    assert [len(batch) for batch in seen] == [1, 8, 2]


def test_the_window_waits_for_announced_posts_and_never_for_posts_not_announced():
    seen = []
    batcher = MicroBatcher(lambda items: seen.append(list(items)) or list(items), max_batch=8, wait_s=3600.0)
    batcher.start()

    async def clients():
        alone = await asyncio.wait_for(batcher.submit(["alone"]), timeout=60)  # nothing else announced: no wait
        batcher.announce(2)
        first = asyncio.ensure_future(batcher.submit(["first"]))
        await asyncio.sleep(0.05)  # the worker holds "first" and waits for the two announced posts
        batcher.withdraw(1)  # one of them was refused
        late = await asyncio.wait_for(batcher.submit(["late"], announced=1), timeout=60)
        return alone, await first, late

    assert asyncio.run(clients()) == (["alone"], ["first"], ["late"])
    batcher.stop()
    assert seen == [["alone"], ["first", "late"]]


def test_a_failing_batch_is_retried_post_by_post_so_only_the_bad_post_fails():
    release, calls = threading.Event(), []

    def run_batch(items):
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(timeout=30)  # holds the first batch while the next three requests queue up
        if "bad" in items:
            raise RuntimeError("out of memory")
        return [item.upper() for item in items]

    batcher = MicroBatcher(run_batch, max_batch=8, wait_s=0.0)
    batcher.start()

    async def requests():
        first = asyncio.ensure_future(batcher.submit(["first"]))
        while not calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit(items)) for items in (["a"], ["bad"], ["b", "c"])]
        while batcher.waiting < 4:
            await asyncio.sleep(0.001)
        release.set()
        return await first, await asyncio.gather(*rest)

    first, (a, bad, bc) = asyncio.run(requests())
    assert batcher.stop(timeout=30)
    assert first == ["FIRST"] and a == ["A"] and bc == ["B", "C"]
    [error] = bad
    assert isinstance(error, RuntimeError) and str(error) == "out of memory"
    assert calls == [["first"], ["a", "bad", "b", "c"], ["a"], ["bad"], ["b"], ["c"]]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _serve_command(monkeypatch, argv: list[str]):
    """`fusion serve` run as a user runs it, in a thread of this process (a fresh one would spend most of the test
    importing torch and transformers): yields the uvicorn server the command made, once it has started, and the
    command's exit codes (filled when it returns); on leaving, stops the server as Ctrl+C would."""
    made, codes = [], []

    class Recorded(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            made.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recorded)
    thread = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (made and made[0].started):
            assert thread.is_alive() and time.monotonic() < deadline, codes
            time.sleep(0.01)
        yield made[0], codes
    finally:
        if made:
            made[0].should_exit = True
        thread.join(timeout=60)


def test_fusion_serve_command_serves_the_run_on_loopback(tiny_run, capsys, monkeypatch):
    """The command as a user runs it (_serve_command), answering as `fusion predict` does."""
    port = _free_port()
    with _serve_command(monkeypatch, ["serve", "--run", str(tiny_run.run), "--port", str(port), "--device", "cpu"]) \
            as (server, codes):
        answer = _post(f"http://127.0.0.1:{port}", tiny_run.images[4], tiny_run.texts[4]).json()
    assert codes == [0] and server.config.host == "127.0.0.1"
    assert f"http://127.0.0.1:{port}/" in capsys.readouterr().out
    expected = _predicted_by_cli(tiny_run.run, tiny_run.images[4], tiny_run.texts[4], capsys)
    assert answer["probabilities"] == expected["probabilities"]


# ---------------------------------------------------------------- under load: batches, queue, deadline, clients gone


class Gate:
    """Stands in for Predictor.predict_prepared: records each batch's size and holds the first `hold` batches
    until `release` is set, so requests pile up behind them as under load."""

    def __init__(self, predict_prepared, hold: int = 1):
        self.predict_prepared, self.hold = predict_prepared, hold
        self.sizes: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, posts):
        self.sizes.append(len(posts))
        if len(self.sizes) <= self.hold:
            self.entered.set()
            self.release.wait(timeout=120)
        return self.predict_prepared(posts)


@contextmanager
def gated_server(model: Predictor, monkeypatch, limits: ServeLimits = ServeLimits(), hold: int = 1):
    gate = Gate(model.predict_prepared, hold)
    monkeypatch.setattr(model, "predict_prepared", gate)
    app = create_app(model, limits)
    monkeypatch.undo()  # the app holds the gate; the module's model is left as it was
    with running_server(app) as url:
        try:
            yield url, app, gate
        finally:
            gate.release.set()  # before the server stops, so nothing waits on a held batch


def _until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def _in_background(call) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def test_concurrent_http_requests_share_encoder_batches(model, tiny_run, monkeypatch):
    n = 6
    with gated_server(model, monkeypatch) as (url, app, gate):
        first, answered = _in_background(lambda: _post(url, tiny_run.images[0], tiny_run.texts[0]))
        assert gate.entered.wait(60)  # the worker is busy with the first post
        others = [_in_background(lambda i=i: _post(url, tiny_run.images[i], tiny_run.texts[i])) for i in range(1, n)]
        _until(lambda: app.state.batcher.waiting == n - 1, "the other requests waiting for the worker")
        gate.release.set()
        for thread, _ in [(first, answered), *others]:
            thread.join(timeout=120)
    responses = answered + [result[0] for _, result in others]
    assert [response.status_code for response in responses] == [200] * n
    assert len(gate.sizes) < n and gate.sizes == [1, n - 1]  # one post alone, then the five that waited, together


def test_a_request_over_the_queue_bound_is_answered_503_with_retry_after(model, tiny_run, monkeypatch):
    with gated_server(model, monkeypatch, ServeLimits(max_queue=1)) as (url, app, gate):
        first, answered = _in_background(lambda: _post(url, tiny_run.images[0], tiny_run.texts[0]))
        assert gate.entered.wait(60)
        busy = _post(url, tiny_run.images[1], tiny_run.texts[1])
        ready = httpx.get(f"{url}/ready", timeout=60).json()  # not a prediction: answered even when full
        gate.release.set()
        first.join(timeout=120)
        after = _post(url, tiny_run.images[1], tiny_run.texts[1])
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert "--max-queue 1" in busy.json()["error"] and len(busy.json()["error"].splitlines()) == 1
    assert ready["queue"]["requests"] == 1 and ready["refused_busy"] == 1
    assert answered[0].status_code == 200 and after.status_code == 200


def test_a_request_past_its_deadline_is_answered_504_and_its_post_is_not_computed(model, tiny_run, monkeypatch):
    with gated_server(model, monkeypatch, ServeLimits(timeout_s=0.5)) as (url, app, gate):
        first, held = _in_background(lambda: _post(url, tiny_run.images[0], tiny_run.texts[0]))
        assert gate.entered.wait(60)  # held until long past its deadline
        late = _post(url, tiny_run.images[1], tiny_run.texts[1])  # waits behind it, and passes its deadline too
        first.join(timeout=120)
        gate.release.set()
        _until(lambda: app.state.batcher.waiting == 0, "the queue emptied")
        fresh = _post(url, tiny_run.images[2], tiny_run.texts[2])
    assert held[0].status_code == 504 and late.status_code == 504 and fresh.status_code == 200
    assert "--timeout" in late.json()["error"] and app.state.load.timed_out == 2
    assert gate.sizes == [1, 1]  # the held post, then the fresh one: the late post was dropped, never computed


def _raw_post(port: int, image: bytes, text: str) -> socket.socket:
    """A complete /predict request written on a socket of our own, which the test then closes unanswered."""
    body, content_type = _multipart(image, text)
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection.sendall(head + body)
    return connection


def test_the_post_of_a_client_that_left_is_dropped_before_it_is_computed(model, tiny_run, monkeypatch):
    with gated_server(model, monkeypatch) as (url, app, gate):
        first, answered = _in_background(lambda: _post(url, tiny_run.images[0], tiny_run.texts[0]))
        assert gate.entered.wait(60)
        leaving = _raw_post(int(url.rsplit(":", 1)[1]), tiny_run.images[1].read_bytes(), tiny_run.texts[1])
        _until(lambda: app.state.batcher.waiting == 1, "the leaving client's post queued")
        leaving.close()
        _until(lambda: app.state.load.dropped == 1, "the server noticing the client left")
        gate.release.set()
        first.join(timeout=120)
        fresh = _post(url, tiny_run.images[2], tiny_run.texts[2])
    assert answered[0].status_code == 200 and fresh.status_code == 200
    assert gate.sizes == [1, 1]  # the first post and the fresh one; the leaving client's post never ran


def test_a_text_over_the_limit_is_refused_before_it_is_tokenized(model, tiny_run, monkeypatch):
    tokenized = []
    with gated_server(model, monkeypatch, ServeLimits(max_text_chars=40), hold=0) as (url, _, _):
        monkeypatch.setattr(model, "_tokenizer", lambda: tokenized.append(1))
        one = _post(url, tiny_run.images[0], "x" * 41)
        batch = httpx.post(f"{url}/predict/batch", data={"text": ["fine", "y" * 1000]}, timeout=60,
                           files=[("image", ("a.jpg", tiny_run.images[0].read_bytes())),
                                  ("image", ("b.jpg", tiny_run.images[1].read_bytes()))])
    assert one.status_code == 413 and batch.status_code == 413 and tokenized == []
    assert one.json()["error"] == ("text: 41 characters, over the server's limit of 40 (fusion serve "
                                   "--max-text-chars)")
    assert batch.json()["error"].startswith("post 1: text: 1000 characters")


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(model, tiny_run, monkeypatch):
    with gated_server(model, monkeypatch, ServeLimits(max_pixels=400), hold=0) as (url, _, gate):
        refused = _post(url, tiny_run.images[0], "hi")
    assert refused.status_code == 400 and "too many pixels" in refused.json()["error"] and gate.sizes == []


@pytest.mark.parametrize("case", matrix(), ids=lambda case: case.name)
def test_every_file_of_the_matrix_is_answered_200_or_a_4xx_with_its_reason(server, case):
    url, _ = server
    response = httpx.post(f"{url}/predict", files={"image": (case.filename, case.data)}, data={"text": "a post"},
                          timeout=60)
    if case.reason is None:
        assert response.status_code == 200 and response.json()["label"] in LABELS, response.text
    else:
        assert response.status_code == 400 and response.json()["error"].startswith(f"image: {case.reason}"), \
            response.text


def test_a_request_for_another_host_is_refused_so_dns_rebinding_reads_nothing(server, tiny_run):
    url, _ = server
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        health = httpx.get(f"{url}/health", headers={"Host": host}, timeout=60)
        assert health.status_code == 400 and "--allow-host" in health.json()["error"], host
        assert "cache_fingerprint" not in health.text
    posted = httpx.post(f"{url}/predict", headers={"Host": "evil.example"}, data={"text": "hi"}, timeout=60,
                        files={"image": ("a.jpg", tiny_run.images[0].read_bytes())})
    assert posted.status_code == 400 and "label" not in posted.text
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80", "LOCALHOST"):
        assert httpx.get(f"{url}/health", headers={"Host": host}, timeout=60).status_code == 200, host


def test_allowed_hosts_are_the_bound_address_localhost_and_the_names_added():
    assert allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    assert allowed_hosts("192.168.1.5", ["box.lan"]) == ("192.168.1.5", "127.0.0.1", "localhost", "::1", "box.lan")
    assert allowed_hosts("0.0.0.0") == ("127.0.0.1", "localhost", "::1")  # nobody names a wildcard
    assert [host_name(h) for h in ("a.b:80", "[::1]:8000", "::1", "Example.ORG")] == ["a.b", "::1", "::1",
                                                                                     "example.org"]


def test_any_host_is_answered_when_asked_for(model, tiny_run, monkeypatch):
    with gated_server(model, monkeypatch, ServeLimits(allowed_hosts=("*",)), hold=0) as (url, _, _):
        assert httpx.get(f"{url}/health", headers={"Host": "box.lan:8000"}, timeout=60).status_code == 200


def test_ready_reports_the_worker_the_queue_and_the_device_and_503_once_the_worker_is_gone(model, monkeypatch):
    with gated_server(model, monkeypatch, hold=0) as (url, app, _):
        ready = httpx.get(f"{url}/ready", timeout=60)
        assert app.state.batcher.stop(timeout=30)  # as if the worker had died
        gone = httpx.get(f"{url}/ready", timeout=60)
        health = httpx.get(f"{url}/health", timeout=60)
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["model_loaded"] is True
    assert ready.json()["worker_alive"] is True and ready.json()["device"] == "cpu"
    assert ready.json()["queue"] == {"requests": 0, "max_queue": ServeLimits().max_queue, "posts_waiting": 0}
    assert gone.status_code == 503 and gone.json()["worker_alive"] is False
    assert health.status_code == 200  # liveness: the server itself still answers


def test_shutdown_is_bounded_even_with_a_forward_that_never_returns(model, tiny_run, monkeypatch):
    gate = Gate(model.predict_prepared)
    monkeypatch.setattr(model, "predict_prepared", gate)
    app = create_app(model, ServeLimits(timeout_s=1))
    monkeypatch.undo()
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=0, limits=app.state.limits,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _until(lambda: server.started, "the server started")
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        client, answered = _in_background(lambda: _post(url, tiny_run.images[0], tiny_run.texts[0]))
        assert gate.entered.wait(60)  # the forward is stuck for good
        server.should_exit = True
        thread.join(timeout=60)
        stopped = not thread.is_alive()
        client.join(timeout=60)
    finally:
        gate.release.set()
    assert stopped, "the server waited for a stuck forward"
    assert answered and answered[0].status_code == 504


def test_an_fp16_run_serves_on_a_cpu_in_fp32_with_the_head_beside_the_encoders(tiny_models, tmp_path, capsys,
                                                                               monkeypatch):
    from cache_fixtures import write_synthetic_cache
    from dataset_writers import write_image

    from fusion.heads.checkpoint import save_run
    from fusion.heads.config import FitConfig
    from fusion.heads.runs import load_features
    from fusion.heads.train import train_head

    features, meta = load_features(write_synthetic_cache(tmp_path / "c.h5", (12, 4, 4), dt=32, di=24))
    meta = {**meta, "text_model": str(tiny_models[0]), "image_model": str(tiny_models[1]), "precision": "fp16",
            "max_length": 16, "device_type": "cuda"}
    run = save_run(tmp_path / "run", train_head(features, FitConfig(head="basic", epochs=1)), cache=meta)
    image = write_image(tmp_path / "post.jpg", 3)
    port = _free_port()
    with _serve_command(monkeypatch, ["serve", "--run", str(run), "--port", str(port), "--device", "cpu"]) \
            as (_, codes):
        url = f"http://127.0.0.1:{port}"
        answer = _post(url, image, "not bad")
        ready = httpx.get(f"{url}/ready", timeout=60).json()
    err = capsys.readouterr().err
    assert codes == [0] and answer.status_code == 200 and answer.json()["label"] in LABELS
    assert ready["precision"] == "fp32" and ready["device"] == "cpu"
    assert "fusion: note:" in err and "fp16" in err and "fp32" in err
    predictor = Predictor.load(run, device="cpu")
    assert {p.device for p in predictor.head.parameters()} == {predictor.encoders.device}
