"""Two llama-cpp-python builds, one GGUF, batch-1 greedy decoding: which build is faster here?

    python benchmarks/llama_cpp_builds.py --other /tmp/native-site [--gguf PATH] [--rounds 3] [--tokens 32]

The installed build runs against the build installed with `pip install --target DIR` in --other (for instance
one made with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON ..."), each in its own process, alternately, so a
busy or slow phase of the machine hits both. Prints ms/token per round and the median ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import sys, time
import llama_cpp
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=int(sys.argv[3]), verbose=False)
tokens = llm.tokenize(b"def quicksort(items):")
llm.eval(tokens)
n = int(sys.argv[2])
start = time.perf_counter()
for _ in range(n):
    llm.eval([tokens[-1]])
features = llama_cpp.llama_print_system_info().decode()
print((time.perf_counter() - start) / n, ",".join(part.split("=")[0].split(":")[-1].strip()
                                                  for part in features.split("|") if part.strip().endswith("= 1")))
"""


def run(gguf: Path, tokens: int, threads: int, site: str | None) -> tuple[float, str]:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, str(gguf), str(tokens), str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), out[1] if len(out) > 1 else ""


def main() -> int:
    from proxytune.models.registry import gguf_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, help="directory a second build was pip-installed into (--target)")
    parser.add_argument("--gguf", default=None, help="default: the demo base's packaged Q4_K_M GGUF")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    gguf = Path(args.gguf) if args.gguf else gguf_path("qwen2.5-coder-1.5b-instruct")
    times = {"installed": [], "other": []}
    for r in range(args.rounds):
        order = ["installed", "other"] if r % 2 == 0 else ["other", "installed"]
        for name in order:
            seconds, features = run(gguf, args.tokens, args.threads, args.other if name == "other" else None)
            times[name].append(seconds)
            print(f"round {r + 1}: {name:9s} {1000 * seconds:6.1f} ms/token  [{features}]", flush=True)
    ratio = statistics.median(o / i for o, i in zip(times["other"], times["installed"]))
    print(f"{gguf.name}, {args.threads} threads, {args.tokens} tokens: median other/installed time = {ratio:.2f} "
          f"(< 1: the other build is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
