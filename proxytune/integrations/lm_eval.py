"""lm-evaluation-harness model "proxytune": any lm-eval task on a proxy-tuned trio.

    import proxytune.integrations.lm_eval, lm_eval
    lm_eval.simple_evaluate(model="proxytune", model_args="model=demo,alpha=1.0,dtype=bfloat16", tasks=[...])
    # or with a loaded tuner:  lm_eval.simple_evaluate(model=ProxyTuneLM(tuner=tuner), tasks=[...])

or from the shell: `proxytune lm-eval --model proxytune --model_args model=demo --tasks ...` (lm-eval finds
models only in its registry, so the command imports this module before handing over to lm-eval).

loglikelihood uses `ProxyTuner.score_batch` (one full-sequence forward per model, then
log_softmax(z_base + α(z_expert − z_anti))); generate_until uses batched proxy-tuned decoding.
"""
from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..engine.context import context_length
from ..engine.settings import Settings
from ..errors import ProxyTuneError


def _as_float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ProxyTuneError(f"model_args {name} must be a number, got {value!r}") from None


@register_model("proxytune")
class ProxyTuneLM(LM):
    def __init__(self, model: str | None = None, base: str | None = None, expert: str | None = None,
                 anti_expert: str | None = None, alpha=1.0, dtype: str | None = None, device: str | None = None,
                 batch_size=8, max_gen_toks=256, max_length=1024, tuner=None, **ignored):
        super().__init__()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval passes its default --device cuda even on machines without a GPU
        if tuner is None:
            from ..facade.tuner import ProxyTuner

            if model and (base or expert or anti_expert):
                raise ProxyTuneError("model_args: give model=TRIO or base=,expert=,anti_expert=, not both")
            if model:
                tuner = ProxyTuner.from_pretrained(model, alpha=_as_float(alpha, "alpha"), device=device, dtype=dtype)
            elif base and expert and anti_expert:
                tuner = ProxyTuner.from_pretrained(base, expert, anti_expert, alpha=_as_float(alpha, "alpha"),
                                                   device=device, dtype=dtype)
            else:
                raise ProxyTuneError("model_args must name model=TRIO or base=...,expert=...,anti_expert=...")
        self.tuner = tuner
        self.name = model or (f"base={base}" if base else "a given tuner")  # what the progress bars name
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # lm-eval may pass "auto"
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = min(int(max_length), context_length(tuner.sources) or int(max_length))

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tuner.tokenizers["base"], "name_or_path", "proxytune").replace("/", "__")

    # --- chat (lm-eval's --apply_chat_template) --------------------------------------------------------
    # lm-eval hands a model one prompt string. It is rendered with the base's chat template and given to every
    # role as text: exact for trios whose roles share a template (one family, as the demo); for roles with
    # their own templates, `ProxyTuner.chat` (each role its own template) is the faithful API.

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tuner.tokenizers["base"], "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from ..engine.prompts import plain_text, validate_messages

        messages = validate_messages(chat_history)
        tokenizer = self.tuner.tokenizers["base"]
        if not getattr(tokenizer, "chat_template", None):
            return plain_text(messages)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _record(self, kind: str, args, result) -> None:
        self.cache_hook.add_partial(kind, args, result)

    # --- scoring --------------------------------------------------------------------------------------

    def _bar(self, total: int, what: str, disable: bool):
        """lm-eval's long requests get a bar saying what runs (lm-eval passes disable_tqdm for its own)."""
        from tqdm import tqdm

        return tqdm(total=total, desc=f"proxytune {what} ({self.name})", unit="req", disable=disable,
                    dynamic_ncols=True)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        with self._bar(len(requests), "loglikelihood", disable_tqdm) as bar:
            for start in range(0, len(requests), self.batch_size):
                batch = requests[start:start + self.batch_size]
                for request, score in zip(batch, self.tuner.score_batch([r.args for r in batch])):
                    results.append((score.total, score.is_greedy))
                    self._record("loglikelihood", request.args, results[-1])
                bar.update(len(batch))
        return results

    def _prefix_token(self) -> int:
        tokenizer = self.tuner.tokenizer
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ProxyTuneError("loglikelihood_rolling needs a BOS or EOS token to condition the first token on")
        return prefix

    def _score_tokens(self, context: list[int], continuation: list[int]) -> float:
        """log p̃ of `continuation` token ids after `context` ids (rolling windows are token-exact)."""
        return self.tuner.score_items([self.tuner.token_item(context, continuation)])[0].total

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        with self._bar(len(requests), "loglikelihood_rolling", disable_tqdm) as bar:
            for request in requests:
                (text,) = request.args
                ids = self.tuner.tokenizer(text, add_special_tokens=False)["input_ids"]
                windows = get_rolling_token_windows(ids, prefix_token=self._prefix_token(),
                                                    max_seq_len=self.max_length, context_len=1)
                total = sum(self._score_tokens(*make_disjoint_window(w)) for w in windows)
                results.append(total)
                self._record("loglikelihood_rolling", request.args, total)
                bar.update(1)
        return results

    # --- generation -----------------------------------------------------------------------------------

    def _settings(self, gen_kwargs: dict) -> Settings:
        """lm-eval's generation arguments as one request Settings (sampling rows seeded 0, reproducibly)."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        return Settings.of(stop=until or None, max_new_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                           temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                           seed=0 if temperature > 0 else None)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[Settings, list] = {}  # requests that decode alike, batched together
        for index, request in enumerate(requests):
            groups.setdefault(self._settings(request.args[1]), []).append((index, request.args[0]))
        results: list[str | None] = [None] * len(requests)
        with self._bar(len(requests), "generate_until", disable_tqdm) as bar:
            for settings, group in groups.items():
                for start in range(0, len(group), self.batch_size):  # a batch at a time, so the bar moves
                    part = group[start:start + self.batch_size]
                    outputs = self.tuner.generate([context for _, context in part], settings=settings,
                                                  batch_size=self.batch_size)
                    for (index, _), output in zip(part, outputs):
                        results[index] = output.text
                        self._record("generate_until", requests[index].args, output.text)
                    bar.update(len(part))
        return results
