"""One request's answer, read off its job's queue: the whole body once every row is done (`respond`), or
SSE chunks as the rows decode (`stream`).

The scheduler puts ("prompt" | "events" | "done" | "error" | "gone", value) items on the queue (scheduler.py
lists them); openai_format.py shapes each piece as OpenAI does.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import Response

from . import openai_format as fmt
from .api_errors import APIError
from .openai_format import Shape, TokenLogprob, TokenStrings
from .scheduler import Job
from .schemas import Params, PromptRows


@dataclass
class Reply:
    """What every piece of one answer is built from: its fixed fields, the request's settings, its prompts,
    and the server's token texts."""
    shape: Shape
    params: Params
    rows: list[PromptRows]
    text_of: TokenStrings


def generation_failed(reason: str) -> APIError:
    """A row ended with finish_reason "error" (a model stopped answering, its logits were unusable)."""
    return APIError(500, f"generation failed: {reason}", code="generation_failed")


def logprobs_of(reply: Reply, positions: list[TokenLogprob], offset: int = 0) -> dict:
    if reply.params.kind == "chat":
        return fmt.chat_logprobs(positions, reply.text_of)
    return fmt.completion_logprobs(positions, reply.text_of, offset)


def generated_positions(token_ids, logprobs, details, top: int) -> list[TokenLogprob]:
    # details exist when top_logprobs > 0 (or `details` asked); they may hold one more step (the EOS)
    return [TokenLogprob(t, lp, details[i].top_logprobs[:top] if details else [])
            for i, (t, lp) in enumerate(zip(token_ids, logprobs))]


def details_of(reply: Reply, details) -> list | None:
    return [fmt.token_details(d, reply.text_of) for d in details or []] if reply.params.details else None


def prompt_tokens(rows: list[PromptRows]) -> int:
    return sum(len(r.prompt_ids) for r in rows)


# --- the whole answer ---------------------------------------------------------------------------------

async def respond(job: Job, reply: Reply):
    """The response body, or a bare 499 when the client left first."""
    finished = await outputs_of(job)
    if finished is None:
        return Response(status_code=499)  # nobody is listening; the rows were freed
    prompt_positions, outputs = finished
    check_outputs(outputs)
    n, choices = reply.params.n, []
    for p, prompt in enumerate(reply.rows):
        scored = prompt_positions[p] if prompt_positions else []
        for c in range(n):
            choices.append(choice_of(reply, p * n + c, prompt, scored, outputs[p * n + c] if outputs else None))
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    return reply.shape.response(choices, fmt.usage(prompt_tokens(reply.rows), completion_tokens))


async def outputs_of(job: Job) -> tuple[list | None, list] | None:
    """The prompt's scored positions (echo with logprobs, else None) and every row's output; None once the
    client is gone. An engine error is raised."""
    prompt_positions = None
    while True:
        kind, value = await job.queue.get()
        if kind == "gone":
            return None
        if kind == "error":
            raise value
        if kind == "prompt":
            prompt_positions = value
        elif kind == "done":
            return prompt_positions, value


def check_outputs(outputs: list) -> None:
    failed = next((o for o in outputs if o.finish_reason == "error"), None)
    if failed is not None and failed.error_field is not None:  # the request's own setting gave out mid-way
        raise APIError(400, f"generation stopped: {failed.error}", failed.error_field, "format_too_complex")
    if failed is not None:  # never a 200 with empty or cut text: the reason, readable
        raise generation_failed(failed.error or "a model stopped answering")


def choice_of(reply: Reply, index: int, prompt: PromptRows, prompt_positions: list[TokenLogprob], output) -> dict:
    """One choice; `output` is None when nothing was generated (echo with max_tokens 0)."""
    params = reply.params
    text = output.text if output else ""
    positions = [] if output is None else generated_positions(
        output.token_ids, output.logprobs, output.details, params.top_logprobs)
    if params.echo:
        text = prompt.text + text
        positions = prompt_positions + positions
    logprobs = logprobs_of(reply, positions) if params.logprobs else None
    reason = fmt.public_finish_reason(output.finish_reason) if output else "length"
    return reply.shape.choice(index, text, reason, logprobs, details_of(reply, output.details if output else None))


# --- the stream ---------------------------------------------------------------------------------------

async def stream(job: Job, reply: Reply):
    """SSE chunks as the rows decode, then the usage (when asked) and [DONE]. An error ends the stream with
    its body, after whatever text was already sent."""
    n_choices = len(job.requests)
    # completions' text_offset runs on across chunks, from the end of the echoed prompt
    offsets = [len(reply.rows[index // reply.params.n].text) if reply.params.echo else 0
               for index in range(n_choices)]
    for chunk in opening_chunks(reply, n_choices):
        yield chunk
    completion_tokens = 0
    while True:
        kind, value = await job.queue.get()
        if kind == "error":
            yield fmt.sse(value.body())
            return
        if kind == "done":
            break
        if kind != "events":
            continue
        completion_tokens += sum(event.token_id is not None for _, event in value)
        for index, event in value:
            for chunk in event_chunks(reply, index, event, offsets):
                yield chunk
            if event.finish_reason == "error":
                return
    for chunk in closing_chunks(reply, n_choices, value, completion_tokens):
        yield chunk


def opening_chunks(reply: Reply, n_choices: int) -> list[str]:
    """Chat's role for every choice; then, with echo, every choice's prompt."""
    shape, params = reply.shape, reply.params
    chunks = []
    if params.kind == "chat":
        chunks += [shape.chunk([shape.chunk_choice(index, "", role=True)], params.include_usage)
                   for index in range(n_choices)]
    if params.echo:
        chunks += [shape.chunk([shape.chunk_choice(index, reply.rows[index // params.n].text)], params.include_usage)
                   for index in range(n_choices)]
    return chunks


def event_chunks(reply: Reply, index: int, event, offsets: list[int]) -> list[str]:
    """What one row did at one step: its new text (with logprobs, details), then its end if it ended."""
    shape, params = reply.shape, reply.params
    logprobs, details = token_fields(reply, index, event, offsets) if event.token_id is not None else (None, None)
    chunks = []
    if event.delta or logprobs or details:
        chunks.append(shape.chunk([shape.chunk_choice(index, event.delta, None, logprobs, details=details)],
                                  params.include_usage))
    if event.finish_reason == "error":  # the text so far was sent; then the reason, and the end
        chunks.append(fmt.sse(generation_failed(event.error or "a model stopped answering").body()))
    elif event.finish_reason:
        empty = None if params.kind == "chat" else ""
        reason = fmt.public_finish_reason(event.finish_reason)
        chunks.append(shape.chunk([shape.chunk_choice(index, empty, reason)], params.include_usage))
    return chunks


def token_fields(reply: Reply, index: int, event, offsets: list[int]) -> tuple[dict | None, list | None]:
    """The logprobs and details of the token the event carries; moves the choice's text offset past it."""
    params = reply.params
    step = [event.detail] if event.detail else None
    logprobs = None
    if params.logprobs:
        positions = generated_positions([event.token_id], [event.logprob], step, params.top_logprobs)
        logprobs = logprobs_of(reply, positions, offsets[index])
        offsets[index] += len(reply.text_of(event.token_id))
    return logprobs, details_of(reply, step)


def closing_chunks(reply: Reply, n_choices: int, outputs: list, completion_tokens: int) -> list[str]:
    shape, params = reply.shape, reply.params
    chunks = []
    if not outputs:  # echo with max_tokens 0: the prompt was all there was to send
        chunks += [shape.chunk([shape.chunk_choice(index, "", "length")], params.include_usage)
                   for index in range(n_choices)]
    if params.include_usage:
        chunks.append(shape.chunk([], True, fmt.usage(prompt_tokens(reply.rows), completion_tokens)))
    return chunks + [fmt.DONE]
