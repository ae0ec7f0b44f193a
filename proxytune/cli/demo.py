"""`proxytune demo`: the embedded trio on a held-out GSM question, base / expert / proxy side by side.

Base = Qwen2.5-Coder-1.5B-Instruct, expert = the shipped GSM LoRA on Qwen2.5-Coder-0.5B-Instruct,
anti-expert = that 0.5B without the adapter (one copy of its weights serves both). The question comes
from templates the expert never saw in training.
"""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import ProxyTuneError
from ..usage import peak_rss_gb

STOPS = ["\nQuestion:", "\n\n\n"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the embedded demo trio on a held-out GSM question",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="registered trio (default: demo)")
    parser.add_argument("--index", type=int, default=0, help="which held-out question (default 0)")
    parser.add_argument("--question", help="ask this instead of a held-out question")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--dtype", default="bfloat16", help="default bfloat16 (fp32 needs ~13.5 GB)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: 1 when other processes already load every core, "
                             "else torch's choice)")
    parser.set_defaults(func=run)


def busy_cpu_threads() -> int | None:
    """1 when the CPU is already saturated, else None (torch's default).

    torch's worker threads wait for each other at every op; when other processes hold the cores those
    waits dominate. On the 2-core machine this was written on, under a load average of 6-9, one thread
    decoded the demo's base at 1.1 tokens/s and two threads at under 0.4 (docs/demo.md)."""
    import os

    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load >= (os.cpu_count() or 1):
        print(f"CPU busy (load average {load:.1f}): using one torch thread; --threads overrides", file=sys.stderr)
        return 1
    return None


def pick_question(args) -> tuple[str, str | None]:
    if args.question is not None:
        if not args.question.strip():
            raise ProxyTuneError("--question is empty")
        return args.question.strip(), None
    if args.index < 0:
        raise ProxyTuneError("--index must be >= 0")
    from ..datasets import gsm

    example = gsm.heldout_examples(args.index + 1, seed=0)[args.index]
    return example.question, example.answer


def run(args: argparse.Namespace) -> int:
    from ..models import registry
    from ..facade.compare import generate_as
    from ..datasets.gsm import PROMPT, extract_answer, is_correct
    from ..facade.tuner import ProxyTuner

    trio = registry.resolve_trio(args.model)
    if trio is None:
        raise ProxyTuneError(f"unknown trio {args.model!r}; known trios: {', '.join(registry.TRIOS)}")
    question, answer = pick_question(args)
    threads = args.threads or busy_cpu_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)
    print(f"loading trio {args.model!r}: " + ", ".join(f"{role}={spec}" for role, spec in trio.items()),
          file=sys.stderr, flush=True)
    began = time.perf_counter()
    tuner = ProxyTuner.from_pretrained(args.model, alpha=args.alpha, device=args.device, dtype=args.dtype)
    load_seconds = time.perf_counter() - began
    print(f"loaded in {load_seconds:.1f} s, peak RSS {peak_rss_gb():.2f} GB\n", file=sys.stderr, flush=True)

    print(f"Question: {question}")
    if answer is not None:
        print(f"Correct answer: {answer}")
    request = tuner.request(PROMPT.format(question=question), max_new_tokens=args.max_new_tokens, stop=STOPS)
    for title, role in (("base alone (1.5B)", "base"), ("expert alone (0.5B + GSM LoRA)", "expert"),
                        (f"proxy-tuned (alpha={args.alpha:g})", None)):
        began = time.perf_counter()
        text = generate_as(tuner, request, role).strip()
        seconds = time.perf_counter() - began
        tokens = len(tuner.tokenizer(text, add_special_tokens=False)["input_ids"])
        verdict = ""
        if answer is not None:
            verdict = f" | extracted {extract_answer(text)!r}: {'correct' if is_correct(text, answer) else 'wrong'}"
        print(f"\n=== {title} === ({tokens} tokens, {tokens / seconds:.1f} tok/s{verdict})\n{text}", flush=True)
    print(f"\npeak RSS {peak_rss_gb():.2f} GB", file=sys.stderr)
    return 0
