"""A model behind an OpenAI-compatible server (llama.cpp, vLLM, a hosted API) as a logit source.

The server only ever gives top-k logprobs keyed by token text, so each step's logit row holds the
returned candidates and −inf elsewhere (rows.py); the decoder then adds α(z_expert − z_anti_expert) on
exactly those candidates, as the paper does for GPT-3.5. The source declares so: distribution "top_k".

Cost: as the base (`chunk=auto`, the default), one /v1/completions call drafts several tokens of the
server's own continuation with the top-k before each (drafting.py; engine/chunked.py verifies them against
the local pair); otherwise (`chunk=0`, or in another role) one call (max_tokens 1, logprobs k) per token
per row (session.py). The rows of a batch are in flight concurrently over one pooled connection. The
session keeps each row's token ids; the server is stateless for us (it may reuse its prompt cache).

Token fidelity: each call sends the decoded token sequence as text unless `send_ids=1`; wire.py detects
the drift of text that would re-tokenise otherwise, startup.py checks the local tokenizer against the
server's. The calls themselves are in calls.py, what they cost in stats.py.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from ...errors import ProxyTuneError, RowFailure
from .calls import Completions
from .drafting import Drafter, DraftingRemoteSession
from .http import OpenAIClient, RemoteRefusal, RemoteSourceError
from .rows import RowReader
from .session import RemoteSession
from .spec import RemoteOptions
from .startup import check_tokenizer, reach_server
from .stats import RemoteStats
from .token_strings import TokenStrings
from .wire import Wire

log = logging.getLogger("proxytune.remote")


class RemoteSource:
    """A LogitSource over /v1/completions. `stats` counts calls and what the mapping dropped."""

    distribution = "top_k"  # only the server's top-k candidates are finite in a row

    def __init__(self, options: RemoteOptions, tokenizer, name: str = "base", connect: bool = True):
        self.options = options
        self.name = name
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_token_ids = frozenset({tokenizer.eos_token_id} - {None})
        self.client = OpenAIClient(options.base_url, name, options.api_key(), options.policy,
                                   max_connections=options.concurrency)
        self.strings = TokenStrings.build(tokenizer, self.vocab_size)
        self.tally = RemoteStats()  # what the decoding counted; `stats` adds the client's calls, bytes and time
        self.wire = Wire(tokenizer, options, name, self.tally)
        self.reader = RowReader(self.strings, options, name, self.tally)
        self.model, self.max_length = (reach_server(self.client, options, name) if connect
                                       else (options.model, options.context))
        special = sorted({i for i, t in tokenizer.added_tokens_decoder.items() if t.special} |
                         set(tokenizer.all_special_ids))
        logit_bias = {str(i): -100 for i in special} if options.hold_eos else {}
        self.completions = Completions(self.client, options, name, self.model, logit_bias)
        self.drafter = Drafter(self.completions, self.wire, self.reader)
        self.pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix=f"proxytune-{name}")
        if connect and options.verify:
            check_tokenizer(self.completions, self.wire, self.strings)
        self._startup_calls = self.client.calls  # stats count decoding calls only
        self._startup_bytes = (self.client.bytes_sent, self.client.bytes_received)

    def __repr__(self) -> str:
        return f"RemoteSource({self.options.base_url!r}, role={self.name!r}, top_k={self.options.top_k})"

    @property
    def stats(self) -> RemoteStats:
        self.tally.calls, self.tally.retries = self.client.calls - self._startup_calls, self.client.retries
        self.tally.bytes_sent = self.client.bytes_sent - self._startup_bytes[0]
        self.tally.bytes_received = self.client.bytes_received - self._startup_bytes[1]
        self.tally.seconds = self.completions.seconds
        return self.tally

    @property
    def server_calls(self) -> RemoteStats:
        """Declared (protocol.LogitSource): this source calls a server; what its calls cost so far."""
        return self.stats

    @property
    def sampler_fields(self) -> bool:
        """Whether drafting calls still switch llama.cpp's own samplers off (False once the server refused)."""
        return self.completions.sampler_fields

    def count_tokens(self, n: int) -> None:
        """Sessions report the tokens decided from this source's distributions (see RemoteSession)."""
        self.tally.add(tokens=n)

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()

    # --- calls -------------------------------------------------------------------------------------

    def next_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """[V]: the distribution after `ids`, restricted to the server's top-k. One call."""
        choice = self.completions.complete(self.wire.prompt(ids))
        tops = choice["logprobs"]["top_logprobs"]
        return self.reader.row(tops[0] if tops else None, self.vocab_size)

    def continuation(self, ids: Sequence[int], width: int, temperature: float = 0.0, seed: int = 0
                     ) -> tuple[list[int], list[torch.Tensor], torch.Tensor | None]:
        """The server's own continuation of `ids`, up to `width` tokens, in one call (drafting.Drafter)."""
        return self.drafter.continuation(ids, width, self.vocab_size, temperature, seed)

    def after_each(self, ids: Sequence[int], first: int) -> list[torch.Tensor]:
        """[V] rows for the distributions after ids[:t], t = first .. len(ids): one echo call, or one call
        per position when the echo does not line up with the tokens (the server tokenized the text
        differently): slower, never wrong, never a failed row.

        OpenAI's layout gives entry i = the distribution that predicts token i (entry 0 empty) and one
        more entry for the generated token. llama-cpp-python without a BOS token returns one entry
        fewer, each shifted by one (entry i predicts token i + 1): told apart by the entry count.
        """
        sent = self.wire.sent(ids)
        offset = len(ids) - len(sent)
        response = self.completions.complete(self.wire.prompt(ids), echo=True)["logprobs"]
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
            rows.append(self.reader.row(entry, self.vocab_size) if entry
                        else torch.full((self.vocab_size,), float("-inf")))
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
        top = self.completions.chat_top(messages)
        self.count_tokens(1)
        return self.reader.row(top, self.vocab_size)

    def sequence_logits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Scoring mode through echo: row t is the top-k distribution after the first t + 1 tokens
        (a row the server cannot give, e.g. after the first token on llama.cpp, is all −inf)."""
        if self.options.api == "chat":
            raise self._chat_only("scoring")
        return [torch.stack(rows) for rows in self.map_rows(lambda seq: self.after_each(seq, 1), sequences)]
