"""A small OpenAI-compatible completions server over a local transformers model, for tests.

It behaves like llama.cpp's server where that matters (top-k keyed by detokenized text with
special tokens as "", raw logprobs whatever the logit_bias, /extras/tokenize) with OpenAI's echo
layout, and can be told to fail: answer `status` (with Retry-After) for a number of calls, or
drop connections, from a given completion call on.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


@dataclass
class Fault:
    start: int  # first completion call (0-based) that fails
    count: int  # how many calls fail; a large number = forever
    status: int = 429  # 0 = close the connection without answering
    retry_after: str | None = None


def token_text(tokenizer, token_id: int) -> str:
    if token_id in tokenizer.all_special_ids:
        return ""
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False).replace("\ufffd", "")


class FakeOpenAI:
    def __init__(self, model, tokenizer, api_key: str | None = None):
        self.model, self.tokenizer, self.api_key = model, tokenizer, api_key
        self.completions = 0  # completion calls received
        self.payloads: list[dict] = []
        self.auth_headers: list[str | None] = []
        self.client_ports: set[int] = set()  # one per TCP connection a client opened
        self.fault: Fault | None = None
        self.refuse: str | None = None  # text prompts holding this are answered 400 (as too long for the context)
        self.delay = 0.0  # seconds each completion takes, so that concurrent calls overlap
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def key(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else token_text(self.tokenizer, token_id)

    def top(self, logprobs: torch.Tensor, k: int, actual: int, as_ids: bool) -> dict:
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
        entry = {}
        for value, token_id in reversed(list(zip(values.tolist(), ids.tolist()))):  # llama.cpp: lowest wins
            entry[self.key(token_id, as_ids)] = value
        entry[self.key(actual, as_ids)] = float(logprobs[actual])
        return entry

    def complete(self, body: dict) -> dict:
        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        biased = logprobs[-1].clone()
        for token_id, bias in (body.get("logit_bias") or {}).items():
            biased[int(token_id)] += float(bias)
        chosen = int(biased.argmax())
        k, as_ids = int(body.get("logprobs") or 0), bool(body.get("return_tokens_as_token_ids"))
        entries, tokens = [], []
        if body.get("echo"):
            for i, token_id in enumerate(ids):
                tokens.append(self.key(token_id, as_ids))
                entries.append(None if i == 0 else self.top(logprobs[i - 1], k, token_id, as_ids))
        tokens.append(self.key(chosen, as_ids))
        entries.append(self.top(logprobs[-1], k, chosen, as_ids))
        text = self.tokenizer.decode([chosen], skip_special_tokens=True)
        return {"object": "text_completion", "model": "fake",
                "choices": [{"index": 0, "text": text, "finish_reason": "length",
                             "logprobs": {"tokens": tokens, "top_logprobs": entries}}]}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):
                pass

            def answer(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self.answer(200, {"data": [{"id": "fake", "max_model_len": 256}]})
                else:
                    self.answer(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/extras/tokenize":
                    ids = server.tokenizer(body["input"], add_special_tokens=False)["input_ids"]
                    return self.answer(200, {"tokens": ids})
                if self.path != "/v1/completions":
                    return self.answer(404, {"error": {"message": "not found"}})
                with server.lock:
                    call = server.completions
                    server.completions += 1
                    server.payloads.append(body)
                    server.auth_headers.append(self.headers.get("Authorization"))
                    server.client_ports.add(self.client_address[1])
                fault = server.fault
                if fault and fault.start <= call < fault.start + fault.count:
                    if fault.status == 0:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                    return self.answer(fault.status, {"error": {"message": "slow down", "type": "rate_limit"}}, headers)
                if server.refuse and isinstance(body["prompt"], str) and server.refuse in body["prompt"]:
                    return self.answer(400, {"error": {"message": "the prompt exceeds the context", "type": "invalid"}})
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self.answer(401, {"error": {"message": "bad key"}})
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    answer = server.complete(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                self.answer(200, answer)

        return Handler
