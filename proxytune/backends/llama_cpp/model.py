"""One GGUF file loaded in-process by llama.cpp (llama-cpp-python's C bindings), and its contexts.

Weights are loaded once per file (mmap) and shared: an expert that is a LoRA adapter on the
anti-expert's weights is a second *context* over the same model with the adapter switched on.

A context holds one KV pool shared by many rows: each row is a llama.cpp *sequence* (seq_id).
Rows of one decoding step go through one `llama_decode` call, so the weights are read once per step
for the whole batch, as in the transformers source. Rewinding a row removes its tail cells
(`llama_memory_seq_rm`), which is exact: those cells are gone, not masked.

Threads: every llama.cpp call in the process runs under one lock. The roles of a proxy step run one
after another anyway; the lock also keeps a threaded server from running two models at once, which
on a small CPU makes each of them far slower than running them in turn with all cores each.
"""
from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...errors import ProxyTuneError

COMPUTE_LOCK = threading.RLock()
INSTALL_HINT = ("the llama.cpp backend needs llama-cpp-python: pip install 'proxytune[llama-cpp]' "
                "(build it portably with CMAKE_ARGS=\"-DGGML_NATIVE=OFF\"; see docs/llama-cpp.md)")
_backend_ready = False


def llama_cpp_module():
    """The llama_cpp bindings, imported on first use with llama.cpp's own logging kept quiet."""
    global _backend_ready
    try:
        import llama_cpp
    except ImportError as error:
        raise ProxyTuneError(INSTALL_HINT) from error
    if not _backend_ready:
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


RECENT_ERRORS: deque[str] = deque(maxlen=3)


def _keep_errors(level: int, text: bytes, user_data) -> None:
    # llama.cpp logs a lot while loading, errors included that are mere model quirks (Qwen's "control-looking
    # token ... </s>"): nothing is printed; the last errors go into the message when a load really fails.
    if level == 3:  # GGML_LOG_LEVEL_ERROR
        RECENT_ERRORS.append(text.decode("utf-8", errors="replace").strip())


try:  # the C callback must stay referenced for as long as llama.cpp may call it
    from llama_cpp import llama_log_callback as _callback_type

    _quiet_log = _callback_type(_keep_errors)
except ImportError:
    _quiet_log = None


def recent_errors() -> str:
    return f" (llama.cpp: {' / '.join(RECENT_ERRORS)})" if RECENT_ERRORS else ""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_gguf_file(path: Path) -> Path:
    """A readable file that starts with the GGUF magic, else a ProxyTuneError naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ProxyTuneError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise ProxyTuneError(f"{path} is not a file: the llama.cpp backend needs a .gguf model file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ProxyTuneError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    return path


class GGUFModel:
    """The weights, vocabulary and metadata of one GGUF file."""

    def __init__(self, path: str | Path):
        self.path = check_gguf_file(Path(path))
        self.llama_cpp = lib = llama_cpp_module()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        with COMPUTE_LOCK:
            RECENT_ERRORS.clear()
            pointer = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not pointer:
            raise ProxyTuneError(f"llama.cpp could not load {self.path}: the file is corrupt, truncated or of an "
                                 f"architecture this llama.cpp build does not know{recent_errors()}")
        self.pointer = pointer
        self._finalizer = weakref.finalize(self, lib.llama_model_free, pointer)
        self.vocab = lib.llama_model_get_vocab(pointer)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(pointer)
        self.size_bytes = lib.llama_model_size(pointer)
        self.adapters: dict[Path, object] = {}

    def metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(4096)
        length = self.llama_cpp.llama_model_meta_val_str(self.pointer, key.encode(), buffer, len(buffer))
        return None if length < 0 else buffer.value.decode("utf-8", errors="replace")

    @property
    def architecture(self) -> str:
        return self.metadata("general.architecture") or "unknown"

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """End-of-sequence and end-of-turn ids named in the GGUF metadata."""
        ids = {self.llama_cpp.llama_vocab_eos(self.vocab), self.llama_cpp.llama_vocab_eot(self.vocab)}
        return frozenset(int(i) for i in ids if 0 <= i < self.n_vocab)

    def token_bytes(self, token_id: int) -> bytes:
        """What llama.cpp prints for this id (special tokens as their text)."""
        buffer = ctypes.create_string_buffer(256)
        length = self.llama_cpp.llama_token_to_piece(self.vocab, token_id, buffer, len(buffer), 0, True)
        if length < 0:
            buffer = ctypes.create_string_buffer(-length)
            length = self.llama_cpp.llama_token_to_piece(self.vocab, token_id, buffer, len(buffer), 0, True)
        return buffer.raw[:length]

    def is_unused(self, token_id: int) -> bool:
        """Padding ids past the real vocabulary (Qwen's [PAD151665] ...): llama.cpp prints them as nothing."""
        return bool(self.llama_cpp.llama_vocab_get_attr(self.vocab, token_id) & self.llama_cpp.LLAMA_TOKEN_ATTR_UNUSED)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        data = text.encode()
        buffer = (self.llama_cpp.llama_token * (len(data) + 8))()
        count = self.llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), False, special)
        if count < 0:
            raise ProxyTuneError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return list(buffer[:count])

    def adapter(self, path: Path):
        """A LoRA adapter GGUF loaded onto these weights (once per file)."""
        path = check_gguf_file(path)
        if path not in self.adapters:
            with COMPUTE_LOCK:
                pointer = self.llama_cpp.llama_adapter_lora_init(self.pointer, str(path).encode())
            if not pointer:
                raise ProxyTuneError(f"llama.cpp could not load the LoRA adapter {path} onto {self.path}: not a "
                                     f"LoRA GGUF, or made for another model (see `proxytune convert-lora`)")
            self.adapters[path] = pointer  # freed with the model
        return self.adapters[path]


class Context:
    """A llama.cpp context over a GGUFModel: a KV pool of `n_ctx` cells shared by up to `n_seq` rows."""

    def __init__(self, model: GGUFModel, n_ctx: int, n_seq: int, threads: int, n_batch: int = 512,
                 adapter: Path | None = None, adapter_scale: float = 1.0, max_outputs: int = 128,
                 uniform_batches: bool = False):
        lib = self.llama_cpp = model.llama_cpp
        self.model, self.n_ctx, self.n_batch = model, n_ctx, n_batch
        self.max_outputs = max_outputs  # logit rows per llama_decode call (each row is n_vocab floats)
        # llama.cpp computes a call of one token with other kernels than a call of several (logits differ by
        # ~0.1 on average, as much as Q4 differs from fp32). uniform_batches pads one-token calls with a
        # throwaway token in a spare sequence, so how tokens are grouped never changes a logit.
        self.uniform_batches, self.spare_seq = uniform_batches, n_seq
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_seq_max = n_seq + 1  # the spare sequence
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # one pool for all rows: a long row may use what short rows leave
        params.no_perf = True
        # As llama-cpp-python's Llama does by default, so both compute the same logits (auto may pick flash attention).
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        with COMPUTE_LOCK:
            pointer = lib.llama_init_from_model(model.pointer, params)
        if not pointer:
            raise ProxyTuneError(f"llama.cpp could not create a context of {n_ctx} tokens for {model.path} "
                                 f"(out of memory?)")
        self.pointer = pointer
        self._finalizer = weakref.finalize(self, lib.llama_free, pointer)
        self.memory = lib.llama_get_memory(pointer)
        if adapter is not None:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(model.adapter(adapter))
            if lib.llama_set_adapters_lora(pointer, adapters, 1, (ctypes.c_float * 1)(adapter_scale)):
                raise ProxyTuneError(f"llama.cpp could not apply the LoRA adapter {adapter} to {model.path}")
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self._batch_finalizer = weakref.finalize(self, lib.llama_batch_free, self.batch)

    def set_threads(self, threads: int) -> None:
        self.llama_cpp.llama_set_n_threads(self.pointer, threads, threads)

    def remove(self, seq: int, start: int = -1) -> None:
        """Forget the cells of sequence `seq` from position `start` on (all of them by default)."""
        if not self._finalizer.alive:
            return
        with COMPUTE_LOCK:
            self.llama_cpp.llama_memory_seq_rm(self.memory, seq, start, -1)

    def copy(self, source_seq: int, target_seq: int) -> None:
        with COMPUTE_LOCK:
            self.llama_cpp.llama_memory_seq_cp(self.memory, source_seq, target_seq, -1, -1)

    def run(self, rows: Sequence[tuple[int, int, Sequence[int], bool]], width: int) -> torch.Tensor:
        """Evaluate rows of (seq, first position, tokens, every position?) and return logits, [outputs, width]:
        every token's for rows asking for all positions, else the last token's, in row order."""
        items = []  # (token, position, seq, wants logits)
        for seq, start, tokens, every in rows:
            last = len(tokens) - 1
            items += [(int(t), start + i, seq, every or i == last) for i, t in enumerate(tokens)]
        out = torch.empty((sum(flag for *_, flag in items), width), dtype=torch.float32)
        done = begin = 0
        with COMPUTE_LOCK:
            while begin < len(items):
                end, outputs = begin, 0
                while end < len(items) and end - begin < self.n_batch and outputs + items[end][3] <= self.max_outputs:
                    outputs += items[end][3]
                    end += 1
                chunk = items[begin:end]
                if self.uniform_batches and len(chunk) == 1:
                    chunk = chunk + [(0, 0, self.spare_seq, False)]
                self._decode(chunk)
                if len(chunk) > end - begin:
                    self.remove(self.spare_seq)
                if outputs:
                    logits = np.ctypeslib.as_array(self.llama_cpp.llama_get_logits(self.pointer),
                                                   shape=(outputs, self.model.n_vocab))
                    out[done:done + outputs] = torch.from_numpy(logits[:, :width])
                done += outputs
                begin = end
        return out

    def _decode(self, items) -> None:
        batch = self.batch
        for i, (token, position, seq, wants) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, wants
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        code = self.llama_cpp.llama_decode(self.pointer, batch)
        if code == 1:
            raise ProxyTuneError(f"the llama.cpp context of {self.model.path.name} is full ({self.n_ctx} tokens "
                                 f"shared by all rows): give a larger n_ctx (--ctx) or decode fewer rows at once")
        if code != 0:
            raise ProxyTuneError(f"llama.cpp failed to evaluate {len(items)} tokens on {self.model.path} "
                                 f"(llama_decode returned {code})")
