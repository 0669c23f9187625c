"""Our models in lm-evaluation-harness, without converting them (extra ``gpt2[eval]``).

    gpt2 lm-eval checkpoint/run1 --tasks lambada_openai,hellaswag --limit 200

    import lm_eval
    from gpt2.lm_eval import GPT2LM
    results = lm_eval.simple_evaluate(model=GPT2LM("checkpoint/run1", dtype="bf16"),
                                      tasks=["lambada_openai"])

    lm_eval --model gpt2-toolkit --model_args pretrained=checkpoint/run1 ...  # after importing
                                                                           # this module

:class:`GPT2LM` answers the harness's three request types as its Hugging Face backend (``hf``)
does, so the numbers agree with running that backend on our Hugging Face export:

- ``loglikelihood`` (context, continuation): the continuation's summed log-probability and
  whether every token of it is the greedy one; the context's trailing spaces move to the
  continuation, the continuation's ids are the whole text's after the context's, an empty
  context is <|endoftext|> (:func:`gpt2.tasks.continuation_scores`);
- ``loglikelihood_rolling`` (text): every token scored once in disjoint windows of the model's
  context, the first predicted from <|endoftext|> (:func:`gpt2.tasks.rolling_windows`);
- ``generate_until`` (context, kwargs): greedy, or sampled with ``temperature``/``top_k``/
  ``top_p``, for up to ``max_gen_toks`` tokens (default 256) from the context's last
  ``n_ctx - max_gen_toks`` tokens, cut at the first ``until`` string or <|endoftext|>. Rows of
  different lengths decode together on one KV cache (:func:`gpt2.sampling.decode`).

Requests run ``batch_size`` at a time, longest first. ``dtype`` is the weights' type (fp32,
bf16, fp16, int8), as ``--dtype`` everywhere. Chat templates (``--apply_chat_template``) use the
model directory's template, as ``gpt2 chat`` does.
"""

from __future__ import annotations

import os
import warnings

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised by the one-line error test
    raise ImportError("lm-evaluation-harness is not installed; install the extra: "
                      "pip install 'gpt2[eval]'") from None

from .errors import UserError
from .sampling import complete
from .tasks import in_chunks, context_ids, encode_pair, continuation_scores, rolling_windows


@register_model("gpt2-toolkit")
class GPT2LM(LM):
    """An ``lm_eval.api.model.LM`` over one of our model directories (or a loaded model and
    its encoder): ``GPT2LM("checkpoint/run1")``, ``GPT2LM(model, encoder=enc)``."""

    def __init__(self, pretrained: str | os.PathLike | torch.nn.Module, encoder=None,
                 device: str | None = None, dtype: str = "fp32", batch_size: int | str = 8,
                 max_gen_toks: int | str = 256, **ignored) -> None:
        super().__init__()
        if isinstance(pretrained, torch.nn.Module):
            if encoder is None:
                raise ValueError("a loaded model needs its encoder: GPT2LM(model, encoder=enc)")
            self.model, self.encoder, self.model_dir = pretrained, encoder, None
        else:
            from .io.inference import load_for_inference

            self.model, self.encoder, _, self.model_dir = load_for_inference(
                os.fspath(pretrained), device, dtype)
        self.model.eval()
        if self.encoder.eot_token is None:
            raise UserError("lm-evaluation-harness needs a tokenizer with <|endoftext|> (its "
                            "empty contexts and rolling windows start from it)")
        # (the harness's "auto" sizing has no meaning here: it means the default)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        if self.batch_size < 1 or self.max_gen_toks < 1:
            raise UserError("batch_size and max_gen_toks must be >= 1")
        self._template = None

    @property
    def n_ctx(self) -> int:
        return self.model.config.n_ctx

    # ---- scoring -------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            if context == "":  # <|endoftext|> as the context, unless the text starts with it
                cont = self.encoder.encode(continuation)
                ctx, cont = (cont[:1], cont[1:]) if cont[:1] == [self.encoder.eot_token] \
                    else ([], cont)
            else:
                ctx, cont = encode_pair(self.encoder, context, continuation)
            pairs.append((context_ids(self.encoder, ctx, "a request"), cont))
        return continuation_scores(self.model, pairs, self.batch_size, "loglikelihood",
                                   False if disable_tqdm else None)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for w in rolling_windows(self.encoder.encode(text), self.encoder.eot_token,
                                     self.n_ctx):
                windows.append(w)
                owner.append(i)
        scores = continuation_scores(self.model, windows, self.batch_size,
                                     "loglikelihood_rolling", False if disable_tqdm else None)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        return totals

    # ---- generation ----------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        eot = self.encoder.decode([self.encoder.eot_token])
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eot)
            length = kwargs.pop("max_gen_toks")
            room = self.n_ctx - length
            if room < 1:
                raise UserError(f"max_gen_toks {length} leaves no room for a context in the "
                                f"model's {self.n_ctx} positions")
            temperature = float(kwargs.pop("temperature", None) or 0.0)
            if not kwargs.pop("do_sample", False):
                temperature = 0.0
            elif temperature <= 0:
                temperature = 1.0  # sampling without a temperature: transformers' default
            top_k = int(kwargs.pop("top_k", None) or 0)
            top_p = float(kwargs.pop("top_p", None) or 1.0)
            if kwargs:
                warnings.warn(f"gpt2.lm_eval: ignoring generation settings it does not have: "
                              f"{', '.join(sorted(kwargs))}", stacklevel=2)
            contexts = {i: self.encoder.encode(requests[i].args[0])[-room:] for i in members}
            members.sort(key=lambda i: -len(contexts[i]))
            for chunk in in_chunks(members, self.batch_size, "generate_until",
                                   False if disable_tqdm else None):
                texts = complete(self.model, self.encoder,
                                 [context_ids(self.encoder, contexts[i], "a request")
                                  for i in chunk], length, temperature, top_k, top_p, until)
                for i, text in zip(chunk, texts):
                    out[i] = text
        return out

    # ---- chat templates ------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(self.model_dir or "gpt2-toolkit").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._chat().source

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        text, _ = self._chat().render(chat_history, add_generation_prompt)
        return text

    def _chat(self):
        from .tokenizer.chat import ChatTemplate

        if self._template is None:
            self._template = ChatTemplate.for_model(self.model_dir)
        return self._template
