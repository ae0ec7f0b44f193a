"""`proxytune convert-lora`: a peft LoRA adapter -> a llama.cpp LoRA GGUF for its GGUF base.

Not needed for `gguf:ADAPTER` specs (they convert on first use and cache the result); this is the
reproducible command for people who want the file, e.g. for llama.cpp's own tools (`--lora`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ProxyTuneError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-lora", help="convert a peft LoRA adapter to a llama.cpp LoRA GGUF",
        description="Write a llama.cpp LoRA adapter GGUF for a peft adapter whose base is a GGUF model. "
                    "The file names its base, so `--expert gguf:OUT.gguf` runs it on that base in llama.cpp.")
    parser.add_argument("adapter", help="peft adapter directory or registered adapter name")
    parser.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    parser.add_argument("--base", default=None,
                        help="the base model: .gguf file or registered model name (default: the adapter's "
                             "base_model_name_or_path)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.gguf_roles import LlamaCppRoles
    from ..models.specs import adapter_base, local_path
    from ..models.lora_gguf import convert_lora

    adapter_dir = local_path(args.adapter)
    base_spec = args.base or adapter_base(adapter_dir)
    if base_spec is None:
        raise ProxyTuneError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)")
    base_gguf, base_adapter = LlamaCppRoles().resolve(base_spec)
    if base_adapter is not None:
        raise ProxyTuneError(f"the base {base_spec} is itself an adapter")
    output = Path(args.output)
    if output.suffix != ".gguf":
        raise ProxyTuneError(f"the output {output} should end in .gguf")
    convert_lora(adapter_dir, base_gguf, output, base_spec)
    print(f"wrote {output} (LoRA of {base_gguf.name}); run it with --expert gguf:{output}", file=sys.stderr)
    return 0
