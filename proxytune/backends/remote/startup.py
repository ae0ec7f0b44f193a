"""Before a remote source decodes: reach its server once, and check that the local tokenizer is the server's.

Every call sends token ids as text (wire.py) and reads the answer's token texts back as local ids
(token_strings.py): both need the local tokenizer to tokenize exactly like the served model's, so a
few probe texts (and the chat template, when there is one) are tokenized on both sides and compared.
"""
from __future__ import annotations

import logging
from ...errors import ProxyTuneError
from .calls import Completions
from .http import OpenAIClient, httpx
from .spec import RemoteOptions
from .token_strings import TokenStrings
from .wire import Wire

log = logging.getLogger("proxytune.remote")

PROBES = ["Hello, world! How are you today?", "  two spaces,\ttabs\nand\n\nnew lines.",
          "3.14159 * 2 = 6.28318; x_1 += 42", "def f(x):\n    return x ** 2  # square\n",
          "naïve café — Zürich, 東京, emoji 🙂"]


def reach_server(client: OpenAIClient, options: RemoteOptions, name: str) -> tuple[str | None, int | None]:
    """Reach the server once (/v1/models): (the model's name, its context length), each where the options
    do not give it and the server says."""
    model, context = options.model, options.context
    try:
        response = client.http.get(client.url("models"))
    except httpx.TransportError as error:
        raise ProxyTuneError(f"cannot reach the {name} model's server at {options.base_url} "
                             f"({type(error).__name__}: {error}); is it running?") from None
    if response.status_code in (401, 403):
        raise ProxyTuneError(f"the {name} model's server at {options.base_url} refused the API key "
                             f"(HTTP {response.status_code}); set {options.key_env}")
    if response.status_code >= 400:
        return model, context  # some servers have no /v1/models; completions may still work
    entries = (response.json() or {}).get("data") or []
    if model is None and entries:
        model = entries[0].get("id")
    for entry in entries:
        if entry.get("id") == model and context is None:
            context = entry.get("max_model_len")
    return model, context


def server_tokens(completions: Completions, text: str) -> list[int] | list[str]:
    """The server's tokenization of `text`: ids from a tokenize endpoint, else token strings from echo."""
    root, client = completions.options.root_url, completions.client
    answer = client.probe(f"{root}/extras/tokenize", {"input": text})  # llama-cpp-python
    if answer is None:
        answer = client.probe(f"{root}/tokenize", {"model": completions.model, "prompt": text,  # vLLM
                                                   "add_special_tokens": False})
    if answer is not None and isinstance(answer.get("tokens"), list):
        return [int(t) for t in answer["tokens"]]
    if completions.options.api == "chat":
        return []  # no echo without completions: nothing to compare with
    response = completions.complete(text, echo=True, logprobs=0)
    return list(response["logprobs"]["tokens"])


def check_tokenizer(completions: Completions, wire: Wire, strings: TokenStrings) -> None:
    """Raise unless the local tokenizer (the wire's) tokenizes the probes as the server does (a warning when
    the server cannot tell)."""
    tokenizer, options, name = wire.tokenizer, completions.options, completions.name
    probes = list(PROBES)
    if tokenizer.chat_template:
        probes.append(tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                    tokenize=False, add_generation_prompt=True))
    bos = tokenizer.bos_token_id
    for probe in probes:
        local = wire.read(probe)
        server = server_tokens(completions, probe)
        if not server:
            log.warning("the %s model's server has no tokenize endpoint and no completions: its tokenizer "
                        "cannot be checked against %r", name, options.tokenizer)
            return
        if isinstance(server[0], int):
            if server[:1] == [bos] and local[:1] != [bos]:
                server = server[1:]
            same = server == local
        else:  # echo gives token strings, at most one per prompt token
            same = server[:len(local)] == [strings.texts[i] for i in local]
        if not same:
            raise ProxyTuneError(
                f"the local tokenizer {options.tokenizer!r} does not tokenize like the {name} model's "
                f"server at {options.base_url}: {probe!r} -> local {local[:12]} vs server {server[:12]}. "
                f"Give tokenizer= the served model's own tokenizer (or verify=0 to skip this check)")
