"""`fusion serve`: a trained run behind an HTTP API and a web page.

    fusion serve --run demo_out/grid/best
    curl -F image=@meme.jpg -F text='not bad at all' localhost:8000/predict

The run's encoders and head are loaded once (one Predictor, app/predictor.py: it alone picks the device and the
precision). Requests that arrive together share one encoder batch (fusion.app.serve.batcher); bad input is answered
with a 4xx and a JSON {"error": ...} naming the field, and the server keeps serving. Under load it sheds instead of
falling over (the bounds: ServeLimits, app/serve/limits.py; the checks: guard.py): at most one decode per core
(slots.py), at most --max-queue prediction requests inside the server (more: 503), each answered within --timeout
(else 504), the work of a client that left dropped. Nothing a client sends is used as a path: an upload is decoded
from the one temporary file the form parser spooled it to.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from fusion.app.predictor import BadPost, PreparedPost, Predictor
from fusion.app.serve.batcher import MicroBatcher
from fusion.app.serve.guard import HostCheck, Load, RequestGuard, UploadLimit
from fusion.app.serve.limits import ServeLimits
from fusion.app.serve.slots import DecodeSlots

PAGE_FILE = "page.html"
PREDICTION_PATHS = ("/predict", "/predict/batch")
# Connections and requests uvicorn holds at once before it answers 503 itself (plain text): a backstop far above
# --max-queue, so that idle keep-alive connections of many clients never meet it first.
MAX_CONNECTIONS = 2048


def create_app(model: Predictor, limits: ServeLimits = ServeLimits()) -> FastAPI:
    batcher = MicroBatcher(model.predict_prepared, max_batch=limits.max_batch, wait_s=limits.wait_s)
    slots = DecodeSlots(limits.decode_threads())
    load = Load()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        slots.close()
        batcher.stop(timeout=limits.timeout_s)  # a forward that never returns must not hold the shutdown

    # No /docs or /redoc: they load their scripts from a CDN, and the page is the way to try the model.
    app = FastAPI(title="fusion", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher, app.state.slots, app.state.load, app.state.limits = batcher, slots, load, limits
    # The last added runs first: the Host check, then admission and the deadline, then the upload's size.
    app.add_middleware(UploadLimit, max_bytes=limits.max_upload_bytes)
    app.add_middleware(RequestGuard, paths=PREDICTION_PATHS, load=load, max_queue=limits.max_queue,
                       timeout_s=limits.timeout_s)
    app.add_middleware(HostCheck, allowed=limits.allowed_hosts)
    _add_error_answers(app)
    described = {"status": "ok", **model.describe(), "max_batch": limits.max_batch,
                 "max_upload_mb": round(limits.max_upload_bytes / 2**20, 3)}
    _add_page_and_health(app, batcher, described)
    _add_ready(app, model, batcher, slots, load)
    _add_predict(app, model, batcher, slots, limits)
    _add_predict_batch(app, model, batcher, slots, limits)
    return app


def _add_page_and_health(app: FastAPI, batcher: MicroBatcher, described: dict) -> None:
    page = files("fusion.app.serve").joinpath(PAGE_FILE).read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def home() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the server answers. What is served, and the batches run so far."""
        return {**described, "batches_run": batcher.batches_run, "posts_predicted": batcher.items_run}


def _add_ready(app: FastAPI, model: Predictor, batcher: MicroBatcher, slots: DecodeSlots, load: Load) -> None:
    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: the model is loaded and the batch worker alive (else 503), with the load right now."""
        worker = batcher.alive
        about = model.describe()
        state = {"ready": worker, "model_loaded": True, "worker_alive": worker, "device": about["device"],
                 "precision": about["precision"], "queue": {"requests": load.in_flight,
                                                            "max_queue": app.state.limits.max_queue,
                                                            "posts_waiting": batcher.waiting},
                 "decoding": slots.running, "decode_slots": slots.count, "batches_run": batcher.batches_run,
                 "posts_predicted": batcher.items_run, "refused_busy": load.refused, "timed_out": load.timed_out,
                 "dropped_client_gone": load.dropped}
        return JSONResponse(state, status_code=200 if worker else 503)


def _add_predict(app: FastAPI, model: Predictor, batcher: MicroBatcher, slots: DecodeSlots,
                 limits: ServeLimits) -> None:
    @app.post("/predict")
    async def predict(image: UploadFile = File(...), text: str = Form(...), explain: bool = False,
                      raw: bool = False) -> dict:
        """One post: multipart fields `image` (a file) and `text`; ?explain=true adds the explanation, ?raw=true
        gives the head's own probabilities (docs/explain.md)."""
        _check_text(text, limits.max_text_chars)
        batcher.announce(1)
        try:
            post = await _prepared(model, slots, image, text, limits, explain=explain, raw=raw)
        except BaseException as error:
            batcher.withdraw(1)
            if isinstance(error, BadPost):
                raise HTTPException(400, str(error)) from None
            raise
        [answer] = await batcher.submit([post], announced=1)
        if isinstance(answer, Exception):
            raise answer  # answered 500 (below): this post failed in the encoders even alone
        return answer


def _add_predict_batch(app: FastAPI, model: Predictor, batcher: MicroBatcher, slots: DecodeSlots,
                       limits: ServeLimits) -> None:
    @app.post("/predict/batch")
    async def predict_batch(image: list[UploadFile] = File(...), text: list[str] = Form(...), explain: bool = False,
                            raw: bool = False) -> dict:
        """Several posts in one encoder batch: repeated `image` and `text` fields, paired in order. A post whose
        image cannot be read is answered with its error, the others are still predicted (as `fusion predict --csv`)."""
        if len(image) != len(text):
            raise HTTPException(400, f"{len(image)} image field(s) but {len(text)} text field(s): "
                                     "send one text per image, in the same order")
        if len(image) > batcher.max_batch:
            raise HTTPException(400, f"{len(image)} posts: at most {batcher.max_batch} per request")
        for position, words in enumerate(text):
            _check_text(words, limits.max_text_chars, f"post {position}: ")
        prepared: list[PreparedPost | str] = []
        batcher.announce(len(image))
        try:
            for position, (upload, words) in enumerate(zip(image, text)):
                try:
                    prepared.append(await _prepared(model, slots, upload, words, limits, explain=explain, raw=raw))
                except BadPost as error:
                    prepared.append(f"post {position}: {error}")
        except BaseException:
            batcher.withdraw(len(image))  # none of them was submitted
            raise
        readable = [post for post in prepared if isinstance(post, PreparedPost)]
        batcher.withdraw(len(image) - len(readable))
        answers = iter(await batcher.submit(readable, announced=len(readable)) if readable else [])
        return {"results": [{"error": post} if isinstance(post, str) else _post_answer(position, next(answers))
                            for position, post in enumerate(prepared)]}


def _post_answer(position: int, answer: dict | Exception) -> dict:
    if isinstance(answer, Exception):
        return {"error": f"post {position}: could not be predicted ({type(answer).__name__}); the other posts were"}
    return answer


def _check_text(text: str, max_chars: int, where: str = "") -> None:
    """A text over the limit is refused before it is tokenized (413)."""
    if len(text) > max_chars:
        raise HTTPException(413, f"{where}text: {len(text)} characters, over the server's limit of {max_chars} "
                                 "(fusion serve --max-text-chars)")


async def _prepared(model: Predictor, slots: DecodeSlots, upload: UploadFile, text: str, limits: ServeLimits, *,
                    explain: bool = False, raw: bool = False) -> PreparedPost:
    """Decoding and preprocessing run on a decode thread, so the event loop keeps accepting requests; the upload
    is decoded from its spooled file as it is."""
    return await slots.run(model.prepare, upload.file, text, max_pixels=limits.max_pixels, explain=explain, raw=raw)


def _add_error_answers(app: FastAPI) -> None:
    """Every refusal is JSON {"error": one line}, whatever raised it."""

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "; ".join(_field_problem(problem) for problem in error.errors())},
                            status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(error).__name__}); the server keeps serving"},
                            status_code=500)


def _field_problem(problem: dict) -> str:
    place = problem.get("loc") or ("body", "?")
    field = str(place[1] if len(place) > 1 else place[0])  # ("body", "image", 0): the name, not the position
    if problem.get("type") == "missing":
        return f"missing field {field!r} (send multipart/form-data with a file 'image' and a field 'text')"
    return f"field {field!r}: {problem.get('msg', 'invalid')}"


def serve_forever(model: Predictor, *, host: str, port: int, limits: ServeLimits = ServeLimits()) -> None:
    """Blocks until interrupted (Ctrl+C); uvicorn logs each request to stderr. Shutting down waits at most
    limits.timeout_s for the requests in flight."""
    import uvicorn

    server = uvicorn.Server(uvicorn_config(create_app(model, limits), host=host, port=port, limits=limits))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn has shut down cleanly, then passes Ctrl+C on: stopping is the normal end
        pass


def uvicorn_config(app: FastAPI, *, host: str, port: int, limits: ServeLimits, log_level: str = "info"):
    """How uvicorn runs the app: no Server header, a backstop on connections, and a shutdown that waits at most
    the request timeout for requests in flight before cancelling them."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, server_header=False, log_level=log_level, lifespan="on",
                          limit_concurrency=MAX_CONNECTIONS, timeout_graceful_shutdown=max(1, round(limits.timeout_s)))
