"""`proxytune choose`: multiple choice, the answer restricted to the given options (the paper's
black-box GPT-3.5 setting); works with remote bases that return only top-k logprobs."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import ProxyTuneError
from ._models import add_model_options, load_tuner, remote_usage
from .generate import add_escape_option, read_prompt, unescape


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "choose", help="pick one of several answer options with the proxy-tuned model",
        description="Score each option as the continuation of the prompt under the proxy-tuned distribution and "
                    "pick the best. With a remote base (--base openai:URL?tokenizer=...) only options among its "
                    "top-k can win.")
    add_model_options(parser)
    parser.add_argument("prompt", nargs="?", help="the question ('-' or absent: read standard input)")
    parser.add_argument("--option", action="append", dest="options", metavar="TEXT",
                        help="an answer option, appended to the prompt as is (repeat; e.g. --option ' A')")
    parser.add_argument("--chat", action="store_true", help="treat the prompt as a user message: chat-format it")
    parser.add_argument("--chat-roles", default="base,expert,anti_expert",
                        help="with --chat: roles that get their chat template (the paper's setting: expert)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (an impossible option's "
                                                            "score is null and listed under \"impossible\")")
    add_escape_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..facade.choice import check_options, choose

    options = check_options([unescape(o) for o in args.options or []] if args.escape else args.options or [])
    prompt = read_prompt(args)
    tuner = load_tuner(args)
    if args.chat:
        choice = choose(tuner, options, messages=[{"role": "user", "content": prompt}],
                        chat_roles=args.chat_roles.split(","))
    else:
        choice = choose(tuner, options, prompt=prompt)
    if choice.impossible:
        where = ("outside the remote base's top-k logprobs (raise top_k= in its openai: spec to score them)"
                 if tuner.sources["base"].distribution == "top_k" else "impossible under the proxy")
        print(f"warning: option(s) {', '.join(repr(options[i]) for i in choice.impossible)} scored -inf, {where}; "
              f"they cannot win and the percentages are over the other options only", file=sys.stderr)
    if args.json:
        print(json.dumps(choice.as_dict(), allow_nan=False))
    else:
        for index, (option, score, prob) in enumerate(zip(options, choice.scores, choice.probs)):
            marker = "*" if index == choice.index else " "
            print(f"{marker} {prob:6.1%}  {score:9.3f}  {option!r}")
    for line in remote_usage(tuner):
        print(line, file=sys.stderr)
    if choice.index is None:
        raise ProxyTuneError("no option is possible: none is among the remote base's top-k tokens "
                             "(raise top_k= in its openai: spec)")
    return 0
