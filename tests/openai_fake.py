"""A small OpenAI-compatible completions server over a local transformers model, for tests.

It behaves like llama.cpp's server where that matters (top-k keyed by detokenized text with
special tokens as "", raw logprobs whatever the logit_bias, /extras/tokenize, generation that stops
at a special token without reporting it, the sampled token added to its top-k entry) with OpenAI's
echo layout. It continues a prompt by max_tokens tokens: greedy at temperature 0 (after logit_bias),
else a seeded sample at that temperature from its top_k (0: all) — every position from its own
forward over the whole prefix, so a long continuation sees exactly what one-token calls see.

It can be told to fail: answer `status` (with Retry-After) for a number of calls, or drop connections,
from a given completion call on; cap the logprobs per entry (`logprobs_cap`, as OpenAI's 5) or the
entries per answer (`entries_cap`); steer its own continuation (`steer`: ids -> forced next id).
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
        self.logprobs_cap: int | None = None
        self.entries_cap: int | None = None
        self.steer = None  # callable(ids) -> a token id the server's own continuation must take, or None
        self.chat_only = False  # only /v1/chat/completions (as many hosted models): completions answer 404
        self.refuse_fields: set[str] = set()  # request fields answered 400 (as OpenAI does with unknown ones)
        self.generated = 0  # tokens continued, all calls together
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

    def next_logprobs(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)

    def complete(self, body: dict) -> dict:
        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        k, as_ids = int(body.get("logprobs") or 0), bool(body.get("return_tokens_as_token_ids"))
        if self.logprobs_cap is not None:
            k = min(k, self.logprobs_cap)
        temperature = float(body.get("temperature", 1.0))
        top_k = int(body.get("top_k") or 0)
        generator = torch.Generator().manual_seed(int(body.get("seed") or 0))
        bias = torch.zeros(len(self.tokenizer))
        for token_id, value in (body.get("logit_bias") or {}).items():
            bias[int(token_id)] += float(value)
        entries, tokens, token_logprobs = [], [], []
        if body.get("echo"):
            with torch.inference_mode():
                logprobs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)
            for i, token_id in enumerate(ids):
                tokens.append(self.key(token_id, as_ids))
                entries.append(None if i == 0 else self.top(logprobs[i - 1], k, token_id, as_ids))
                token_logprobs.append(None if i == 0 else float(logprobs[i - 1, token_id]))
        generated, finish = [], "length"
        special = set(self.tokenizer.all_special_ids)
        for _ in range(max(1, int(body.get("max_tokens") or 1))):
            logprobs = self.next_logprobs(ids + generated)
            biased = logprobs + bias
            if temperature == 0:
                chosen = int(biased.argmax())
            else:
                z = biased / temperature
                if top_k > 0:
                    z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
                chosen = int(torch.multinomial(torch.softmax(z, -1), 1, generator=generator))
            forced = self.steer(ids + generated) if self.steer else None
            chosen = chosen if forced is None else forced
            if chosen in special and not body.get("echo"):  # llama.cpp: an end of generation is not reported
                finish = "stop"
                break
            tokens.append(self.key(chosen, as_ids))
            entries.append(self.top(logprobs, k, chosen, as_ids))
            token_logprobs.append(float(logprobs[chosen]))
            generated.append(chosen)
        with self.lock:
            self.generated += len(generated)
        if self.entries_cap is not None:
            start = len(entries) - len(generated)
            entries = entries[:start + self.entries_cap]
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return {"object": "text_completion", "model": "fake",
                "choices": [{"index": 0, "text": text, "finish_reason": finish,
                             "logprobs": {"tokens": tokens, "token_logprobs": token_logprobs,
                                          "top_logprobs": entries}}]}

    def chat(self, body: dict) -> dict:
        """A chat completion: the conversation rendered with the tokenizer's template, then continued; the
        logprobs in the chat layout (a list of {token, logprob} per reply token, best first)."""
        ids = self.tokenizer.apply_chat_template(body["messages"], tokenize=True, add_generation_prompt=True,
                                                 return_dict=False)
        choice = self.complete({**body, "prompt": list(ids), "logprobs": body.get("top_logprobs") or 0})["choices"][0]
        content = [{"token": token, "logprob": logprob, "bytes": None,
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": None}
                                     for t, v in sorted(top.items(), key=lambda item: -item[1])]}
                   for token, logprob, top in zip(choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"],
                                                  choice["logprobs"]["top_logprobs"])]
        return {"object": "chat.completion", "model": "fake",
                "choices": [{"index": 0, "finish_reason": choice["finish_reason"],
                             "message": {"role": "assistant", "content": choice["text"]},
                             "logprobs": {"content": content}}]}

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
                chat = self.path == "/v1/chat/completions"
                if not chat and (self.path != "/v1/completions" or server.chat_only):
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
                unknown = sorted(server.refuse_fields & set(body))
                if unknown:
                    return self.answer(400, {"error": {"message": f"Unrecognized request argument supplied: {unknown[0]}",
                                                       "type": "invalid_request_error"}})
                if server.refuse and isinstance(body.get("prompt"), str) and server.refuse in body["prompt"]:
                    return self.answer(400, {"error": {"message": "the prompt exceeds the context", "type": "invalid"}})
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self.answer(401, {"error": {"message": "bad key"}})
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    answer = server.chat(body) if chat else server.complete(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                self.answer(200, answer)

        return Handler
