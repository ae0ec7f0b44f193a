"""Fine-tune a small model into an expert: LoRA (peft) by default, or all weights.

The output directory works directly as `--expert`: a peft adapter directory whose base is the model
spec as given (a registered name stays a name, so the adapter and an anti-expert of the same name
share one copy of the weights), or with --full a plain model directory.

On a CPU, bf16 weights train faster than fp32 (1.44× here, scripts/bench_tune.py); peft keeps
the LoRA matrices themselves in fp32 (`autocast_adapter_dtype`) so AdamW's small updates are not lost
to bf16 rounding.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models import registry
from ..errors import ProxyTuneError
from ..models.loading import load_plain, pick_device, pick_dtype
from ..usage import peak_rss_gb
from .data import IGNORE, Example, batches, collate, read_jsonl, split_heldout, tokenize

STATE = "trainer_state.pt"


@dataclass
class TuneConfig:
    model: str
    data: str
    output: str
    heldout_data: str | None = None  # else a held-out fraction of `data`
    heldout_fraction: float = 0.05
    # more sets (name -> JSONL) whose loss is measured before and after training, e.g. validation templates
    # (where a recipe is chosen) beside the held-out ones (what is reported)
    loss_sets: dict = field(default_factory=dict)
    full: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    epochs: float = 1.0
    batch_size: int = 4
    learning_rate: float | None = None  # 2e-4 for LoRA, 1e-5 full
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 320
    seed: int = 0
    dtype: str | None = None  # bf16 for LoRA on CPU, fp32 for full fine-tuning
    device: str | None = None
    save_every: int = 50  # optimizer steps between checkpoints
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    history: list = field(default_factory=list)

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (1e-5 if self.full else 2e-4)


def check_model(spec: str) -> None:
    if not Path(spec).expanduser().exists() and spec not in registry.MODELS:
        raise ProxyTuneError(f"unknown model {spec!r}: not a path and not a registered name "
                             f"(registered: {', '.join(registry.MODELS)})")


def check_output(config: TuneConfig) -> Path:
    output = Path(config.output).expanduser()
    if config.resume:
        if not (output / "checkpoint" / STATE).exists():
            raise ProxyTuneError(f"--resume: {output} holds no checkpoint to resume from")
    elif output.exists() and any(output.iterdir()):
        if not config.overwrite:
            raise ProxyTuneError(f"output directory {output} exists and is not empty; pass --overwrite to replace it "
                                 f"or --resume to continue its run")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    return output


def base_spec(spec: str) -> str:
    """What an adapter records as its base: a registered name as is, a path made absolute."""
    if spec in registry.MODELS and not Path(spec).exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def build_model(config: TuneConfig, device: torch.device):
    dtype = pick_dtype(config.dtype or ("float32" if config.full or device.type != "cpu" else "bfloat16"), device)
    model, tokenizer = load_plain(config.model, device, dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.full:
        return model, tokenizer
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    model.peft_config["default"].base_model_name_or_path = base_spec(config.model)
    return model, tokenizer


LOSS_CHUNK = 256  # completion positions whose logits exist at once


def completion_loss(model, batch: dict, full: bool, chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, count) over the completion tokens of a batch, the loss transformers computes
    (next-token, prompt and padding ignored), without its [batch, length, vocab] logits: only the positions
    that predict a completion token go through the output layer, `chunk` at a time, and each chunk's logits
    are recomputed in the backward pass (activation checkpointing) instead of being kept. With a 151,936-token
    vocabulary the full logits of 4 x 320 positions are 0.4 GB in bf16, and the loss, its softmax and their
    gradients several times that again (scripts/bench_tune_memory.py)."""
    from torch.utils.checkpoint import checkpoint

    causal = model if full else model.get_base_model()  # peft: the transformers model under the adapters
    hidden = causal.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    hidden, labels = hidden[:, :-1][keep], labels[keep]
    head = causal.get_output_embeddings()

    def summed(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(labels), chunk):
        part = (hidden[start:start + chunk], labels[start:start + chunk])
        total = total + (checkpoint(summed, *part, use_reentrant=False) if torch.is_grad_enabled() else summed(*part))
    return total, len(labels)


@torch.no_grad()
def heldout_loss(model, examples: list[Example], pad_id: int, batch_size: int, full: bool = False) -> float | None:
    """Mean cross-entropy per completion token (token-weighted over the whole held-out set)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        summed, n = completion_loss(model, batch, full)
        total, count = total + summed.item(), count + n
    model.train(was_training)
    return total / count


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_model(model, tokenizer, directory: Path, full: bool) -> None:
    model.save_pretrained(directory)
    if full:
        tokenizer.save_pretrained(directory)


def save_checkpoint(output: Path, model, tokenizer, optimizer, step: int, config: TuneConfig) -> None:
    """Written beside, then swapped in, so a run killed mid-save still resumes from the previous one."""
    temp, final, old = output / "checkpoint.tmp", output / "checkpoint", output / "checkpoint.old"
    shutil.rmtree(temp, ignore_errors=True)
    save_model(model, tokenizer, temp, config.full)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "history": config.history,
                "torch_rng": torch.get_rng_state()}, temp / STATE)
    if final.exists():
        final.rename(old)
    temp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(output: Path, model, optimizer, config: TuneConfig) -> int:
    checkpoint = output / "checkpoint"
    if not checkpoint.exists() and (output / "checkpoint.old").exists():
        (output / "checkpoint.old").rename(checkpoint)  # killed between the two renames
    try:  # weights_only: tensors, numbers, strings and containers; anything else is refused, never executed
        state = torch.load(checkpoint / STATE, weights_only=True)
    except Exception as error:
        raise ProxyTuneError(f"{checkpoint / STATE} is not a checkpoint this program wrote (it holds more than "
                             f"tensors and numbers: {type(error).__name__}); delete {checkpoint} to start over") from None
    if config.full:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
    else:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    config.history[:] = state["history"]
    return int(state["step"])


def tune(config: TuneConfig) -> dict:
    """Train, write the expert to config.output, return a summary (losses, tokens/s, wall time)."""
    check_model(config.model)
    rows = read_jsonl(Path(config.data))
    if config.heldout_data:
        train_rows, heldout_rows = rows, read_jsonl(Path(config.heldout_data))
    else:
        train_rows, heldout_rows = split_heldout(rows, config.heldout_fraction, config.seed)
    output = check_output(config)
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    model, tokenizer = build_model(config, device)
    train, heldout = tokenize(train_rows, tokenizer, config.max_length), []
    if heldout_rows:
        heldout = tokenize(heldout_rows, tokenizer, config.max_length)
    pad_id = tokenizer.pad_token_id

    epochs = [batches(train, config.batch_size, config.seed, e) for e in range(math.ceil(config.epochs))]
    plan = [batch for epoch in epochs for batch in epoch][:max(1, round(config.epochs * len(epochs[0])))]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup_fraction * len(plan)))
    start = restore_checkpoint(output, model, optimizer, config) if config.resume else 0
    others = {name: tokenize(read_jsonl(Path(path)), tokenizer, config.max_length)
              for name, path in config.loss_sets.items()}

    def losses() -> dict:
        return {name: heldout_loss(model, rows, pad_id, config.batch_size, config.full) for name, rows in others.items()}

    if not start:
        config.history.append({"step": 0, "heldout_loss": heldout_loss(model, heldout, pad_id, config.batch_size,
                                                                       config.full),
                               "losses": losses(), "seconds": 0.0})
    first = config.history[0]
    # wall time and peak memory over every run of this training (a resumed run goes on from the checkpoint's)
    seconds_before = next((h["seconds"] for h in reversed(config.history) if "seconds" in h), 0.0)

    from tqdm import tqdm

    model.train()
    began, tokens = time.perf_counter(), 0
    bar = tqdm(total=len(plan), initial=start, desc="tuning", unit="step", disable=not config.progress,
               file=sys.stderr, dynamic_ncols=True)
    for step in range(start, len(plan)):
        batch = {k: v.to(device) for k, v in collate(plan[step], pad_id).items()}
        for group in optimizer.param_groups:
            group["lr"] = config.lr * schedule(step, len(plan), warmup)
        summed, count = completion_loss(model, batch, config.full)
        loss = summed / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        config.history.append({"step": step + 1, "train_loss": round(loss.item(), 4),
                               "seconds": round(seconds_before + time.perf_counter() - began, 1)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.perf_counter() - began):.0f}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < len(plan):
            config.history[-1]["peak_rss_gb"] = round(peak_rss_gb(), 2)
            save_checkpoint(output, model, tokenizer, optimizer, step + 1, config)
    bar.close()
    seconds = time.perf_counter() - began
    after = heldout_loss(model, heldout, pad_id, config.batch_size, config.full)
    config.history.append({"step": len(plan), "heldout_loss": after, "losses": losses(),
                           "seconds": round(seconds_before + seconds, 1), "peak_rss_gb": round(peak_rss_gb(), 2)})

    model.eval()
    save_model(model, tokenizer, output, config.full)
    summary = {"model": config.model, "mode": "full" if config.full else "lora", "train_examples": len(train),
               "heldout_examples": len(heldout), "steps": len(plan), "steps_this_run": len(plan) - start,
               "heldout_loss_before": first["heldout_loss"], "heldout_loss_after": after,
               "losses": {name: {"before": first.get("losses", {}).get(name), "after": config.history[-1]["losses"][name]}
                          for name in others},
               "train_seconds": config.history[-1]["seconds"], "train_seconds_this_run": round(seconds, 1),
               "peak_rss_gb": max(h.get("peak_rss_gb", 0.0) for h in config.history),
               "train_tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
               "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
               "config": {k: v for k, v in asdict(config).items() if k not in ("history", "progress")}}
    (output / "tune_summary.json").write_text(json.dumps(summary | {"history": config.history}, indent=1))
    shutil.rmtree(output / "checkpoint", ignore_errors=True)
    return summary
