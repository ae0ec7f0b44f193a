"""`proxytune generate`: proxy-tuned text for a prompt, streamed; --compare shows base and expert alone."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
import time

from ..errors import ProxyTuneError
from ._models import add_decoding_option, add_model_options, byte_usage, load_tuner, remote_usage


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate proxy-tuned text for a prompt",
                                   description="Generate proxy-tuned text: z = z_base + alpha * (z_expert - z_anti).")
    add_model_options(parser)
    parser.add_argument("prompt", nargs="?", help="the prompt ('-' or absent: read standard input)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    add_shaping_options(parser)
    add_escape_option(parser)
    parser.add_argument("--chat", action="store_true", help="treat the prompt as a user message: chat-format it")
    parser.add_argument("--chat-roles", default="base,expert,anti_expert",
                        help="with --chat: roles that get their chat template, the rest plain text "
                             "(the paper's setting: expert)")
    parser.add_argument("--compare", action="store_true", help="also print base alone and expert alone")
    add_decoding_option(parser)
    batch = parser.add_argument_group("batch files (docs: cli/_batch.py)")
    batch.add_argument("--input", metavar="PROMPTS.jsonl",
                       help="one JSON object per line: {\"prompt\": ...} or {\"messages\": [...]}, optional \"id\" and "
                            "per-row max_new_tokens, temperature, top_p, top_k, min_p, seed, stop, alpha, "
                            "repetition_penalty, frequency_penalty, presence_penalty, logit_bias, response_format")
    batch.add_argument("--output", metavar="OUT.jsonl", help="with --input: results, one line per row as it finishes; "
                                                             "rerun the same command to resume")
    batch.add_argument("--batch-size", type=int, default=16, help="with --input: rows decoded together (default 16)")
    parser.add_argument("--verbose", action="store_true",
                        help="after the text, one line on standard error: tokens, wall time per token, and for "
                             "each remote role its calls, tokens per call and bytes per token")
    parser.set_defaults(func=run)


def add_shaping_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("on the combined logits (OpenAI's sampling fields; docs/structured-output.md)")
    group.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="transformers' (prompt and generated tokens; 1 = off)")
    group.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    group.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    group.add_argument("--logit-bias", action="append", metavar="TOKEN_ID=BIAS", default=None,
                       help="add BIAS (-100..100) to a token's logit (repeatable)")
    formats = group.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help="the output is a JSON object")
    formats.add_argument("--json-schema", metavar="FILE|JSON", help="the output is JSON valid under this schema")
    formats.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")
    formats.add_argument("--grammar", metavar="FILE", help="the output follows this Lark grammar (llguidance's syntax)")


def shaping_options(args: argparse.Namespace) -> dict:
    """The shaping flags as `Settings.of` keyword arguments (a JSON schema or grammar read from its file)."""
    bias = {}
    for item in args.logit_bias or []:
        token, _, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ProxyTuneError(f"--logit-bias takes TOKEN_ID=BIAS (e.g. 198=-100), got {item!r}") from None
    fmt = None
    if args.json:
        fmt = {"type": "json_object"}
    elif args.json_schema is not None:
        path = Path(args.json_schema)
        text = path.read_text() if not args.json_schema.lstrip().startswith("{") and path.is_file() else args.json_schema
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as error:
            raise ProxyTuneError(f"--json-schema: neither a file nor JSON ({error})") from None
        fmt = {"type": "json_schema", "json_schema": {"name": "cli", "schema": schema}}
    elif args.regex is not None:
        fmt = {"type": "regex", "regex": args.regex}
    elif args.grammar is not None:
        if not Path(args.grammar).is_file():
            raise ProxyTuneError(f"--grammar {args.grammar}: no such file")
        fmt = {"type": "grammar", "grammar": Path(args.grammar).read_text()}
    return dict(repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                presence_penalty=args.presence_penalty, logit_bias=bias or None, response_format=fmt)


def settings_of(args: argparse.Namespace):
    """The command's one `Settings`, made and checked before any model loads (a bad flag fails in a second,
    not after loading; a JSON schema, regex or grammar is compiled here, once)."""
    from ..engine.settings import Settings

    if args.max_new_tokens < 1:
        raise ProxyTuneError(f"max_new_tokens (--max-new-tokens) must be an integer >= 1, got {args.max_new_tokens}")
    stop = [unescape(s) for s in args.stop] if args.stop and args.escape else args.stop
    return Settings.of(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=stop, alpha=args.alpha,
                       mode=args.decoding, **shaping_options(args))


def add_escape_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-file", metavar="PATH", help="read the prompt from this file (as it is: no escapes)")
    parser.add_argument("--no-escape", dest="escape", action="store_false",
                        help="take \\n, \\t, \\\\ in the prompt, stop strings and options literally (default: read "
                             "them as a newline, a tab, a backslash, as llama.cpp does)")


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def unescape(text: str) -> str:
    """A command-line string with \\n, \\t, \\r, \\\\, \\", \\' read as the characters they name (a shell
    passes "Question:\\nAnswer" with a backslash and an n); any other backslash stays as it is."""
    return re.sub(r"\\([ntr\\\"'])", lambda m: ESCAPES[m.group(1)], text)


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise ProxyTuneError("give a prompt or --prompt-file, not both")
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ProxyTuneError(f"--prompt-file {path}: no such file")
        prompt = path.read_text()
    elif args.prompt in (None, "-"):
        prompt = sys.stdin.read()  # real newlines: nothing to unescape
    else:
        prompt = unescape(args.prompt) if args.escape else args.prompt
    if not prompt.strip():
        raise ProxyTuneError("the prompt is empty: pass it as an argument or on standard input")
    return prompt


def check_batch(args: argparse.Namespace) -> None:
    if args.input is None:
        if args.output is not None:
            raise ProxyTuneError("--output goes with --input (a batch file); a single prompt prints its text")
        return
    if args.prompt is not None:
        raise ProxyTuneError("give a prompt or --input PROMPTS.jsonl, not both")
    if args.output is None:
        raise ProxyTuneError("--input needs --output OUT.jsonl (where the results go, and a rerun resumes)")
    if args.compare:
        raise ProxyTuneError("--compare shows one prompt three ways; with --input, run the roles as separate batches")
    if args.batch_size < 1:
        raise ProxyTuneError(f"--batch-size must be >= 1, got {args.batch_size}")


def run(args: argparse.Namespace) -> int:
    check_batch(args)
    prompt = read_prompt(args) if args.input is None else None
    settings = settings_of(args)
    if args.input is not None:
        from ._batch import check_output, read_rows

        rows = read_rows(Path(args.input), settings)  # a malformed file or output fails before any model loads
        check_output(Path(args.input), Path(args.output))
    tuner = load_tuner(args)
    if args.input is not None:
        from ._batch import run_batch

        return run_batch(tuner, args, rows, tuple(args.chat_roles.split(",")))
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        request = tuner.request(messages=messages, chat_roles=tuple(args.chat_roles.split(",")), settings=settings)
    else:
        request = tuner.request(prompt, settings=settings)
    if not args.compare:
        start = time.perf_counter()
        tokens = 0
        for event in tuner.stream_events(request):
            tokens += event.token_id is not None
            print(event.delta, end="", flush=True)
        print()
        if args.verbose:
            seconds = time.perf_counter() - start
            unit = "bytes" if tuner.byte_level else "tokens"
            print(f"proxy: {tokens} {unit} in {seconds:.2f} s ({1000 * seconds / max(1, tokens):.0f} ms per "
                  f"{unit[:-1]})", file=sys.stderr)
            for line in byte_usage(tuner) + remote_usage(tuner):
                print(line, file=sys.stderr)
        return 0
    from ..facade.compare import compare_roles

    for title, text in compare_roles(tuner, request, stream_to=sys.stdout):
        pass
    return 0
