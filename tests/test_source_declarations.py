"""Every kind of logit source declares what it is: the ids that end its text (`eos_token_ids`), whether its
logits cover the whole vocabulary (`distribution`), whether a server computes them (`server_calls`).
Callers read these declarations, never the source's type."""
from __future__ import annotations

import pytest

from proxytune.backends.protocol import LogitSource
from proxytune.backends.transformers import TransformersSource
from proxytune.errors import ProxyTuneError
from tiny import lora_of, tiny_model


def computed_here(source) -> bool:
    return isinstance(source, LogitSource) and source.distribution == "full" and source.server_calls is None


def test_a_transformers_model_ends_text_at_its_generation_configs_ids_and_its_tokenizers(tok):
    model = tiny_model(0, eos=[5, 7])
    assert TransformersSource(model).eos_token_ids == frozenset({5, 7})
    source = TransformersSource(model, tokenizer=tok)
    assert source.eos_token_ids == frozenset({5, 7, tok.eos_token_id}) and computed_here(source)


def test_a_model_whose_generation_config_names_no_end_ends_text_at_its_tokenizers_only(tok):
    model = tiny_model(0)
    model.generation_config.eos_token_id = None
    assert TransformersSource(model).eos_token_ids == frozenset()
    assert TransformersSource(model, tokenizer=tok).eos_token_ids == frozenset({tok.eos_token_id})


def test_both_roles_of_a_lora_pair_end_text_where_the_sources_they_replace_did(tok):
    from proxytune.backends.lora_pair import LoraPair, PairedRole, pair_lora_roles

    peft_model = lora_of(tiny_model(2, eos=9))
    expert = TransformersSource(peft_model, name="expert", tokenizer=tok)
    anti_expert = TransformersSource(peft_model, name="anti_expert", adapter_disabled=True)
    paired = pair_lora_roles({"expert": expert, "anti_expert": anti_expert}, [("expert", "anti_expert")])
    for role in paired.values():
        assert isinstance(role, PairedRole) and computed_here(role)
        assert role.eos_token_ids == frozenset({9, tok.eos_token_id})
    assert LoraPair(peft_model).expert.eos_token_ids == frozenset({9})  # alone: the model's own


def test_a_remote_model_ends_text_at_its_tokenizers_eos_and_gives_only_its_top_k(tok):
    from proxytune.backends.remote.source import RemoteSource
    from proxytune.backends.remote.spec import parse_spec

    source = RemoteSource(parse_spec("openai:http://127.0.0.1:9/v1?tokenizer=tiny"), tok, connect=False)
    try:
        assert isinstance(source, LogitSource) and source.distribution == "top_k"
        assert source.eos_token_ids == frozenset({tok.eos_token_id})
        assert source.server_calls.calls == 0 and source.server_calls.summary("base").startswith("base: 0 calls")
    finally:
        source.close()


def test_a_llama_cpp_model_ends_text_at_the_ids_its_gguf_names(tmp_path):
    pytest.importorskip("llama_cpp")
    from proxytune.backends.llama_cpp.source import LlamaCppSource
    from tiny_gguf import write_tiny_gguf

    source = LlamaCppSource(write_tiny_gguf(tmp_path / "tiny.gguf"), threads=1, n_ctx=128)
    assert source.eos_token_ids == source.gguf.eos_token_ids == frozenset({1}) and computed_here(source)


def test_a_byte_view_ends_text_at_its_own_end_of_text_and_refuses_a_top_k_model(tok):
    from proxytune.backends.remote.source import RemoteSource
    from proxytune.backends.remote.spec import parse_spec
    from proxytune.engine.bytelevel import END_OF_TEXT, ByteSource, ByteVocab, token_bytes

    vocab = ByteVocab(token_bytes(tok), len(tok), [tok.eos_token_id])
    view = ByteSource(TransformersSource(tiny_model(0), tokenizer=tok), vocab)
    assert view.eos_token_ids == frozenset({END_OF_TEXT}) and computed_here(view)
    remote = RemoteSource(parse_spec("openai:http://127.0.0.1:9/v1?tokenizer=tiny"), tok, connect=False)
    try:
        with pytest.raises(ProxyTuneError, match="returns only its top-k logprobs"):
            ByteSource(remote, vocab)
    finally:
        remote.close()
