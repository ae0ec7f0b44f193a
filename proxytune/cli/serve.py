"""`proxytune serve`: an OpenAI-compatible server (completions, chat, streaming, logprobs) over a proxy-tuned trio."""
from __future__ import annotations

import argparse
import os
import socket

from ..errors import ProxyTuneError
from ._models import add_model_options, load_tuner, model_specs


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions)",
        description="Serve the proxy-tuned model over HTTP in OpenAI's format. Requests arriving together are "
                    "decoded together (dynamic batching). Per request, the body may set alpha (extra_body) "
                    "or proxy: false for the base model alone.")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("PROXYTUNE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $PROXYTUNE_API_KEY, else open)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the --model trio name, else 'proxytune')")
    parser.add_argument("--max-batch", type=int, default=32, help="rows decoded together at most (default 32)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a slot before the server answers 503 (default 64)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may wait and run before it is stopped with 504 (default 600)")
    parser.add_argument("--chat-roles", default="base,expert,anti_expert",
                        help="roles that get their chat template on /v1/chat/completions, the rest plain text "
                             "(the paper's setting: expert)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run)


def check_options(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ProxyTuneError(f"--port must be in 1..65535, got {args.port}")
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise ProxyTuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.request_timeout > 0:
        raise ProxyTuneError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise ProxyTuneError("--api-key is empty")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        try:  # before minutes of model loading, not after
            probe.bind((args.host, args.port))
        except OSError as error:
            raise ProxyTuneError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..server import create_app
    except ImportError as error:
        raise ProxyTuneError(f"the server needs its extra: pip install 'proxytune[serve]' ({error})") from None
    model_specs(args)  # a missing role is reported before anything else
    check_options(args)
    chat_roles = tuple(r.strip() for r in args.chat_roles.split(",") if r.strip())
    unknown = set(chat_roles) - {"base", "expert", "anti_expert"}
    if unknown:
        raise ProxyTuneError(f"--chat-roles may name base, expert, anti_expert; got {sorted(unknown)}")
    tuner = load_tuner(args)
    name = args.served_model_name or args.model or "proxytune"
    app = create_app(tuner, served_names=[name], api_key=args.api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, request_timeout=args.request_timeout, chat_roles=chat_roles)
    print(f"proxytune serve: model {name!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
