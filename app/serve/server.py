"""`fusion serve`: a trained run behind an HTTP API and a web page.

    fusion serve --run demo_out/grid/best
    curl -F image=@meme.jpg -F text='not bad at all' localhost:8000/predict

The run's encoders and head are loaded once. Requests that arrive together share one encoder batch
(fusion.app.serve.batcher); bad input is answered with a 4xx and a JSON {"error": ...} naming the field, and the server
keeps serving. Nothing a client sends is used as a path: an upload is read from a private temporary file only.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from fusion.app.serve.batcher import MicroBatcher
from fusion.app.serve.limits import UploadLimit
from fusion.app.predictor import BadPost, PreparedPost, Predictor

PAGE_FILE = "page.html"
DEFAULT_MAX_BATCH = 32
# How long a batch waits for posts announced but not yet prepared (never longer than they take; see batcher.py).
DEFAULT_WAIT_S = 0.01


def create_app(model: Predictor, *, max_upload_bytes: int, max_batch: int = DEFAULT_MAX_BATCH,
               wait_s: float = DEFAULT_WAIT_S) -> FastAPI:
    batcher = MicroBatcher(model.predict_prepared, max_batch=max_batch, wait_s=wait_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    # No /docs or /redoc: they load their scripts from a CDN, and the page is the way to try the model.
    app = FastAPI(title="fusion", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    _add_error_answers(app)
    described = {"status": "ok", **model.describe(), "max_batch": max_batch,
                 "max_upload_mb": round(max_upload_bytes / 2**20, 3)}
    _add_page_and_health(app, batcher, described)
    _add_predict(app, model, batcher)
    _add_predict_batch(app, model, batcher)
    return app


def _add_page_and_health(app: FastAPI, batcher: MicroBatcher, described: dict) -> None:
    page = files("fusion.app.serve").joinpath(PAGE_FILE).read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def home() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {**described, "batches_run": batcher.batches_run, "posts_predicted": batcher.items_run}


def _add_predict(app: FastAPI, model: Predictor, batcher: MicroBatcher) -> None:
    @app.post("/predict")
    async def predict(image: UploadFile = File(...), text: str = Form(...), explain: bool = False,
                      raw: bool = False) -> dict:
        """One post: multipart fields `image` (a file) and `text`; ?explain=true adds the explanation, ?raw=true
        gives the head's own probabilities (docs/explain.md)."""
        batcher.announce(1)
        try:
            post = await _prepared(model, image, text, explain=explain, raw=raw)
        except BaseException as error:
            batcher.withdraw(1)
            if isinstance(error, BadPost):
                raise HTTPException(400, str(error)) from None
            raise
        [answer] = await batcher.submit([post], announced=1)
        return answer


def _add_predict_batch(app: FastAPI, model: Predictor, batcher: MicroBatcher) -> None:
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
        prepared: list[PreparedPost | str] = []
        batcher.announce(len(image))
        try:
            for position, (upload, words) in enumerate(zip(image, text)):
                try:
                    prepared.append(await _prepared(model, upload, words, explain=explain, raw=raw))
                except BadPost as error:
                    prepared.append(f"post {position}: {error}")
        except BaseException:
            batcher.withdraw(len(image))
            raise
        readable = [post for post in prepared if isinstance(post, PreparedPost)]
        batcher.withdraw(len(image) - len(readable))
        answers = iter(await batcher.submit(readable, announced=len(readable)) if readable else [])
        return {"results": [{"error": post} if isinstance(post, str) else next(answers) for post in prepared]}


async def _prepared(model: Predictor, upload: UploadFile, text: str, *, explain: bool = False,
                    raw: bool = False) -> PreparedPost:
    """Decoding and preprocessing run on a worker thread, so the event loop keeps accepting requests."""
    await upload.seek(0)
    return await run_in_threadpool(model.prepare, upload.file, text, explain=explain, raw=raw)


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


def serve_forever(model: Predictor, *, host: str, port: int, max_upload_mb: float) -> None:
    """Blocks until interrupted (Ctrl+C); uvicorn logs each request to stderr."""
    import uvicorn

    app = create_app(model, max_upload_bytes=int(max_upload_mb * 2**20))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, server_header=False, log_level="info"))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn has shut down cleanly, then passes Ctrl+C on: stopping is the normal end
        pass
