"""A model behind an OpenAI-compatible server (llama.cpp, vLLM, a hosted API) as a logit source.

The server only ever gives top-k logprobs keyed by token text, so each step's logit row holds the
returned candidates and −inf elsewhere (see token_strings.logit_row); the decoder then adds
α(z_expert − z_anti_expert) on exactly those candidates, as the paper does for GPT-3.5.

Cost: as the base (`chunk=auto`, the default), one /v1/completions call drafts several tokens of the
server's own continuation with the top-k before each (engine/chunked.py verifies them against the
local pair); otherwise (`chunk=0`, or in another role) one call (max_tokens 1, logprobs k) per token
per row. The rows of a batch are in flight concurrently over one pooled connection. The session keeps
each row's token ids; the server is stateless for us (it may reuse its prompt cache).

Token fidelity: text is what most servers accept, so each call sends the decoded token sequence.
If re-tokenising that text would not give back exactly the chosen ids, the server would condition
on a different sequence than the one decoded: that *drift* is detected locally (the local tokenizer
is checked against the server's at start-up) and warned about or raised (`drift=`), and
`send_ids=1` avoids it on servers that accept token ids (vLLM, OpenAI).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ...errors import ProxyTuneError, RowFailure, SourceFailure
from ..protocol import Capabilities, Draft
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
    tokens: int = 0  # tokens generated from them: each decided position counts once (drafts not kept do not)
    drafted: int = 0  # tokens the server drafted in chunks (kept or not)
    candidates: int = 0
    dropped: int = 0
    empty_as_eos: int = 0
    drift: int = 0  # calls whose text would re-tokenise differently
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0  # wall time from the start of the first decoding call to the end of the last

    @property
    def calls_per_token(self) -> float:
        """HTTP calls per generated token (0 when nothing was generated, e.g. scoring only)."""
        return self.calls / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.tokens / self.calls if self.calls else 0.0

    def summary(self, role: str) -> str:
        per = max(1, self.tokens or self.distributions)
        unit = "generated token" if self.tokens else "distribution"
        return (f"{role}: {self.calls} calls for {self.tokens} generated tokens ({self.calls_per_token:.2f} calls "
                f"and {1000 * self.seconds / per:.0f} ms wall per token, {self.tokens_per_call:.1f} tokens per call, "
                f"{self.drafted} drafted), {self.bytes_sent / per:.0f} B sent and {self.bytes_received / per:.0f} B "
                f"received per {unit}, {self.retries} retries, {self.candidates / max(1, self.distributions):.1f} "
                f"candidates per distribution, {self.dropped} top-k entries dropped, {self.drift} re-tokenisation drifts")


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
        self._span: list[float] = []  # [start of the first decoding call, end of the last]
        self.sampler_fields = options.sampler_fields  # turned off when the server refuses them
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
        self._stats.seconds = self._span[1] - self._span[0] if self._span else 0.0
        return self._stats

    def count_tokens(self, n: int) -> None:
        """Sessions report the tokens decided from this source's distributions (see RemoteSession)."""
        with self._lock:
            self._stats.tokens += n

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
        if self.options.api == "chat":
            return []  # no echo without completions: nothing to compare with
        response = self.completion(text, echo=True, logprobs=0)
        return list(response["logprobs"]["tokens"])

    def check_tokenizer(self) -> None:
        probes = list(PROBES)
        if getattr(self.tokenizer, "chat_template", None):
            probes.append(self.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                             tokenize=False, add_generation_prompt=True))
        bos = self.tokenizer.bos_token_id
        for probe in probes:
            local = self._read(probe)
            server = self.server_tokens(probe)
            if not server:
                log.warning("the %s model's server has no tokenize endpoint and no completions: its tokenizer "
                            "cannot be checked against %r", self.name, self.options.tokenizer)
                return
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
        return self._wire(ids)[0]

    def _wire(self, ids: Sequence[int], read: bool = False) -> tuple:
        """(what to send for these ids, the tokens the server reads from it). The reading is the local
        tokenizer's (checked equal to the server's at start-up), computed for the drift check or when asked
        (`read`); None with send_ids (the server reads the ids themselves) or when not computed."""
        if self.options.send_ids:
            return list(ids), None
        sent = self._sent(ids)
        text = self._text(sent)
        again = self._read(text) if read or self.options.drift != "off" else None
        if self.options.drift != "off" and again != sent:
            self._drift(sent, again)
        return text, again

    def _sent(self, ids: Sequence[int]) -> list[int]:
        """The ids whose text is sent: without a leading BOS when the server adds its own."""
        ids = list(ids)
        return ids[1:] if self.strip_bos and ids[:1] == [self.tokenizer.bos_token_id] else ids

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _read(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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

    def completion(self, prompt, echo: bool = False, logprobs: int | None = None, max_tokens: int = 1,
                   sampling: tuple[float, int] | None = None) -> dict:
        """One /v1/completions call. Greedy (temperature 0, the special tokens held back by hold_eos) unless
        `sampling` = (temperature, seed): then the server samples from its top_k with nothing else in the way
        (no logit_bias; with sampler_fields, llama.cpp's other samplers switched off)."""
        payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "echo": echo,
                   "logprobs": self.options.top_k if logprobs is None else logprobs, "stream": False}
        if self.model:
            payload["model"] = self.model
        if sampling is not None:
            temperature, seed = sampling
            payload.update(temperature=float(temperature), top_k=self.options.top_k, top_p=1.0, seed=seed)
        elif self.logit_bias:
            payload["logit_bias"] = self.logit_bias
        drafting = max_tokens > 1 or sampling is not None  # the server's own continuation matters
        if drafting:
            payload.update(self._sampler_fields())
        if self.options.token_ids:
            payload["return_tokens_as_token_ids"] = True
        answer = self._timed(self._post_drafting if drafting else self.client.post, "completions", payload)
        try:
            choice = answer["choices"][0]
            if not isinstance(choice.get("logprobs"), dict):
                raise KeyError("logprobs")
        except (KeyError, IndexError, TypeError):
            raise RemoteSourceError(f"{self.name} model at {self.client.url('completions')} answered without "
                                    f"logprobs ({str(answer)[:200]}); does the server support logprobs?") from None
        return choice

    def _timed(self, post, path: str, payload: dict) -> dict:
        """A decoding call, its time added to the span `stats.seconds` measures."""
        start = time.perf_counter()
        try:
            return post(path, payload)
        finally:
            with self._lock:
                self._span = [self._span[0] if self._span else start, time.perf_counter()]

    def _sampler_fields(self) -> dict:
        """llama.cpp applies a repeat penalty (1.1), min_p (0.05) and more to its own continuation unless told
        not to; other servers ignore or refuse these fields."""
        return {"repeat_penalty": 1.0, "min_p": 0.0, "typical_p": 1.0} if self.sampler_fields else {}

    def _post_drafting(self, path: str, payload: dict) -> dict:
        """A drafting call; a server that refuses the llama.cpp sampler fields gets the call again without them
        (and never again with them)."""
        try:
            return self.client.post(path, payload)
        except RemoteRefusal:
            if not self.sampler_fields:
                raise
            answer = self.client.post(path, {k: v for k, v in payload.items() if k not in self._sampler_fields()})
            self.sampler_fields = False
            log.info("the %s model's server refused llama.cpp's sampler fields; sending none from now on", self.name)
            return answer

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

    def chunk(self, ids: Sequence[int], width: int, temperature: float = 0.0, seed: int = 0
              ) -> tuple[list[int], list[torch.Tensor], torch.Tensor | None]:
        """The server's own continuation of `ids`, up to `width` tokens, in one call: (drafted ids, the [V]
        distribution before each, q). Only exact positions are returned: a distribution after a drafted
        token comes only when that token is known exactly (an id key or a text one token owns) and the
        text a one-token call would send for it re-tokenises to what the server conditioned on (else a
        one-token step would see other tokens). The last draft may be -1 (no exact local id / no draft).

        Greedy drafts (the default, and for greedy rows): temperature 0 and hold_eos, the very settings
        of one-token calls, so each distribution is the one a one-token call returns; q is None (the
        draft is a point mass). With sample_drafts (token_ids=1) a sampling row's drafts are the server's
        own samples at `temperature` from its top-k, q [n, V] their distributions."""
        sampled = temperature > 0 and self.options.sample_drafts
        prompt, conditioned = self._wire(ids, read=True)
        choice = self.completion(prompt, max_tokens=width, sampling=(temperature, seed) if sampled else None)
        keys = list(choice["logprobs"].get("tokens") or [])
        tops = list(choice["logprobs"].get("top_logprobs") or [])
        present = min(len(keys), len(tops), width)
        if present == 0 or not tops[0]:
            if sampled:  # the server stopped at once (it drew an end of sequence): draft greedily instead
                return self.chunk(ids, width)
            raise RemoteSourceError(f"{self.name} model at {self.options.base_url} drafted no token with logprobs "
                                    f"(finish_reason {choice.get('finish_reason')!r}; hold_eos=1 keeps llama.cpp "
                                    f"from stopping)")
        rows, drafts, qs = [], [], []
        for j in range(present):
            if not tops[j]:
                break
            row = self._row(tops[j])
            q = self._sampled_q(row, tops[j], temperature) if sampled else None
            exact = self.strings.exact_id(keys[j])
            mapped = exact if exact is not None else self.strings.to_id(keys[j], False)
            rows.append(row)
            qs.append(q)
            if sampled and (q is None or exact is None or not torch.isfinite(row[exact])):
                drafts.append(-1)  # its distribution or identity unknown: the position is decided afresh
                break
            drafts.append(-1 if mapped is None else mapped)
            if exact is None or not self._continues(ids, drafts, conditioned):
                break
        with self._lock:
            self._stats.drafted += present
        # a position without q has no draft of its own (-1): its zeros are never read
        q = torch.stack([torch.zeros(self.vocab_size) if row_q is None else row_q for row_q in qs]) if sampled else None
        return drafts, rows, q

    def _sampled_q(self, row: torch.Tensor, top: dict, temperature: float) -> torch.Tensor | None:
        """The distribution the server sampled from: softmax(logprob / T) over its top-k — known when the
        entry holds all k (a server capping logprobs below top_k hides part of its support)."""
        finite = torch.isfinite(row)
        if len(top) < min(self.options.top_k, self.vocab_size) or int(finite.sum()) < len(top):
            return None
        return torch.softmax(row / temperature, dim=-1)

    def _continues(self, ids: Sequence[int], drafts: list[int], conditioned: list[int] | None) -> bool:
        """Whether the server's next distribution (after ids + drafts) is what a one-token call would get:
        with send_ids always; with text, when the text of ids + drafts re-tokenises to the tokens the server
        conditioned on (its tokenization of the sent text, then the drafts)."""
        if conditioned is None:
            return True
        return self._read(self._text(self._sent(list(ids) + drafts))) == conditioned + drafts

    def after_each(self, ids: Sequence[int], first: int) -> list[torch.Tensor]:
        """[V] rows for the distributions after ids[:t], t = first .. len(ids): one echo call, or one call
        per position when the echo does not line up with the tokens (the server tokenized the text
        differently): slower, never wrong, never a failed row.

        OpenAI's layout gives entry i = the distribution that predicts token i (entry 0 empty) and one
        more entry for the generated token. llama-cpp-python without a BOS token returns one entry
        fewer, each shifted by one (entry i predicts token i + 1): told apart by the entry count.
        """
        sent = self._sent(ids)
        offset = len(ids) - len(sent)
        response = self.completion(self.wire_prompt(ids), echo=True)["logprobs"]
        entries, n = response["top_logprobs"], len(sent)
        shift = 0 if len(entries) >= n + 1 else 1 if len(entries) == n else None
        if shift is None or not self._echo_lines_up(response.get("tokens") or [], sent):
            log.info("%s model's echo does not line up with the %d tokens sent (%d entries): scoring them one "
                     "call per position", self.name, n, len(entries))
            return [self.next_logits(ids[:t]) for t in range(first, len(ids) + 1)]
        rows = []
        for t in range(first, len(ids) + 1):
            index = t - offset - shift
            entry = entries[index] if 0 <= index < len(entries) else None
            rows.append(self._row(entry) if entry else torch.full((self.vocab_size,), float("-inf")))
        return rows

    def _echo_lines_up(self, echoed: list[str], sent: list[int]) -> bool:
        """Whether the echoed prompt tokens are the sent ones (special tokens, shown differently by each
        server, aside): else the server split the text otherwise and the entries belong to other tokens."""
        if self.options.token_ids or len(echoed) < len(sent):
            return True  # id keys, or a layout without every prompt token: the entry count decides
        special = set(self.strings.special_texts.values())
        return all(i in special or key == self.strings.texts[i] for key, i in zip(echoed, sent))

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

    def _chat_only(self, what: str) -> ProxyTuneError:
        return ProxyTuneError(
            f"the {self.name} model at {self.options.base_url} is chat-only (api=chat): {what} needs "
            f"/v1/completions, since a chat endpoint cannot continue a partial reply token by token. Use "
            f"`choose` (one-token answers such as A/B/C/D: the paper's GPT-3.5 setting), or a server with "
            f"completions (vLLM, llama.cpp)")

    def open(self, prompts: Sequence[Sequence[int]]) -> "RemoteSession":
        """A drafting session (the engine's chunked decoding uses it when this is the base) unless chunk=0."""
        if self.options.api == "chat":
            raise self._chat_only("generation")
        return (RemoteSession if self.options.chunk_limit == 0 else DraftingRemoteSession)(self, prompts)

    def chat_next_logits(self, messages: list[dict]) -> torch.Tensor:
        """[V]: the top-k of the first reply token to a conversation, through /v1/chat/completions. One call."""
        payload = {"messages": messages, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                   "top_logprobs": self.options.top_k, "stream": False}
        if self.model:
            payload["model"] = self.model
        if self.logit_bias:
            payload["logit_bias"] = self.logit_bias
        answer = self._timed(self.client.post, "chat/completions", payload)
        try:
            entry = answer["choices"][0]["logprobs"]["content"][0]
            top: dict[str, float] = {}
            for item in entry["top_logprobs"]:  # best first; a text shown twice keeps its first (best) value
                top.setdefault(item["token"], item["logprob"])
        except (KeyError, IndexError, TypeError):
            raise RemoteSourceError(f"{self.name} model at {self.client.url('chat/completions')} answered without "
                                    f"top_logprobs ({str(answer)[:200]}); does it support logprobs?") from None
        self.count_tokens(1)
        return self._row(top)

    def sequence_logits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Scoring mode through echo: row t is the top-k distribution after the first t + 1 tokens
        (a row the server cannot give, e.g. after the first token on llama.cpp, is all −inf)."""
        if self.options.api == "chat":
            raise self._chat_only("scoring")
        return [torch.stack(rows) for rows in self.map_rows(lambda seq: self.after_each(seq, 1), sequences)]


class RemoteSession:
    """Each row's token ids; every step asks the server about every row's full sequence.

    The server keeps no state for us, so joining, forking and rolling back only edit the local
    token lists: a remote base serves continuous batching and speculative verification as well as
    any local model.

    Generated tokens are counted for the source's stats: a one-token step's distributions decide a
    token each (taken back if the step is rewound); a wider span's decide what `rewind` keeps."""

    capabilities = Capabilities(rollback=True, join=True, fork=True)

    def __init__(self, source: RemoteSource, prompts: Sequence[Sequence[int]]):
        if any(len(p) == 0 for p in prompts):
            raise ProxyTuneError("cannot run an empty token sequence: every prompt needs at least one token")
        self.source = source
        # the server computes: a step of the local models can run while this one waits for its answer
        self.capabilities = replace(type(self).capabilities, place=frozenset({f"server {source.options.base_url}"}))
        self.rows = [list(p) for p in prompts]
        self.appended = 0
        self.counted = 0  # tokens of the current span already counted as generated

    def prefill(self) -> torch.Tensor:
        out = torch.stack(self.source.map_rows(self.source.next_logits, self.rows))
        self.source.count_tokens(len(self.rows))
        return out

    def _append(self, new: list[list[int]]) -> None:
        for row, appended in zip(self.rows, new):
            row.extend(int(t) for t in appended)

    def _take_back(self, width: int) -> None:
        for row in self.rows:
            del row[len(row) - width:]

    def advance(self, tokens: torch.Tensor, extend: bool = False) -> torch.Tensor:
        new = tokens.reshape(tokens.shape[0], -1).tolist()
        if len(new) != len(self.rows):
            raise ValueError(f"advance got {len(new)} rows for a session of {len(self.rows)}")
        width = len(new[0])
        self._append(new)
        before, self.appended = self.appended, width + (self.appended if extend else 0)
        try:
            out = self._score_appended(width)
        except SourceFailure:  # nothing happened: the engine may retry without the refused rows
            self._take_back(width)
            self.appended = before
            raise
        if not extend:  # a new span; an ordinary step's distributions decide a token each
            self.counted = len(self.rows) if width == 1 else 0
            self.source.count_tokens(self.counted)
        return out

    def _score_appended(self, width: int) -> torch.Tensor:
        if width == 1:
            return torch.stack(self.source.map_rows(self.source.next_logits, self.rows))[:, None]
        if self.source.options.echo:  # one call scores the whole span
            per_row = self.source.map_rows(lambda row: self.source.after_each(row, len(row) - width + 1), self.rows)
        else:  # one call per position, positions of a row in sequence
            per_row = self.source.map_rows(
                lambda row: [self.source.next_logits(row[:len(row) - width + j + 1]) for j in range(width)], self.rows)
        return torch.stack([torch.stack(rows) for rows in per_row])

    def rewind(self, keep: Sequence[int]) -> None:
        if any(k < 0 or k > self.appended for k in keep):
            raise ValueError(f"rewind keeps 0..{self.appended} of the last tokens, got {list(keep)}")
        for row, kept in zip(self.rows, keep):
            del row[len(row) - self.appended + kept:]
        self.appended = 0
        self.source.count_tokens(sum(keep) - self.counted)  # the positions kept are the tokens decided
        self.counted = 0

    def select(self, rows: Sequence[int]) -> None:
        self.rows = [self.rows[r] for r in rows]
        self.counted = len(self.rows) if self.counted else 0  # a one-token step's count follows its rows

    def join(self, other: "RemoteSession") -> None:
        if other.source is not self.source:
            raise ValueError("only sessions of the same source can be joined")
        self.rows += [list(row) for row in other.rows]
        self.appended = self.counted = 0  # a rewind cannot reach back across a join

    def fork(self) -> "RemoteSession":
        twin = type(self)(self.source, self.rows)
        twin.appended = self.appended
        return twin


class DraftingRemoteSession(RemoteSession):
    """A remote session that also drafts: one call per row continues it by several tokens of the server's own."""

    capabilities = Capabilities(rollback=True, join=True, fork=True, draft=True)

    @property
    def chunk(self) -> int | None:
        return self.source.options.chunk_limit  # chunk=N in the spec; None: auto

    def draft(self, tokens: torch.Tensor, widths: Sequence[int], temperatures: Sequence[float],
              seeds: Sequence[int]) -> Draft:
        fed_now = tokens.reshape(tokens.shape[0], -1).tolist()
        if len(fed_now) != len(self.rows) or len(widths) != len(self.rows):
            raise ValueError(f"draft got {len(fed_now)} rows and {len(widths)} widths for a session of {len(self.rows)}")
        self._append(fed_now)
        try:
            chunks = self.source.map_rows(lambda args: self.source.chunk(*args),
                                          list(zip(self.rows, widths, temperatures, seeds)))
        except SourceFailure:
            self._take_back(1)
            raise
        n, batch, vocab = max(widths), len(self.rows), self.source.vocab_size
        fed = torch.zeros(batch, n, dtype=torch.long)
        drafted = torch.full((batch, n), -1, dtype=torch.long)
        logits = torch.full((batch, n, vocab), float("-inf"))
        qs: list[torch.Tensor | None] = []
        for i, (drafts, rows, q) in enumerate(chunks):
            fed[i, 0] = fed_now[i][0]
            drafted[i, :len(drafts)] = torch.tensor(drafts, dtype=torch.long)
            fed[i, 1:len(drafts)] = drafted[i, :len(drafts) - 1].clamp_min(0)
            logits[i, :len(rows)] = torch.stack(rows)
            qs.append(None if q is None else torch.cat([q, torch.zeros(n - len(q), vocab)]))
        self._append(fed[:, 1:].tolist())
        self.appended, self.counted = n, 0
        return Draft(fed, drafted, logits, [len(rows) for _, rows, _ in chunks], qs)
