"""`fusion serve` through a real HTTP client against a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fault_helpers import png_claiming
from serve_fixtures import make_tiny_run, running_server

from fusion.app.serve.batcher import MicroBatcher
from fusion.app.serve.server import create_app
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
    app = create_app(model, max_upload_bytes=LIMIT_BYTES)
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
    url, app = server
    indices = [i % len(tiny_run.images) for i in range(16)]
    batches_before = app.state.batcher.batches_run

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
    assert app.state.batcher.batches_run - batches_before <= 16


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


def test_a_failing_batch_fails_its_requests_only():
    calls = []

    def run_batch(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return items

    batcher = MicroBatcher(run_batch, max_batch=4, wait_s=0.0)
    batcher.start()

    async def two_requests():
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher.submit(["a"])
        return await batcher.submit(["b"])

    assert asyncio.run(two_requests()) == ["b"]
    batcher.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fusion_serve_command_serves_the_run_on_loopback(tiny_run, capsys, monkeypatch):
    """The command as a user runs it, in a thread of this process (a fresh one would spend most of the test
    importing torch and transformers); the test stops the uvicorn server the command made, as Ctrl+C would."""
    made = []

    class Recorded(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            made.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recorded)
    port, codes = _free_port(), []
    argv = ["serve", "--run", str(tiny_run.run), "--port", str(port), "--device", "cpu"]
    thread = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (made and made[0].started):
            assert thread.is_alive() and time.monotonic() < deadline, codes
            time.sleep(0.01)
        answer = _post(f"http://127.0.0.1:{port}", tiny_run.images[4], tiny_run.texts[4]).json()
    finally:
        if made:
            made[0].should_exit = True
        thread.join(timeout=30)
    assert codes == [0] and made[0].config.host == "127.0.0.1"
    assert f"http://127.0.0.1:{port}/" in capsys.readouterr().out
    expected = _predicted_by_cli(tiny_run.run, tiny_run.images[4], tiny_run.texts[4], capsys)
    assert answer["probabilities"] == expected["probabilities"]
