"""Tiny random models and a local tokenizer: offline, seconds to build."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Answer the following question. Question: what is 3 + 4? Answer: 7 #### 7",
    "def add(a, b):\n    return a + b\n",
    "Tuning language models by proxy shifts the logits of a large model.",
] * 20

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<eot>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@functools.lru_cache(maxsize=None)
def tiny_sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Another family's vocabulary: SentencePiece-style ("▁" for a space, <0xNN> byte fallback), other merges."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<eos>", "<bos>"]))
    state = json.loads(trained.to_str())["model"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE.replace("</s>", "<eos>")
    return fast


@functools.lru_cache(maxsize=None)
def tiny_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A vocabulary of single bytes (no merges) and an end of text: every text has exactly one tokenization,
    and every token writes text or ends it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=257, special_tokens=["</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")


def tiny_model(seed: int, vocab_size: int | None = None, eos: list[int] | int | None = None,
               hidden: int = 64, layers: int = 2, max_positions: int = 256) -> LlamaForCausalLM:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=0,
                         eos_token_id=1 if eos is None else eos, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper distributions than the default init, so greedy paths are stable
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = 1
    return model


def lora_of(model, seed=0):
    """`model` (changed in place) as a peft model with a random LoRA adapter that really changes its logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        init_lora_weights=False)  # random A and B: the adapter really changes the logits
    return get_peft_model(model, config).eval()


def save_lora(base_dir, directory, seed=0):
    """A random LoRA adapter of the model saved in base_dir, saved as peft saves one (its config names that base)."""
    from transformers import AutoModelForCausalLM

    lora_of(AutoModelForCausalLM.from_pretrained(base_dir), seed=seed).save_pretrained(directory)
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (Path(directory) / "adapter_config.json").write_text(json.dumps(config))
