"""Base alone, expert alone and proxy-tuned, on the same request: what did proxy-tuning change?

Here a role's model runs by itself (one model's forwards, not three): for whole batches of one role, as the
CLI's --compare, the demo and the evaluations run them. `Request.alone` gives the same distribution to a row
inside a shared batch of proxy rows (the server's playground), at the cost of every role's forward."""
from __future__ import annotations

from typing import Iterator, TextIO

from ..engine.decoding import Decoding, Request
from ..engine.modes import start_decoding
from ..engine.roles import ExpertPair


def role_alone(request: Request, role: str) -> Request:
    """A request whose combined distribution is one role's own: that role's prompt as the base's and α = 0."""
    prompts = {r: request.prompts[role] for r in request.prompts}
    return Request(prompts, request.settings.but(alpha=(0.0,) * len(request.alphas), alpha_schedule=()))


def solo_decoding(tuner, role: str, requests: list[Request]) -> Decoding:
    """A decoding of one role's model alone: it is the base, and every pair is it against itself at α = 0
    (shared sessions, so it runs once). `requests` come from `role_alone`."""
    source = tuner.sources[role]
    solo = ExpertPair(source, source)
    return start_decoding(source, [solo] * len(tuner.pairs), requests, tuner.tokenizer, tuner.eos_token_ids)


def generate_as(tuner, request: Request, role: str | None) -> str:
    """Text from the proxy (role None) or from one role's model alone."""
    if role is None:
        return tuner.run([request])[0].text
    decoding = solo_decoding(tuner, role, [role_alone(request, role)])
    for _ in decoding.steps():
        pass
    return decoding.outputs()[0].text


def compare_roles(tuner, request: Request, stream_to: TextIO | None = None) -> Iterator[tuple[str, str]]:
    for title, role in (("base alone", "base"), ("expert alone", "expert"), ("proxy-tuned", None)):
        text = generate_as(tuner, request, role)
        if stream_to is not None:
            stream_to.write(f"=== {title} ===\n{text}\n\n")
            stream_to.flush()
        yield title, text
