"""Speed on an accelerator with a random-initialised trio of realistic shape (no weights to download).

base: a Llama of ~1.1B parameters (hidden 2048, 22 layers, 32k vocabulary); expert and anti-expert:
~0.2B (hidden 1024, 12 layers), the expert a LoRA of the anti-expert. Greedy, batch 1, EOS ignored;
plain proxy decoding, speculative decoding (k from measured step times), and the one-pass LoRA pair,
in alternating rounds, plus the base's cost of verifying w tokens at once (what decides k).
Random models agree little, so the acceptance rate is low: read the width costs, not the speedup.

    python benchmarks/device_trio.py [--device cuda] [--dtype bfloat16] [--tokens 64] [--rounds 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from proxytune.backends.lora_pair import LoraPair  # noqa: E402
from proxytune.backends.transformers import TransformersSource  # noqa: E402
from proxytune.engine.decoding import Decoding, Request  # noqa: E402
from proxytune.engine.settings import Settings  # noqa: E402
from proxytune.engine.roles import ExpertPair  # noqa: E402
from proxytune.engine.speculative import SpeculativeDecoding  # noqa: E402


def model(hidden: int, layers: int, device, dtype, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Ids:
    """Stands in for a tokenizer: these random models have no text, only ids."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def per_token(base, pair, prompt_ids, n, speculative, device) -> tuple[float, list[int]]:
    request = Request({"base": prompt_ids, "expert": prompt_ids, "anti_expert": prompt_ids},
                      Settings(n, alpha=(1.0,)))
    kind = SpeculativeDecoding if speculative else Decoding
    decoding = kind(base, [pair], [request], Ids(), eos_ids=set())
    steps = decoding.steps()
    next(steps)
    sync(device)
    start = time.perf_counter()
    for _ in steps:
        pass
    sync(device)
    return (time.perf_counter() - start) / (n - 1), decoding.outputs()[0].token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    from peft import LoraConfig, get_peft_model
    base = model(2048, 22, args.device, dtype, 0)
    small = model(1024, 12, args.device, dtype, 1)
    torch.manual_seed(2)
    peft = get_peft_model(small, LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    billions = lambda m: sum(p.numel() for p in m.parameters()) / 1e9  # noqa: E731
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), {args.dtype}, "
          f"torch {torch.__version__}; base {billions(base):.2f}B, small {billions(small):.2f}B")
    pair = LoraPair(peft)
    base_source = TransformersSource(base, name="base")
    pairs = {"sequential": ExpertPair(TransformersSource(peft, name="expert"),
                                      TransformersSource(peft, name="anti_expert", adapter_disabled=True)),
             "lora pair": ExpertPair(pair.expert, pair.anti_expert)}
    prompt = list(range(100, 164))
    session = base_source.open([prompt])
    session.prefill()
    widths = {}
    for w in (1, 2, 4, 8):
        times = []
        for _ in range(3):
            sync(args.device)
            start = time.perf_counter()
            session.advance(torch.randint(100, 1000, (1, w)))
            sync(args.device)
            times.append(time.perf_counter() - start)
            session.rewind([0])
        widths[w] = min(times)
    print("base verification: " + ", ".join(f"w={w} {1000 * s:.1f} ms ({s / widths[1]:.2f}x)" for w, s in widths.items()))
    variants = {"plain": ("sequential", False), "speculative": ("sequential", True),
                "lora pair": ("lora pair", False), "lora pair + speculative": ("lora pair", True)}
    rounds = []
    for r in range(args.rounds):
        names = list(variants)[r % 4:] + list(variants)[: r % 4]
        rounds.append({name: per_token(base_source, pairs[variants[name][0]], prompt, args.tokens, variants[name][1],
                                       args.device) for name in names})
        plain_time, plain_ids = rounds[-1]["plain"]
        print(f"round {r + 1}: " + "; ".join(f"{n} {1000 * t:.1f} ms/token ({plain_time / t:.2f}x, "
                                               f"{'same' if ids == plain_ids else 'DIFFERENT'} tokens)"
                                               for n, (t, ids) in rounds[-1].items()), flush=True)
    for name in variants:
        ratio = statistics.median(r["plain"][0] / r[name][0] for r in rounds)
        print(f"{name}: {ratio:.2f}x plain")


if __name__ == "__main__":
    main()
