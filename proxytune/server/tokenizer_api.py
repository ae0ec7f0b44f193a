"""vLLM's tokenizer endpoints (/tokenizer_info, /tokenize, /detokenize) over the base model's tokenizer.

lm-eval's `local-completions` looks for them: with them it counts context tokens through the server
and needs no local copy of the tokenizer (and no model hub).
"""
from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from .api_errors import bad_request
from .schemas import parse_json, read_body


def add_tokenizer_routes(app: FastAPI, tuner, authorize, context: int | None) -> None:
    tokenizer = tuner.tokenizer

    @app.get("/tokenizer_info", dependencies=[Depends(authorize)])
    async def tokenizer_info():
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "chat_template": getattr(tokenizer, "chat_template", None), "model_max_length": context}

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(request: Request):
        raw = await read_body(request)
        body = parse_json(raw)
        prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(prompt, str):
            raise bad_request("prompt must be a string", "prompt")
        if not isinstance(special, bool):
            raise bad_request("add_special_tokens must be true or false", "add_special_tokens")
        tokens = (await run_in_threadpool(tokenizer, prompt, add_special_tokens=special))["input_ids"]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": context}

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(request: Request):
        raw = await read_body(request)
        tokens = parse_json(raw).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens) \
                or any(t < 0 or t >= len(tokenizer) for t in tokens):
            raise bad_request(f"tokens must be a list of token ids in [0, {len(tokenizer)})", "tokens")
        return {"prompt": tokenizer.decode(tokens)}
