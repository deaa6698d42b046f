"""The FastAPI application: OpenAI's image routes over the batcher, plus models, health, metrics and the page.

    POST /v1/images/generations   JSON; `stream: true` answers server-sent events (queued, started, progress,
                                  image_generation.completed per image, done; or error)
    POST /v1/images/edits         multipart form with `image` (image-to-image, `strength`)
    GET  /v1/images/files/{token}.png   `response_format=url` images, until they expire
    GET  /v1/models, /v1/models/{id}, /healthz, /metrics, / (the page), /static/{app.js,style.css}

With an API key every route but /healthz, the page's static files and the image files needs
`Authorization: Bearer KEY` (401 otherwise). Image file URLs hold a random 128-bit token, like OpenAI's signed
URLs, so they work without the header (in an <img> tag, or handed to another tool) and name nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2i.serve.adapters import ModelAdapter
from t2i.serve.batcher import Batcher, Job
from t2i.serve.errors import APIError, error_body, error_type
from t2i.serve.metrics import Metrics
from t2i.serve.schema import JobSpec, parse_job, parse_json_body
from t2i.serve.settings import ServerSettings
from t2i.serve.store import ImageStore
from t2i.serve.uploads import read_body, read_edit_form

log = logging.getLogger("t2i.serve")
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
PUBLIC_PATHS = ("/healthz", "/", "/favicon.ico", *(f"/static/{name}" for name in STATIC_FILES))
FILES_PREFIX = "/v1/images/files/"
KEEPALIVE_S = 2.0  # an SSE comment this often while a streamed request waits (finds gone clients early)


class ClientGone(Exception):
    """The client closed the connection before its images were ready."""


class ServerState:
    """What the routes share: settings, adapters, the batcher, the url store and the metrics."""

    def __init__(self, settings: ServerSettings, adapters: dict[str, ModelAdapter]) -> None:
        self.settings, self.adapters = settings, adapters
        self.batcher = Batcher(adapters, settings.max_batch, settings.max_queue, settings.batch_wait_s)
        self.metrics = Metrics(self.batcher)
        self.batcher.metrics = self.metrics
        self.store = ImageStore(settings.url_ttl_s, settings.max_stored_images)
        self.created = int(time.time())
        self.static = {name: read_static(name) for name in ("index.html", *STATIC_FILES)}


def read_static(name: str) -> bytes:
    return resources.files("t2i.serve").joinpath("static", name).read_bytes()


def create_app(settings: ServerSettings, adapters: dict[str, ModelAdapter]) -> FastAPI:
    """The app serving `adapters` ({model id: adapter}); the batcher starts and stops with the app's lifespan."""
    state = ServerState(settings, adapters)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        sweeper = asyncio.create_task(sweep_forever(state.store))
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.to_thread(state.batcher.stop)
            state.store.close()

    app = FastAPI(title="t2i serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.t2i = state
    install_error_handlers(app)
    add_image_routes(app, state)
    add_info_routes(app, state)
    key = settings.api_key
    return AuthMiddleware(app, key) if key else app  # type: ignore[return-value]


async def sweep_forever(store: ImageStore) -> None:
    while True:
        await asyncio.sleep(min(30.0, store.ttl_s))
        await asyncio.to_thread(store.sweep)


# ---------------------------------------------------------------------------------------------- auth, errors


class AuthMiddleware:
    """ASGI middleware: `Authorization: Bearer KEY` on every path but the public ones (compared in constant time)."""

    def __init__(self, app: FastAPI, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()
        self.state = app.state  # tests and the server reach the ServerState through here too

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and not is_public(scope["path"]):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                reason = "missing" if not given else "wrong"
                body = error_body(f"Authorization: {reason} API key; send 'Authorization: Bearer KEY'",
                                  "authentication_error", None, "invalid_api_key")
                response = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(FILES_PREFIX)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error object; anything unexpected is a 500 (a bug) and is logged."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(error_body(message, error_type(err.status_code)), err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"invalid request: {err.errors()}", "invalid_request_error"), 400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = error_body(f"internal server error ({type(err).__name__})", "server_error", None, "internal_error")
        return JSONResponse(body, 500)


# ---------------------------------------------------------------------------------------------- image routes


def add_image_routes(app: FastAPI, state: ServerState) -> None:
    settings = state.settings

    async def parse_generation(request: Request) -> JobSpec:
        values = parse_json_body(await read_body(request, settings.max_upload_bytes))
        return parse_job(values, state.adapters, settings)

    async def parse_edit(request: Request) -> JobSpec:
        values, image, mask = await read_edit_form(request, settings)
        return parse_job(values, state.adapters, settings, edit_image=image, edit_mask=mask)

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        return await handle_images(state, request, "generations", parse_generation)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        return await handle_images(state, request, "edits", parse_edit)

    @app.get(FILES_PREFIX + "{name}")
    async def image_file(name: str) -> Response:
        token = name.removesuffix(".png")
        png = state.store.get(token) if name.endswith(".png") else None
        if png is None:
            raise APIError(f"image {name!r}: unknown or expired", 404, code="not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


class RequestLog:
    """The one log line (and the metrics) of an image request, written when its answer is complete."""

    def __init__(self, state: ServerState, endpoint: str) -> None:
        self.state, self.endpoint = state, endpoint
        self.id = "req_" + secrets.token_hex(8)
        self.arrived = time.monotonic()
        self.spec: JobSpec | None = None
        self.job: Job | None = None

    def finish(self, status: int, code: str | None = None) -> None:
        metrics, now = self.state.metrics, time.monotonic()
        job, spec = self.job, self.spec
        queue_s = job.queue_seconds(now) if job else 0.0
        run_s = job.run_seconds if job else 0.0
        metrics.requests.labels(endpoint=self.endpoint, status=str(status)).inc()
        metrics.request_seconds.labels(endpoint=self.endpoint).observe(now - self.arrived)
        if job is not None and job.started is not None:
            metrics.queue_seconds.observe(queue_s)
        if status == 200 and spec is not None:
            metrics.images.labels(model=spec.model).inc(len(spec.rows))
        if status >= 400:
            metrics.error(code or str(status))
        log.info(
            "%s %s model=%s size=%s n=%s queue=%.3fs run=%.3fs status=%d%s",
            self.id, self.endpoint, spec.model if spec else "-", spec.size if spec else "-",
            len(spec.rows) if spec else "-", queue_s, run_s, status, f" code={code}" if code else "",
        )


async def handle_images(
    state: ServerState, request: Request, endpoint: str, parse: Callable[[Request], Awaitable[JobSpec]]
) -> Response:
    """Validate, queue, wait (or stream), answer; every outcome logs one line."""
    record = RequestLog(state, endpoint)
    try:
        record.spec = spec = await parse(request)
        record.job = job = state.batcher.make_job(record.id, spec.key, spec.rows, state.settings.timeout_s)
        if spec.stream:
            return stream_job(state, request, record)
        state.batcher.submit(job)
        images = await wait_for_job(state, request, job)
        body = await asyncio.to_thread(encode_response, state, request, spec, images)
    except APIError as err:
        record.finish(err.status, err.code)
        return JSONResponse(err.body(), err.status, headers={**err.headers, "X-Request-Id": record.id})
    except ClientGone:
        record.finish(499, "client_disconnected")
        return Response(status_code=499)
    except Exception:  # a bug: still one log line, then the 500 handler answers
        record.finish(500, "internal_error")
        raise
    record.finish(200)
    return JSONResponse(body, headers={"X-Request-Id": record.id})


async def wait_for_job(state: ServerState, request: Request, job: Job) -> list[Any]:
    """The job's images; 504 past its deadline, ClientGone if the client left. Either way the work is dropped."""
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {result, gone}, timeout=max(0.0, job.deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
        if not result.done():  # timed out, client gone, or this handler cancelled: nobody takes the images
            state.batcher.cancel(job)
    if result in done:
        return result.result()
    if gone in done:
        raise ClientGone
    raise APIError(f"the request took longer than {state.settings.timeout_s:g} s", 504, code="deadline_exceeded")


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_items(state: ServerState, request: Request, spec: JobSpec, images: list[Any]) -> list[dict[str, Any]]:
    """One OpenAI `data` item per image (b64_json or url), with its seed."""
    items = []
    for row, image in zip(spec.rows, images, strict=True):
        png = png_bytes(image)
        if spec.response_format == "url":
            token = state.store.put(png)
            item = {"url": f"{str(request.base_url).rstrip('/')}{FILES_PREFIX}{token}.png"}
        else:
            item = {"b64_json": base64.b64encode(png).decode("ascii")}
        items.append({**item, "revised_prompt": None, "seed": row.seed})
    return items


def encode_response(state: ServerState, request: Request, spec: JobSpec, images: list[Any]) -> dict[str, Any]:
    return {
        "created": int(time.time()),
        "data": encode_items(state, request, spec, images),
        "model": spec.model,
        "size": spec.size,
        "output_format": "png",
    }


# ---------------------------------------------------------------------------------------------- streaming


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def stream_job(state: ServerState, request: Request, record: RequestLog) -> StreamingResponse:
    """Queue the job and answer server-sent events as it moves (429/503 still answer plain JSON errors)."""
    job = record.job
    assert job is not None
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    job.listener = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    position = state.batcher.submit(job)
    return StreamingResponse(
        stream_events(state, request, record, events, position),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Request-Id": record.id},
    )


async def stream_events(
    state: ServerState, request: Request, record: RequestLog, events: asyncio.Queue, position: int
):
    """queued -> started -> progress... -> image_generation.completed (one per image) -> done; or error. A
    keep-alive comment every KEEPALIVE_S while nothing happens; the work is dropped when the client leaves."""
    job, spec = record.job, record.spec
    status, code = 200, None
    try:
        yield sse("queued", {"type": "queued", "id": record.id, "position": position})
        result = asyncio.wrap_future(job.future)
        while not result.done():
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                raise APIError(f"the request took longer than {state.settings.timeout_s:g} s", 504,
                               code="deadline_exceeded")
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({result, getter}, timeout=min(KEEPALIVE_S, remaining),
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                event = getter.result()
                yield sse(event["type"], event)
                continue
            getter.cancel()
            if not done:
                yield ": keep-alive\n\n"
        while not events.empty():
            event = events.get_nowait()
            yield sse(event["type"], event)
        items = await asyncio.to_thread(encode_items, state, request, spec, result.result())
        for i, item in enumerate(items):
            yield sse("image_generation.completed", {
                "type": "image_generation.completed", "index": i, **item, "size": spec.size,
                "output_format": "png", "created_at": int(time.time()),
            })
        yield sse("done", {"type": "done", "id": record.id, "images": len(items)})
    except APIError as err:
        status, code = err.status, err.code
        yield sse("error", err.body())
    except (asyncio.CancelledError, GeneratorExit):
        status, code = 499, "client_disconnected"
        raise
    finally:
        if not job.future.done():
            state.batcher.cancel(job)
        record.finish(status, code)


# ---------------------------------------------------------------------------------------------- models, health, page


def add_info_routes(app: FastAPI, state: ServerState) -> None:
    def model_object(adapter: ModelAdapter) -> dict[str, Any]:
        return {"id": adapter.id, "object": "model", "created": state.created, "owned_by": "t2i", "t2i": adapter.info()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(a) for a in state.adapters.values()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in state.adapters:
            raise APIError(f"model: unknown model {model_id!r}", 404, param="model", code="model_not_found")
        return model_object(state.adapters[model_id])

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        accepting = state.batcher.accepting
        body = {"status": "ok" if accepting else "draining", "auth": bool(state.settings.api_key)}
        return JSONResponse(body, 200 if accepting else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/")
    async def page() -> Response:
        return Response(state.static["index.html"], media_type="text/html; charset=utf-8")

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise APIError(f"static file {name!r}: not found", 404, code="not_found")
        return Response(state.static[name], media_type=f"{STATIC_FILES[name]}; charset=utf-8")
