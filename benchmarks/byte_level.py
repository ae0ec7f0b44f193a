"""Byte-level vs token-level proxy-tuning on the same base and prompts: time per generated character.

Variants, timed in alternating rounds within one run (this machine's load changes; only ratios mean much):

- token:       the demo trio (Qwen2.5-Coder-1.5B base, 0.5B + GSM LoRA expert, 0.5B anti-expert), token level;
- bytes-same:  the same trio forced to the byte level (byte_level=True): the cost of the byte view alone;
- bytes-gemma: the same base with a pair of another family, Gemma-3-270M (the GSM LoRA trained on it
               with `proxytune tune` when --gemma-expert is given, else Gemma against itself as a
               stand-in with the same cost), byte level since the vocabularies differ.

Each decodes the same held-out GSM prompts greedily, as one batch, to `--chars` characters (token level:
`--tokens`), and we report milliseconds per generated character, ratios to `token`, and for the byte
views batched forwards and token paths (forward rows) per character per role, hypotheses per byte and the
mass pruned.

    python benchmarks/byte_level.py --prompts 4 --rounds 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from proxytune import ProxyTuner  # noqa: E402
from proxytune.backends.transformers import TransformersSource  # noqa: E402
from proxytune.datasets import gsm  # noqa: E402
from proxytune.models.loading import load_roles  # noqa: E402


def tuners(args) -> dict[str, ProxyTuner]:
    specs = {"base": "qwen2.5-coder-1.5b-instruct", "expert": "gsm-qwen2.5-coder-0.5b",
             "anti_expert": "qwen2.5-coder-0.5b-instruct"}
    loaded = load_roles(specs, [("expert", "anti_expert")], dtype="bfloat16")
    sources = {role: source for role, (source, _) in loaded.items()}
    tokenizers = {role: tokenizer for role, (_, tokenizer) in loaded.items()}
    out = {"token": ProxyTuner(sources["base"], sources["expert"], sources["anti_expert"], alpha=args.alpha,
                               tokenizers=tokenizers),
           "bytes-same": ProxyTuner(sources["base"], sources["expert"], sources["anti_expert"], alpha=args.alpha,
                                    tokenizers=tokenizers, byte_level=True, prune=args.prune)}
    gemma = load_roles({"expert": args.gemma_expert or "gemma-3-270m", "anti_expert": "gemma-3-270m"},
                       [("expert", "anti_expert")], dtype="bfloat16")
    expert, anti = gemma["expert"][0], gemma["anti_expert"][0]
    if expert is anti:  # the stand-in: two sources over one model, so each role runs its own forwards
        anti = TransformersSource(expert.model, name="anti_expert")
    out["bytes-gemma"] = ProxyTuner(sources["base"], expert, anti, alpha=args.alpha, prune=args.prune,
                                    tokenizers={"base": tokenizers["base"], "expert": gemma["expert"][1],
                                                "anti_expert": gemma["anti_expert"][1]})
    return out


def run_once(tuner: ProxyTuner, prompts: list[str], budget: int) -> tuple[float, int, list[str]]:
    for source in {id(s): s for s in tuner.sources.values()}.values():
        if tuner.byte_level:
            source.stats = type(source.stats)()
    start = time.perf_counter()
    outs = tuner.generate(prompts, max_new_tokens=budget, batch_size=len(prompts))
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.text) for o in outs), [o.text for o in outs]


def prune_error(tuner: ProxyTuner, examples, prunes, reference: float = 1e-8) -> None:
    """The error pruning makes: each prune's log p̃ of the reference answers' bytes against a (nearly)
    unpruned reading (prune 1e-8, up to 128 hypotheses per row), per byte and in total."""
    items = [tuner.score_item(e.prompt, e.completion) for e in examples]
    sources = list({id(s): s for s in tuner.sources.values()}.values())

    def scores(prune, most):
        for source in sources:
            source.prune, source.max_hypotheses, source.stats = prune, most, type(source.stats)()
        start = time.perf_counter()
        out = tuner.score_items(items)
        return out, time.perf_counter() - start, {s.name: s.stats.as_dict() for s in sources}

    exact, seconds, stats = scores(reference, 128)
    print(f"reference prune {reference:g}: {seconds:.1f} s, paths/byte "
          + ", ".join(f"{role} {s['paths_per_byte']}" for role, s in stats.items()))
    print(f"{'prune':>8} {'max |Δ log p̃| per byte':>24} {'max |Δ total|':>14} {'seconds':>8}  paths/byte per role")
    for prune in prunes:
        got, seconds, stats = scores(prune, 64)
        per_byte = max(max(abs(a - b) for a, b in zip(g.logprobs, e.logprobs)) for g, e in zip(got, exact))
        total = max(abs(g.total - e.total) for g, e in zip(got, exact))
        print(f"{prune:>8g} {per_byte:>24.2e} {total:>14.2e} {seconds:>8.1f}  "
              + ", ".join(f"{role} {s['paths_per_byte']}" for role, s in stats.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48, help="token-level budget")
    parser.add_argument("--chars", type=int, default=160, help="byte-level budget (bytes)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--prune", type=float, default=1e-5)
    parser.add_argument("--gemma-expert", default=None, help="the GSM LoRA on Gemma-3-270M (a `proxytune tune` output)")
    parser.add_argument("--variants", nargs="+", default=["token", "bytes-same", "bytes-gemma"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prune-error", type=int, default=0, metavar="N",
                        help="instead of timing: the error of each pruning threshold on N reference answers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [example.prompt for example in gsm.heldout_examples(args.prompts, seed=0)]
    all_tuners = tuners(args)
    if args.prune_error:
        for variant in [v for v in args.variants if v != "token"]:
            print(f"\n{variant}, α={args.alpha:g}")
            prune_error(all_tuners[variant], gsm.heldout_examples(args.prune_error, seed=0),
                        [1e-4, 1e-5, 1e-6])
        return
    results: dict[str, list[tuple[float, int]]] = {v: [] for v in args.variants}
    texts: dict[str, list[str]] = {}
    stats: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for variant in (args.variants if round_ % 2 == 0 else args.variants[::-1]):
            tuner = all_tuners[variant]
            seconds, chars, texts[variant] = run_once(tuner, prompts, args.chars if tuner.byte_level else args.tokens)
            results[variant].append((seconds, chars))
            if tuner.byte_level:
                stats[variant] = {role: source.stats.as_dict() for role, source in tuner.sources.items()}
            print(f"round {round_ + 1} {variant}: {chars} chars in {seconds:.1f} s "
                  f"({1000 * seconds / max(chars, 1):.1f} ms/char)", flush=True)
    print(f"\n{args.prompts} held-out GSM prompts, one batch, greedy, α={args.alpha:g}, prune={args.prune:g}, "
          f"torch threads {torch.get_num_threads()}")
    per_char = {v: sum(s for s, _ in r) / max(1, sum(c for _, c in r)) for v, r in results.items()}
    print(f"{'variant':<12} {'ms/char':>8} {'× token':>8}")
    for variant, value in per_char.items():
        ratio = value / per_char["token"] if "token" in per_char else float("nan")
        print(f"{variant:<12} {1000 * value:>8.1f} {ratio:>8.2f}")
    for variant, by_role in stats.items():
        print(f"\n{variant}: per role, per generated byte (all rows)")
        for role, s in by_role.items():
            print(f"  {role:<12} batched forwards/byte {s['forwards'] / max(1, s['bytes']):.3f}  token paths/byte "
                  f"{s['paths_per_byte']:.3f}  hypotheses/byte {s['mean_hypotheses']:.2f} (most "
                  f"{s['most_hypotheses']})  pruned mass {s['pruned_mass']:.1e}")
    for variant, outs in texts.items():
        print(f"\n--- {variant}, first prompt ---\n{outs[0][:300]}")


if __name__ == "__main__":
    main()
