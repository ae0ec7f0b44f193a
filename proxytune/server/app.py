"""The HTTP routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(and vLLM's tokenizer routes, tokenizer_api.py).

Handlers only check, tokenize and format; the engine thread (scheduler.py) does every forward.
Errors of every kind (bad JSON, bad fields, wrong key, unknown route, a full queue) answer in
OpenAI's schema and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.context import context_length
from ..engine.prompts import ALL_ROLES
from . import openai_format as fmt
from .api_errors import APIError
from .guard import LocalGuard, allowed_hosts
from .openai_format import Shape, TokenLogprob, TokenStrings
from .scheduler import Job, Scheduler
from .limits import parse_json, read_body
from .schemas import Params, PromptRows, build, parse
from .timeouts import SendTimeout
from .tokenizer_api import add_tokenizer_routes

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}  # OpenAI's legacy default; chat: a reply's worth
MAX_ECHO_TOKENS = 32_768  # prompt tokens one echo request may have scored (each position's logprobs are kept)


def generation_failed(reason: str) -> APIError:
    """A row ended with finish_reason "error" (a model stopped answering, its logits were unusable)."""
    return APIError(500, f"generation failed: {reason}", code="generation_failed")


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


UI = Path(__file__).parent / "ui"
# the page loads nothing from elsewhere and talks only to this server
PAGE_POLICY = {"Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; "
                                          "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def add_playground(app: FastAPI) -> None:
    """The playground page at / and its two files under /ui/ (inside the package; no build step, no CDN).
    The page is public like /health: it holds no data, and the API calls it makes carry the key typed into it."""
    files = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}

    def page(name: str) -> Response:
        return Response((UI / name).read_bytes(), media_type=files[name], headers=PAGE_POLICY)

    @app.get("/", include_in_schema=False)
    async def playground():
        return page("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def playground_file(name: str):
        if name not in files:
            raise APIError(404, f"unknown route GET /ui/{name}")
        return page(name)


def create_app(tuner, served_names: Sequence[str] = ("proxytune",), api_key: str | None = None,
               max_batch: int = 32, max_queue: int = 64, request_timeout: float = 600.0,
               chat_roles: Sequence[str] = ALL_ROLES, host: str = "127.0.0.1",
               allowed: Sequence[str] = (), max_echo_tokens: int = MAX_ECHO_TOKENS, ui: bool = True) -> FastAPI:
    scheduler = Scheduler(tuner, max_batch=max_batch, max_queue=max_queue, request_timeout=request_timeout)
    context = context_length(tuner.sources)
    text_of = TokenStrings(tuner.tokenizer)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="proxytune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.add_middleware(LocalGuard, hosts=allowed_hosts(host, allowed))
    app.add_middleware(SendTimeout)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        message = {404: f"unknown route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(error).__name__}: {error}").body(), status_code=500)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "proxytune",
                "proxytune": {"roles": {role: getattr(s, "name", role) for role, s in tuner.sources.items()},
                              "alpha": tuner.alphas, "context_length": context}}

    add_tokenizer_routes(app, tuner, authorize, context)
    if ui:
        add_playground(app)

    @app.get("/health")
    async def health():
        state = scheduler.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card(name) for name in served_names]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(name: str):
        if name not in served_names:
            raise APIError(404, f"unknown model {name!r}", "model", "model_not_found")
        return model_card(name)

    async def handle(request: Request, kind: str):
        raw = await read_body(request)
        # parsing, tokenizing and compiling a format never block the loop (a 16 MB body takes a while)
        params = await run_in_threadpool(lambda: parse(parse_json(raw), kind, list(served_names), len(tuner.pairs),
                                                       max_batch, context, DEFAULT_MAX_TOKENS[kind]))
        rows = await run_in_threadpool(build, tuner, params, chat_roles)
        echo_top = params.top_logprobs if params.echo and params.logprobs else None
        echo_tokens = sum(len(r.prompt_ids) for r in rows) if echo_top is not None else 0
        if echo_tokens > max_echo_tokens:
            raise APIError(400, f"echo with logprobs scores at most {max_echo_tokens} prompt tokens per request, "
                                f"these prompts have {echo_tokens}: split them over several requests", "prompt")
        job = scheduler.submit(rows, echo_top, generates=params.max_tokens > 0, client=client_of(request, params))
        shape = Shape(kind, params.model)
        if params.stream:
            return JobStream(job, stream(job, shape, params, rows))
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            answer = await respond(job, shape, params, rows)
            if isinstance(answer, Response):
                return answer
            return await run_in_threadpool(JSONResponse, answer)  # a large answer is serialised off the loop
        finally:
            watcher.cancel()
            job.cancel()

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    # --- answers -----------------------------------------------------------------------------------

    def logprobs_of(positions: list[TokenLogprob], kind: str, offset: int = 0) -> dict:
        if kind == "chat":
            return fmt.chat_logprobs(positions, text_of)
        return fmt.completion_logprobs(positions, text_of, offset)

    def generated_positions(token_ids, logprobs, details, top: int) -> list[TokenLogprob]:
        # details exist when top_logprobs > 0 (or `details` asked); they may hold one more step (the EOS)
        return [TokenLogprob(t, lp, details[i].top_logprobs[:top] if details else [])
                for i, (t, lp) in enumerate(zip(token_ids, logprobs))]

    def details_of(params: Params, details) -> list | None:
        return [fmt.token_details(d, text_of) for d in details or []] if params.details else None

    async def respond(job: Job, shape: Shape, params: Params, rows: list[PromptRows]):
        prompt_positions, outputs = None, None
        while outputs is None:
            kind, value = await job.queue.get()
            if kind == "gone":
                return Response(status_code=499)  # nobody is listening; the rows were freed
            if kind == "error":
                raise value
            if kind == "prompt":
                prompt_positions = value
            elif kind == "done":
                outputs = value
        failed = next((o for o in outputs if o.finish_reason == "error"), None)
        if failed is not None and failed.error_field is not None:  # the request's own setting gave out mid-way
            raise APIError(400, f"generation stopped: {failed.error}", failed.error_field, "format_too_complex")
        if failed is not None:  # never a 200 with empty or cut text: the reason, readable
            raise generation_failed(failed.error or "a model stopped answering")
        choices = []
        for p, prompt in enumerate(rows):
            for c in range(params.n):
                index = p * params.n + c
                output = outputs[index] if outputs else None
                text = output.text if output else ""
                positions = [] if output is None else generated_positions(
                    output.token_ids, output.logprobs, output.details, params.top_logprobs)
                if params.echo:
                    text = prompt.text + text
                    positions = (prompt_positions[p] if prompt_positions else []) + positions
                logprobs = logprobs_of(positions, params.kind) if params.logprobs else None
                reason = fmt.public_finish_reason(output.finish_reason) if output else "length"
                choices.append(shape.choice(index, text, reason, logprobs,
                                            details_of(params, output.details if output else None)))
        completion_tokens = sum(len(o.token_ids) for o in outputs)
        return shape.response(choices, fmt.usage(sum(len(r.prompt_ids) for r in rows), completion_tokens))

    async def stream(job: Job, shape: Shape, params: Params, rows: list[PromptRows]):
        n_choices = len(job.requests)
        usage_null = params.include_usage
        if params.kind == "chat":
            for index in range(n_choices):
                yield shape.chunk([shape.chunk_choice(index, "", role=True)], usage_null)
        offsets = [0] * n_choices
        if params.echo:
            for index in range(n_choices):
                offsets[index] = len(rows[index // params.n].text)
                yield shape.chunk([shape.chunk_choice(index, rows[index // params.n].text)], usage_null)
        completion_tokens = 0
        while True:
            kind, value = await job.queue.get()
            if kind == "error":
                yield fmt.sse(value.body())
                return
            if kind == "done":
                if not value:  # echo with max_tokens 0: the prompt was all there was to send
                    for index in range(n_choices):
                        yield shape.chunk([shape.chunk_choice(index, "", "length")], usage_null)
                break
            if kind != "events":
                continue
            for index, event in value:
                logprobs, details = None, None
                if event.token_id is not None:
                    completion_tokens += 1
                    if params.logprobs:
                        step = [event.detail] if event.detail else None
                        positions = generated_positions([event.token_id], [event.logprob], step, params.top_logprobs)
                        logprobs = logprobs_of(positions, params.kind, offsets[index])
                        offsets[index] += len(text_of(event.token_id))
                    details = details_of(params, [event.detail] if event.detail else None)
                if event.delta or logprobs or details:
                    yield shape.chunk([shape.chunk_choice(index, event.delta, None, logprobs, details=details)],
                                      usage_null)
                if event.finish_reason == "error":  # the text so far was sent; then the reason, and the end
                    yield fmt.sse(generation_failed(event.error or "a model stopped answering").body())
                    return
                if event.finish_reason:
                    empty = None if params.kind == "chat" else ""
                    reason = fmt.public_finish_reason(event.finish_reason)
                    yield shape.chunk([shape.chunk_choice(index, empty, reason)], usage_null)
        if params.include_usage:
            prompt_tokens = sum(len(r.prompt_ids) for r in rows)
            yield shape.chunk([], True, fmt.usage(prompt_tokens, completion_tokens))
        yield fmt.DONE

    return app
