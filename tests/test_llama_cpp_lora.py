"""llama.cpp against transformers on the same GGUF, and a peft LoRA expert converted for llama.cpp."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'proxytune[llama-cpp]')")

from test_llama_cpp import smollm2_gguf  # noqa: E402

from proxytune.models.gguf_roles import LlamaCppRoles  # noqa: E402
from proxytune.models.lora_gguf import convert_lora  # noqa: E402
from proxytune.backends.llama_cpp.model import GGUFModel  # noqa: E402
from proxytune.backends.llama_cpp.source import LlamaCppSource  # noqa: E402

TEXT = ("Proxy-tuning steers a large pretrained model with the difference between a small tuned expert and "
        "its untuned twin. def add(a, b):\n    return a + b\nThe answer is 42.")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def gguf_model() -> GGUFModel:
    return GGUFModel(smollm2_gguf())


@pytest.fixture(scope="module")
def hf_dir():
    from proxytune.models import registry

    if "smollm2-135m-instruct" not in getattr(registry, "MODELS", {}):
        pytest.skip("the registry does not know smollm2-135m-instruct")
    return registry.resolve_model("smollm2-135m-instruct")  # dequantised from the same GGUF, fp32


def hf_logits(model, tokens) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].float()


def test_llama_cpp_and_transformers_agree_on_the_same_gguf(gguf_model, hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(hf_dir)(TEXT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ours = LlamaCppSource(gguf_model, threads=1, n_ctx=512).sequence_logits([tokens])[0]
    theirs = hf_logits(model, tokens)[:, : ours.shape[1]]
    agreement = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert agreement >= 0.9, agreement  # Q4_1 weights, Q8 activations in llama.cpp vs dense fp32


def test_a_converted_lora_shifts_llama_cpp_as_peft_shifts_transformers(gguf_model, hf_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(hf_dir)(TEXT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    base_hf = hf_logits(model, tokens)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                  init_lora_weights=False))
    lora_hf = hf_logits(peft_model, tokens)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(gguf_model.path)  # so gguf:ADAPTER finds its GGUF base
    config_file.write_text(json.dumps(config))

    converted = convert_lora(adapter_dir, gguf_model.path, tmp_path / "lora.gguf")
    plain = LlamaCppSource(gguf_model, threads=1, n_ctx=512).sequence_logits([tokens])[0]
    tuned = LlamaCppSource(gguf_model, threads=1, n_ctx=512, adapter=converted).sequence_logits([tokens])[0]
    width = plain.shape[1]
    shift_hf, shift_cpp = (lora_hf - base_hf)[:, :width], tuned - plain
    cosine = torch.nn.functional.cosine_similarity(shift_hf.flatten(), shift_cpp.flatten(), dim=0)
    assert cosine > 0.95, cosine  # q/k rows permuted right: a wrong permutation gives a far lower cosine
    assert (tuned.argmax(-1) == lora_hf[:, :width].argmax(-1)).float().mean() >= 0.9

    roles = LlamaCppRoles(threads=1, n_ctx=512, lora_cache=tmp_path / "converted")
    expert, _ = roles.source(f"gguf:{adapter_dir}", "expert")
    anti, _ = roles.source(f"gguf:{gguf_model.path}", "anti_expert")
    assert expert.gguf is anti.gguf  # one copy of the weights, the adapter switched on per context
    assert torch.allclose(expert.sequence_logits([tokens])[0], tuned, atol=1e-3)
    cached = list((tmp_path / "converted").glob("*.gguf"))
    assert len(cached) == 1 and LlamaCppRoles().resolve(str(cached[0]))[0] == gguf_model.path
