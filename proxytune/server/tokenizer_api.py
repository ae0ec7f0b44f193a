"""vLLM's tokenizer endpoints (/tokenizer_info, /tokenize, /detokenize) over the base model's tokenizer.

lm-eval's `local-completions` looks for them: with them it counts context tokens through the server
and needs no local copy of the tokenizer (and no model hub).
"""
from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .api_errors import bad_request
from .limits import MAX_PROMPT_CHARS, check_tree, parse_json, read_body, too_much

MAX_TOKENIZER_BODY = 8 * MAX_PROMPT_CHARS  # a prompt of MAX_PROMPT_CHARS characters, escaped in JSON
MAX_DETOKENIZE_IDS = 1 << 16  # checked and decoded in ~50 ms


def add_tokenizer_routes(app: FastAPI, tuner, authorize, context: int | None) -> None:
    tokenizer = tuner.tokenizer

    @app.get("/tokenizer_info", dependencies=[Depends(authorize)])
    async def tokenizer_info():
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "chat_template": getattr(tokenizer, "chat_template", None), "model_max_length": context}

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(request: Request):
        raw = await read_body(request, MAX_TOKENIZER_BODY)
        return await run_in_threadpool(tokenize_body, tokenizer, raw, context)  # never on the event loop

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(request: Request):
        raw = await read_body(request, MAX_TOKENIZER_BODY)
        return await run_in_threadpool(detokenize_body, tokenizer, raw)


def tokenize_body(tokenizer, raw: bytes, context: int | None) -> JSONResponse:
    body = parse_json(raw)
    prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
    if not isinstance(prompt, str):
        raise bad_request("prompt must be a string", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise too_much("prompt", f"holds {len(prompt)} characters", MAX_PROMPT_CHARS, "MAX_PROMPT_CHARS")
    if not isinstance(special, bool):
        raise bad_request("add_special_tokens must be true or false", "add_special_tokens")
    check_tree(body)
    tokens = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": context})


def detokenize_body(tokenizer, raw: bytes) -> JSONResponse:
    body = parse_json(raw)
    tokens = body.get("tokens")
    if isinstance(tokens, list) and len(tokens) > MAX_DETOKENIZE_IDS:
        raise too_much("tokens", f"holds {len(tokens)} ids", MAX_DETOKENIZE_IDS, "MAX_DETOKENIZE_IDS")
    check_tree(body)
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens) \
            or any(t < 0 or t >= len(tokenizer) for t in tokens):
        raise bad_request(f"tokens must be a list of token ids in [0, {len(tokenizer)})", "tokens")
    return JSONResponse({"prompt": tokenizer.decode(tokens)})
