"""A model behind an OpenAI-compatible server (llama.cpp, vLLM, a hosted API) as a logit source.

The server only ever gives top-k logprobs keyed by token text, so each step's logit row holds the
returned candidates and −inf elsewhere (see token_strings.logit_row); the decoder then adds
α(z_expert − z_anti_expert) on exactly those candidates, as the paper does for GPT-3.5.

Cost: one /v1/completions call (max_tokens 1, logprobs k) per generated token per row, the rows
of a batch in flight concurrently over one pooled connection. The session keeps each row's token
ids; the server is stateless for us (it may reuse its prompt cache).

Token fidelity: text is what most servers accept, so each call sends the decoded token sequence.
If re-tokenising that text would not give back exactly the chosen ids, the server would condition
on a different sequence than the one decoded: that *drift* is detected locally (the local tokenizer
is checked against the server's at start-up) and warned about or raised (`drift=`), and
`send_ids=1` avoids it on servers that accept token ids (vLLM, OpenAI).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from ...errors import ProxyTuneError, RowFailure, SourceFailure
from ..protocol import Capabilities
from .http import OpenAIClient, RemoteRefusal, RemoteSourceError, httpx
from .spec import RemoteOptions
from .token_strings import RowStats, TokenStrings, logit_row

log = logging.getLogger("proxytune.remote")

PROBES = ["Hello, world! How are you today?", "  two spaces,\ttabs\nand\n\nnew lines.",
          "3.14159 * 2 = 6.28318; x_1 += 42", "def f(x):\n    return x ** 2  # square\n",
          "naïve café — Zürich, 東京, emoji 🙂"]


@dataclass
class RemoteStats:
    calls: int = 0  # HTTP requests answered (retries included)
    retries: int = 0
    distributions: int = 0  # next-token distributions delivered to the decoder
    candidates: int = 0
    dropped: int = 0
    empty_as_eos: int = 0
    drift: int = 0  # calls whose text would re-tokenise differently
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def calls_per_token(self) -> float:
        return self.calls / self.distributions if self.distributions else 0.0

    def summary(self, role: str) -> str:
        return (f"{role}: {self.calls} calls for {self.distributions} token distributions "
                f"({self.calls_per_token:.2f} per token), {self.retries} retries, "
                f"{self.candidates / max(1, self.distributions):.1f} candidates per step, "
                f"{self.dropped} top-k entries dropped, {self.drift} re-tokenisation drifts, "
                f"{self.bytes_sent / max(1, self.distributions):.0f} B sent and "
                f"{self.bytes_received / max(1, self.distributions):.0f} B received per token")


class RemoteSource:
    """A LogitSource over /v1/completions. `stats` counts calls and what the mapping dropped."""

    def __init__(self, options: RemoteOptions, tokenizer, name: str = "base", connect: bool = True):
        self.options = options
        self.name = name
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.max_length = options.context
        self.client = OpenAIClient(options.base_url, name, options.api_key(), options.policy,
                                   max_connections=options.concurrency)
        self.strings = TokenStrings.build(tokenizer, self.vocab_size)
        self.eos_token_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        special = sorted({i for i, t in tokenizer.added_tokens_decoder.items() if t.special} |
                         set(tokenizer.all_special_ids))
        self.logit_bias = {str(i): -100 for i in special} if options.hold_eos else {}
        bos = tokenizer.bos_token_id
        # A tokenizer that adds BOS itself serves a model whose server adds it too: send the text without it.
        self.strip_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.model = options.model
        self._stats = RemoteStats()
        self._lock = threading.Lock()
        self._drift_warned = False
        self.pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix=f"proxytune-{name}")
        if connect:
            self.connect()
            if options.verify:
                self.check_tokenizer()
        self._startup_calls = self.client.calls  # stats count decoding calls only
        self._startup_bytes = (self.client.bytes_sent, self.client.bytes_received)

    def __repr__(self) -> str:
        return f"RemoteSource({self.options.base_url!r}, role={self.name!r}, top_k={self.options.top_k})"

    @property
    def stats(self) -> RemoteStats:
        self._stats.calls, self._stats.retries = self.client.calls - self._startup_calls, self.client.retries
        self._stats.bytes_sent = self.client.bytes_sent - self._startup_bytes[0]
        self._stats.bytes_received = self.client.bytes_received - self._startup_bytes[1]
        return self._stats

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()

    # --- start-up ----------------------------------------------------------------------------------

    def connect(self) -> None:
        """Reach the server once (/v1/models): learn the model name and, where given, its context length."""
        url = self.client.url("models")
        try:
            response = self.client.http.get(url)
        except httpx.TransportError as error:
            raise ProxyTuneError(f"cannot reach the {self.name} model's server at {self.options.base_url} "
                                 f"({type(error).__name__}: {error}); is it running?") from None
        if response.status_code in (401, 403):
            raise ProxyTuneError(f"the {self.name} model's server at {self.options.base_url} refused the API key "
                                 f"(HTTP {response.status_code}); set {self.options.key_env}")
        if response.status_code >= 400:
            return  # some servers have no /v1/models; completions may still work
        entries = (response.json() or {}).get("data") or []
        if self.model is None and entries:
            self.model = entries[0].get("id")
        for entry in entries:
            if entry.get("id") == self.model and self.max_length is None:
                self.max_length = entry.get("max_model_len")

    def server_tokens(self, text: str) -> list[int] | list[str]:
        """The server's tokenization of `text`: ids from a tokenize endpoint, else token strings from echo."""
        root = self.options.root_url
        answer = self.client.probe(f"{root}/extras/tokenize", {"input": text})  # llama-cpp-python
        if answer is None:
            answer = self.client.probe(f"{root}/tokenize", {"model": self.model, "prompt": text,  # vLLM
                                                            "add_special_tokens": False})
        if answer is not None and isinstance(answer.get("tokens"), list):
            return [int(t) for t in answer["tokens"]]
        response = self.completion(text, echo=True, logprobs=0)
        return list(response["logprobs"]["tokens"])

    def check_tokenizer(self) -> None:
        probes = list(PROBES)
        if getattr(self.tokenizer, "chat_template", None):
            probes.append(self.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                             tokenize=False, add_generation_prompt=True))
        bos = self.tokenizer.bos_token_id
        for probe in probes:
            local = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
            server = self.server_tokens(probe)
            if server and isinstance(server[0], int):
                if server[:1] == [bos] and local[:1] != [bos]:
                    server = server[1:]
                same = server == local
            else:  # echo gives token strings, at most one per prompt token
                same = server[:len(local)] == [self.strings.texts[i] for i in local]
            if not same:
                raise ProxyTuneError(
                    f"the local tokenizer {self.options.tokenizer!r} does not tokenize like the {self.name} model's "
                    f"server at {self.options.base_url}: {probe!r} -> local {local[:12]} vs server {server[:12]}. "
                    f"Give tokenizer= the served model's own tokenizer (or verify=0 to skip this check)")

    # --- one call ----------------------------------------------------------------------------------

    def wire_prompt(self, ids: Sequence[int]):
        """What to send for these ids: the ids themselves (send_ids=1), or their text, checked for drift."""
        ids = list(ids)
        if self.options.send_ids:
            return ids
        if self.strip_bos and ids[:1] == [self.tokenizer.bos_token_id]:
            ids = ids[1:]
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if self.options.drift != "off":
            again = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if again != ids:
                self._drift(ids, again)
        return text

    def _drift(self, ids: list[int], again: list[int]) -> None:
        at = next((i for i, (a, b) in enumerate(zip(ids, again)) if a != b), min(len(ids), len(again)))
        message = (f"re-tokenisation drift at the {self.name} model ({self.options.base_url}): the chosen tokens "
                   f"{ids[at:at + 4]} re-tokenise as {again[at:at + 4]} (position {at}), so the server conditions "
                   f"on a different token sequence than the one decoded")
        with self._lock:
            self._stats.drift += 1
            first = not self._drift_warned
            self._drift_warned = True
        if self.options.drift == "error":
            raise RemoteSourceError(message + "; drift=warn continues anyway, send_ids=1 avoids it on vLLM/OpenAI")
        if first:
            log.warning("%s (further drifts are only counted)", message)

    def completion(self, prompt, echo: bool = False, logprobs: int | None = None) -> dict:
        payload = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "echo": echo,
                   "logprobs": self.options.top_k if logprobs is None else logprobs, "stream": False}
        if self.model:
            payload["model"] = self.model
        if self.logit_bias:
            payload["logit_bias"] = self.logit_bias
        if self.options.token_ids:
            payload["return_tokens_as_token_ids"] = True
        answer = self.client.post("completions", payload)
        try:
            choice = answer["choices"][0]
            if not isinstance(choice.get("logprobs"), dict):
                raise KeyError("logprobs")
        except (KeyError, IndexError, TypeError):
            raise RemoteSourceError(f"{self.name} model at {self.client.url('completions')} answered without "
                                    f"logprobs ({str(answer)[:200]}); does the server support logprobs?") from None
        return choice

    def _row(self, top: dict | None) -> torch.Tensor:
        if not top:
            raise RemoteSourceError(f"{self.name} model at {self.options.base_url} returned no top-k logprobs "
                                    f"for a step (did it stop? hold_eos=1 keeps llama.cpp from stopping)")
        stats = RowStats()
        row = logit_row(top, self.strings, self.vocab_size, self.options.empty == "eos", stats, self.options.eos_rank)
        with self._lock:
            self._stats.distributions += 1
            self._stats.candidates += stats.candidates
            self._stats.dropped += stats.dropped
            self._stats.empty_as_eos += stats.empty_as_eos
        if stats.candidates == 0:
            raise RemoteSourceError(f"none of the {self.name} model's top-{self.options.top_k} tokens "
                                    f"{list(top)[:5]} maps to a local token id")
        return row

    def next_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """[V]: the distribution after `ids`, restricted to the server's top-k. One call."""
        choice = self.completion(self.wire_prompt(ids))
        return self._row(choice["logprobs"]["top_logprobs"][0] if choice["logprobs"]["top_logprobs"] else None)

    def after_each(self, ids: Sequence[int], first: int) -> list[torch.Tensor]:
        """[V] rows for the distributions after ids[:t], t = first .. len(ids). One echo call.

        OpenAI's layout gives entry i = the distribution that predicts token i (entry 0 empty) and one
        more entry for the generated token. llama-cpp-python without a BOS token returns one entry
        fewer, each shifted by one (entry i predicts token i + 1): told apart by the entry count.
        """
        sent = list(ids)
        if self.strip_bos and sent[:1] == [self.tokenizer.bos_token_id]:
            sent = sent[1:]
        offset = len(ids) - len(sent)
        entries = self.completion(self.wire_prompt(ids), echo=True)["logprobs"]["top_logprobs"]
        n = len(sent)
        shift = 0 if len(entries) >= n + 1 else 1 if len(entries) == n else None
        if shift is None:
            raise RemoteSourceError(f"{self.name} model's echo returned {len(entries)} entries for {n} tokens: "
                                    f"the server tokenized the text differently")
        rows = []
        for t in range(first, len(ids) + 1):
            index = t - offset - shift
            entry = entries[index] if 0 <= index < len(entries) else None
            rows.append(self._row(entry) if entry else torch.full((self.vocab_size,), float("-inf")))
        return rows

    def map_rows(self, function, items: Sequence) -> list:
        """function over the rows of a batch, concurrently. Once every row has answered, rows the server
        refused for their content (RemoteRefusal) are raised together as one RowFailure naming them; any
        other failure (the server is unreachable) is raised as it is."""
        futures = [self.pool.submit(function, item) for item in items] if len(items) > 1 else None
        results, refused, failure = [], {}, None
        for row, item in enumerate(items):
            try:
                results.append(futures[row].result() if futures else function(item))
            except RemoteRefusal as error:
                refused[row] = error
            except RemoteSourceError as error:
                failure = failure or error
        if failure is not None:
            raise failure
        if refused:
            first = next(iter(refused.values()))
            raise RowFailure(f"{first} ({len(refused)} of {len(items)} rows refused)" if len(items) > 1
                             else str(first), refused)
        return results

    # --- protocol ----------------------------------------------------------------------------------

    def open(self, prompts: Sequence[Sequence[int]]) -> "RemoteSession":
        return RemoteSession(self, prompts)

    def sequence_logits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Scoring mode through echo: row t is the top-k distribution after the first t + 1 tokens
        (a row the server cannot give, e.g. after the first token on llama.cpp, is all −inf)."""
        return [torch.stack(rows) for rows in self.map_rows(lambda seq: self.after_each(seq, 1), sequences)]


class RemoteSession:
    """Each row's token ids; every step asks the server about every row's full sequence.

    The server keeps no state for us, so joining, forking and rolling back only edit the local
    token lists: a remote base serves continuous batching and speculative verification as well as
    any local model."""

    capabilities = Capabilities(rollback=True, join=True, fork=True)

    def __init__(self, source: RemoteSource, prompts: Sequence[Sequence[int]]):
        if any(len(p) == 0 for p in prompts):
            raise ProxyTuneError("cannot run an empty token sequence: every prompt needs at least one token")
        self.source = source
        self.rows = [list(p) for p in prompts]
        self.appended = 0

    def prefill(self) -> torch.Tensor:
        return torch.stack(self.source.map_rows(self.source.next_logits, self.rows))

    def advance(self, tokens: torch.Tensor, extend: bool = False) -> torch.Tensor:
        new = tokens.reshape(tokens.shape[0], -1).tolist()
        if len(new) != len(self.rows):
            raise ValueError(f"advance got {len(new)} rows for a session of {len(self.rows)}")
        width = len(new[0])
        for row, appended in zip(self.rows, new):
            row.extend(int(t) for t in appended)
        before, self.appended = self.appended, width + (self.appended if extend else 0)
        try:
            return self._score_appended(width)
        except SourceFailure:  # nothing happened: the engine may retry without the refused rows
            for row in self.rows:
                del row[len(row) - width:]
            self.appended = before
            raise

    def _score_appended(self, width: int) -> torch.Tensor:
        if width == 1:
            return torch.stack(self.source.map_rows(self.source.next_logits, self.rows))[:, None]
        if self.source.options.echo:  # one call scores the whole draft
            per_row = self.source.map_rows(lambda row: self.source.after_each(row, len(row) - width + 1), self.rows)
        else:  # one call per drafted position, positions of a row in sequence
            per_row = self.source.map_rows(
                lambda row: [self.source.next_logits(row[:len(row) - width + j + 1]) for j in range(width)], self.rows)
        return torch.stack([torch.stack(rows) for rows in per_row])

    def rewind(self, keep: Sequence[int]) -> None:
        if any(k < 0 or k > self.appended for k in keep):
            raise ValueError(f"rewind keeps 0..{self.appended} of the last tokens, got {list(keep)}")
        for row, kept in zip(self.rows, keep):
            del row[len(row) - self.appended + kept:]
        self.appended = 0

    def select(self, rows: Sequence[int]) -> None:
        self.rows = [self.rows[r] for r in rows]

    def join(self, other: "RemoteSession") -> None:
        if other.source is not self.source:
            raise ValueError("only sessions of the same source can be joined")
        self.rows += [list(row) for row in other.rows]
        self.appended = 0  # a rewind cannot reach back across a join

    def fork(self) -> "RemoteSession":
        twin = RemoteSession(self.source, self.rows)
        twin.appended = self.appended
        return twin
