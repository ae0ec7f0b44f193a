"""`proxytune serve`: an OpenAI-compatible server (completions, chat, streaming, logprobs) over a proxy-tuned trio."""
from __future__ import annotations

import argparse
import os
import socket

from ..errors import ProxyTuneError
from ._models import add_decoding_option, add_model_options, load_tuner, model_specs


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions)",
        description="Serve the proxy-tuned model over HTTP in OpenAI's format. Requests arriving together are "
                    "decoded together (dynamic batching). Per request, the body may set alpha (extra_body) "
                    "or proxy: false for the base model alone.")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None,
                      help="require 'Authorization: Bearer KEY' (visible in ps: prefer --api-key-env or "
                           "--api-key-file; default: $PROXYTUNE_API_KEY, else open)")
    keys.add_argument("--api-key-env", metavar="VAR", default=None,
                      help="read the API key from this environment variable")
    keys.add_argument("--api-key-file", metavar="PATH", default=None,
                      help="read the API key from this file (its first line)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a Host (and browser Origin) name the server answers to, besides the loopback names "
                             "and the --host address; repeat for more; '*' allows any (behind a proxy that checks)")
    parser.add_argument("--max-echo-tokens", type=int, default=32_768,
                        help="prompt tokens one echo+logprobs request may have scored (default 32768)")
    parser.add_argument("--shutdown-grace", type=float, default=10.0,
                        help="seconds running requests get to finish after SIGTERM before they end with an error "
                             "(default 10)")
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
    parser.add_argument("--no-ui", dest="ui", action="store_false",
                        help="do not serve the playground page at / (base, expert and proxy side by side)")
    add_decoding_option(parser)
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run)


def check_options(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ProxyTuneError(f"--port must be in 1..65535, got {args.port}")
    for name in ("max_batch", "max_queue", "max_echo_tokens"):
        if getattr(args, name) < 1:
            raise ProxyTuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.request_timeout > 0:
        raise ProxyTuneError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if not args.shutdown_grace >= 0:
        raise ProxyTuneError(f"--shutdown-grace must be >= 0 seconds, got {args.shutdown_grace}")
    args.api_key = api_key(args)
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        try:  # before minutes of model loading, not after
            probe.bind((args.host, args.port))
        except OSError as error:
            raise ProxyTuneError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None


def api_key(args: argparse.Namespace) -> str | None:
    """From --api-key, --api-key-env VAR, --api-key-file PATH, else $PROXYTUNE_API_KEY; None: open."""
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if key is None:
            raise ProxyTuneError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
        where = f"${args.api_key_env}"
    elif args.api_key_file:
        try:
            key = open(args.api_key_file, encoding="utf-8").readline().strip()
        except OSError as error:
            raise ProxyTuneError(f"--api-key-file: cannot read {args.api_key_file} ({error.strerror})") from None
        where = args.api_key_file
    else:
        key, where = args.api_key, "--api-key"
        if key is None:
            key, where = os.environ.get("PROXYTUNE_API_KEY"), "$PROXYTUNE_API_KEY"
    if key is not None and not key.strip():
        raise ProxyTuneError(f"the API key from {where} is empty")
    return key


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..server import create_app
        from ..server.timeouts import HeaderTimeoutH11
    except ImportError as error:
        raise ProxyTuneError(f"the server needs its extra: pip install 'proxytune[serve]' ({error})") from None
    model_specs(args)  # a missing role is reported before anything else
    check_options(args)
    from ..engine.prompts import chat_role_kinds

    chat_roles = chat_role_kinds(args.chat_roles)
    tuner = load_tuner(args)
    name = args.served_model_name or args.model or "proxytune"
    app = create_app(tuner, served_names=[name], api_key=args.api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, request_timeout=args.request_timeout, chat_roles=chat_roles,
                     host=args.host, allowed=args.allowed_host, max_echo_tokens=args.max_echo_tokens, ui=args.ui,
                     decoding=args.decoding)
    print(f"proxytune serve: model {name!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}"
          f"{f'; playground at http://{args.host}:{args.port}/' if args.ui else ''}", flush=True)
    grace = args.shutdown_grace

    class DrainingServer(uvicorn.Server):
        """SIGTERM / Ctrl-C: new requests get 503 at once, running ones `grace` seconds to finish, then an
        error event (streams) or error body; uvicorn closes the connections after that."""

        def handle_exit(self, sig, frame):
            app.state.server.scheduler.drain(grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=grace + 3, http=HeaderTimeoutH11)
    DrainingServer(config).run()
    return 0
