"""The HTTP routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(and vLLM's tokenizer routes, tokenizer_api.py; the playground page at /).

Handlers only check, tokenize and format; the engine thread (scheduler.py) does every forward, and
responses.py turns what it reports into OpenAI's bodies and stream chunks. What the handlers share (the
tuner, its scheduler, the served names, the limits) is one ServerState on app.state, handed to them by the
`server_of` dependency. Errors of every kind (bad JSON, bad fields, wrong key, unknown route, a full queue)
answer in OpenAI's schema and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.context import context_length
from ..engine.prompts import ALL_ROLES
from ..engine.settings import check_mode
from .api_errors import APIError
from .guard import LocalGuard, allowed_hosts
from .limits import parse_json, read_body
from .openai_format import Shape, TokenStrings
from .responses import Reply, prompt_tokens, respond, stream
from .scheduler import Job, Scheduler
from .schemas import Params, PromptRows, build, parse
from .timeouts import SendTimeout
from .tokenizer_api import add_tokenizer_routes

if TYPE_CHECKING:
    from ..facade.tuner import ProxyTuner

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}  # OpenAI's legacy default; chat: a reply's worth
MAX_ECHO_TOKENS = 32_768  # prompt tokens one echo request may have scored (each position's logprobs are kept)


@dataclass
class ServerState:
    """What the handlers share, fixed when the app is made."""
    tuner: ProxyTuner
    scheduler: Scheduler
    served_names: Sequence[str]
    chat_roles: Sequence[str]
    api_key: str | None
    max_batch: int  # rows one request may ask for (prompts x n)
    max_echo_tokens: int
    context: int | None  # the models' context length, when they tell it
    text_of: TokenStrings
    created: int  # the models' "created" time: when the server started
    decoding: str = "plain"  # the decoding mode of requests that do not name one (engine/settings.MODES)


def create_app(tuner, served_names: Sequence[str] = ("proxytune",), api_key: str | None = None,
               max_batch: int = 32, max_queue: int = 64, request_timeout: float = 600.0,
               chat_roles: Sequence[str] = ALL_ROLES, host: str = "127.0.0.1",
               allowed: Sequence[str] = (), max_echo_tokens: int = MAX_ECHO_TOKENS, ui: bool = True,
               decoding: str = "plain") -> FastAPI:
    """The server over one tuner; its state (ServerState) is app.state.server, its engine thread starts and
    stops with the app (lifespan). `decoding`: the mode of requests that do not name one."""
    server = ServerState(
        tuner=tuner, scheduler=Scheduler(tuner, max_batch=max_batch, max_queue=max_queue,
                                         request_timeout=request_timeout),
        served_names=served_names, chat_roles=chat_roles, api_key=api_key, max_batch=max_batch,
        max_echo_tokens=max_echo_tokens, context=context_length(tuner.sources),
        text_of=TokenStrings(tuner.tokenizer), created=int(time.time()), decoding=check_mode(decoding))
    app = FastAPI(title="proxytune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(LocalGuard, hosts=allowed_hosts(host, allowed))
    app.add_middleware(SendTimeout)
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    add_tokenizer_routes(app, tuner, authorize, server.context)
    if ui:
        app.include_router(playground)
    app.include_router(routes)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI):
    scheduler = app.state.server.scheduler
    scheduler.start()
    yield
    scheduler.stop()


async def server_of(request: Request) -> ServerState:
    # async: FastAPI runs a plain-def dependency in its thread pool, a thread hop for a field read
    return request.app.state.server


async def authorize(request: Request, server: ServerState = Depends(server_of)) -> None:
    if server.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
        raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


# --- routes (no return annotations: FastAPI would take one as a response model and re-validate) ----------

routes = APIRouter()


@routes.get("/health")
async def health(server: ServerState = Depends(server_of)):
    state = server.scheduler.health()
    return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)


@routes.get("/v1/models", dependencies=[Depends(authorize)])
async def models(server: ServerState = Depends(server_of)):
    return {"object": "list", "data": [model_card(server, name) for name in server.served_names]}


@routes.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
async def model(name: str, server: ServerState = Depends(server_of)):
    if name not in server.served_names:
        raise APIError(404, f"unknown model {name!r}", "model", "model_not_found")
    return model_card(server, name)


@routes.post("/v1/completions", dependencies=[Depends(authorize)])
async def completions(request: Request, server: ServerState = Depends(server_of)):
    return await handle(request, server, "completion")


@routes.post("/v1/chat/completions", dependencies=[Depends(authorize)])
async def chat_completions(request: Request, server: ServerState = Depends(server_of)):
    return await handle(request, server, "chat")


def model_card(server: ServerState, name: str) -> dict:
    tuner = server.tuner
    return {"id": name, "object": "model", "created": server.created, "owned_by": "proxytune",
            "proxytune": {"roles": {role: getattr(s, "name", role) for role, s in tuner.sources.items()},
                          "alpha": tuner.alphas, "context_length": server.context}}


# --- a completion request ----------------------------------------------------------------------------

async def handle(request: Request, server: ServerState, kind: str):
    raw = await read_body(request)
    # parsing, tokenizing and compiling a format never block the loop (a 16 MB body takes a while)
    params = await run_in_threadpool(params_of, server, raw, kind)
    rows = await run_in_threadpool(build, server.tuner, params, server.chat_roles)
    job = submit(request, server, params, rows)
    reply = Reply(Shape(kind, params.model), params, rows, server.text_of)
    if params.stream:
        return JobStream(job, stream(job, reply))
    return await answer(request, job, reply)


def params_of(server: ServerState, raw: bytes, kind: str) -> Params:
    return parse(parse_json(raw), kind, list(server.served_names), len(server.tuner.pairs), server.max_batch,
                 server.context, DEFAULT_MAX_TOKENS[kind], server.decoding)


def submit(request: Request, server: ServerState, params: Params, rows: list[PromptRows]) -> Job:
    echo_top = params.top_logprobs if params.echo and params.logprobs else None
    echo_tokens = prompt_tokens(rows) if echo_top is not None else 0
    if echo_tokens > server.max_echo_tokens:
        raise APIError(400, f"echo with logprobs scores at most {server.max_echo_tokens} prompt tokens per request, "
                            f"these prompts have {echo_tokens}: split them over several requests", "prompt")
    return server.scheduler.submit(rows, echo_top, generates=params.max_tokens > 0, client=client_of(request, params))


async def answer(request: Request, job: Job, reply: Reply) -> Response:
    """A non-streaming answer; the job is cancelled when the client leaves first, and in any case at the end."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    try:
        body = await respond(job, reply)
        if isinstance(body, Response):
            return body
        return await run_in_threadpool(JSONResponse, body)  # a large answer is serialised off the loop
    finally:
        watcher.cancel()
        job.cancel()


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Non-streaming requests: the client may time out and close while its rows decode. Once the body is
    read, the next ASGI message is the disconnect: the job is cancelled and its rows leave at the next step."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            job.queue.put_nowait(("gone", None))
            return


class JobStream(StreamingResponse):
    """An SSE response that cancels its job however it ends (done, client gone, server stopping)."""

    def __init__(self, job: Job, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        response = asyncio.ensure_future(super().__call__(scope, receive, send))
        dropped = asyncio.ensure_future(self.job.dropped.wait())
        try:
            await asyncio.wait({response, dropped}, return_when=asyncio.FIRST_COMPLETED)
            if not response.done():  # its reader fell too far behind (scheduler.MAX_PENDING_ITEMS): stop sending
                response.cancel()
                await asyncio.gather(response, return_exceptions=True)
            else:
                response.result()
        finally:
            dropped.cancel()
            self.job.cancel()


def client_of(request: Request, params: Params) -> str:
    """Who sent it, for fair admission: OpenAI's `user` field when given, else the peer's address."""
    if params.user:
        return f"user:{params.user}"
    return f"peer:{request.client.host if request.client else '?'}"


# --- the playground: a page at / and its files under /ui/ (inside the package; no build step, no CDN) ------
# The page is public like /health: it holds no data, and the API calls it makes carry the key typed into it.

UI = Path(__file__).parent / "ui"
# the page loads nothing from elsewhere and talks only to this server
PAGE_POLICY = {"Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; "
                                          "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

playground = APIRouter()
PLAYGROUND_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


@playground.get("/", include_in_schema=False)
async def playground_page():
    return page("index.html")


@playground.get("/ui/{name}", include_in_schema=False)
async def playground_file(name: str):
    if name not in PLAYGROUND_FILES:
        raise APIError(404, f"unknown route GET /ui/{name}")
    return page(name)


def page(name: str) -> Response:
    return Response((UI / name).read_bytes(), media_type=PLAYGROUND_FILES[name], headers=PAGE_POLICY)


# --- errors, all in OpenAI's schema ------------------------------------------------------------------

async def api_error(request: Request, error: APIError):
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def http_error(request: Request, error: StarletteHTTPException):
    message = {404: f"unknown route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
    return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code,
                        headers=getattr(error, "headers", None))


async def unexpected(request: Request, error: Exception):
    return JSONResponse(APIError(500, f"internal error: {type(error).__name__}: {error}").body(), status_code=500)


ERROR_HANDLERS = {APIError: api_error, StarletteHTTPException: http_error, Exception: unexpected}
