"""Where do two greedy decodings of the same rows part, and how close was the call there?

    python benchmarks/divergence.py --prompts 4 --new-tokens 32

Runs the demo trio in bf16 on GSM prompts four ways — plain batched, plain one row at a time,
speculative batched (two-model), plain batched with the one-pass LoRA pair — and for each row that
differs from plain batched prints the first differing position and the proxy's top-2 logit margin
there (in bf16 logits are multiples of 2^-4..2^-3 near 20, so a margin of one step is a tie that any
change of kernel or batch shape can break either way).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import run as bench  # noqa: E402
from proxytune import ProxyTuner  # noqa: E402
from proxytune.backends.lora_pair import LoraPair  # noqa: E402
from proxytune.backends.transformers import TransformersSource  # noqa: E402


def margin(tuner: ProxyTuner, prompt: str, tokens: list[int]) -> float:
    """Top-1 minus top-2 combined logit after `tokens`, from full-sequence forwards."""
    ids = tuner.encode(prompt) + tokens
    logits = {role: source.sequence_logits([ids])[0][-1] for role, source in tuner.sources.items()}
    z = logits["base"] + tuner.pairs[0].alpha * (logits["expert"] - logits["anti_expert"])
    top = z.topk(2).values
    return float(top[0] - top[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, base, small, tokenizer, alpha = bench.load_demo(torch.bfloat16)
    sources = [TransformersSource(base), TransformersSource(small), TransformersSource(small, adapter_disabled=True)]
    two = ProxyTuner(*sources, tokenizer=tokenizer, alpha=alpha)
    pair = LoraPair(small)
    paired = ProxyTuner(sources[0], pair.expert, pair.anti_expert, tokenizer=tokenizer, alpha=alpha)
    prompts = bench.gsm_prompts(args.prompts)
    n = args.new_tokens
    reference = [o.token_ids for o in two.generate(prompts, max_new_tokens=n)]
    variants = {
        "plain, one row at a time": [two.generate(p, max_new_tokens=n)[0].token_ids for p in prompts],
        "speculative, batched": [o.token_ids for o in two.generate(prompts, max_new_tokens=n, speculative=True)],
        "LoRA pair, batched": [o.token_ids for o in paired.generate(prompts, max_new_tokens=n)],
    }
    for name, rows in variants.items():
        same = sum(a == b for a, b in zip(rows, reference))
        print(f"{name}: {same}/{len(rows)} rows identical to plain batched")
        for i, (got, want) in enumerate(zip(rows, reference)):
            if got != want:
                j = next(k for k in range(min(len(got), len(want))) if got[k] != want[k])
                print(f"  row {i}: first differs at token {j}: {tokenizer.decode(want[j:j + 1])!r} vs "
                      f"{tokenizer.decode(got[j:j + 1])!r}; proxy top-2 margin there "
                      f"{margin(two, prompts[i], want[:j]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
