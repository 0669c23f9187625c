"""OpenAI's completions API: a request checked field by field, and the response's shapes.

    request = parse_completion(body, model_name="run1", n_ctx=1024, encoder=enc)
    # -> CompletionRequest (prompts as token ids, one Params per choice) or ApiError

Errors are OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx
status: a client library turns them into its own exceptions (``openai.BadRequestError``...).
Fields OpenAI has and we ignore when they ask for nothing (``user``, ``frequency_penalty: 0``,
``best_of: 1``...) are accepted; asking for what we cannot do is a 400 naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..conversation import ContextTooLong, prompt_ids
from ..errors import UserError
from .engine import Params

MAX_N = 128
MAX_LOGPROBS = 20


class ApiError(Exception):
    """A request we refuse: ``status``, and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = \
            status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class CompletionRequest:
    prompts: list[list[int]]      # token ids of each prompt
    prompt_texts: list[str]
    n: int
    params: Params
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, low=None, high=None, integer=False,
            open_low=False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not float(value).is_integer()):
        raise ApiError(400, f"{name} must be {kind}, got {value!r}", name)
    if not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}", name)
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        where = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}]"
        raise ApiError(400, f"{name} must be in {where}, got {value!r}", name)
    return int(value) if integer else float(value)


def _prompts(body: dict, encoder) -> tuple[list[list[int]], list[str]]:
    """The prompt field: a string, a list of strings, a list of ids or a list of id lists."""
    prompt = body.get("prompt", "<|endoftext|>")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids "
                            "or a list of lists of token ids", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            tokens = encoder.encode(p) if p else [encoder.eot_token]
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in p):
            tokens = p
            if not all(0 <= t < encoder.n_vocab for t in tokens):
                raise ApiError(400, f"prompt holds a token id outside 0..{encoder.n_vocab - 1}",
                               "prompt")
        else:
            raise ApiError(400, "prompt must be a string, a list of strings, a list of token "
                                "ids or a list of lists of token ids", "prompt")
        if None in tokens:
            raise ApiError(400, "an empty prompt needs a tokenizer with <|endoftext|>", "prompt")
        ids.append(list(tokens))
        texts.append(p if isinstance(p, str) else encoder.decode(tokens))
    return ids, texts


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", "stop")
    return [s for s in stop if s]


def _unsupported(body: dict) -> None:
    """What OpenAI has and we do not do: fine at its do-nothing value, else a 400."""
    for name, neutral in (("frequency_penalty", 0), ("presence_penalty", 0), ("best_of", 1),
                          ("suffix", None), ("logit_bias", None)):
        value = body.get(name)
        if value is not None and value != neutral and value != {}:
            raise ApiError(400, f"{name} is not supported by this server", name)


def parse_completion(body, model_name: str, n_ctx: int, encoder) -> CompletionRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {model!r}", "model")
    if model not in (None, model_name):
        raise ApiError(404, f"the model {model!r} does not exist; this server has "
                            f"{model_name!r}", "model", code="model_not_found")
    _unsupported(body)
    for name in ("stream", "echo"):
        if not isinstance(body.get(name, False), bool):
            raise ApiError(400, f"{name} must be true or false", name)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    logprobs = body.get("logprobs")
    params = Params(
        max_tokens=_number(body, "max_tokens", 16, 0, n_ctx, integer=True),
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_k=_number(body, "top_k", 0, 0, integer=True),
        top_p=_number(body, "top_p", 1.0, 0, 1, open_low=True),
        stop=_stop(body),
        logprobs=None if logprobs is None else
        _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True),
        echo=body.get("echo", False),
        seed=_number(body, "seed", None, integer=True))
    prompts, texts = _prompts(body, encoder)
    for ids in prompts:
        if len(ids) + max(params.max_tokens, 1) - 1 > n_ctx:
            raise ApiError(400, f"this model's maximum context length is {n_ctx} tokens, "
                                f"however you requested {len(ids) + params.max_tokens} tokens "
                                f"({len(ids)} in your prompt; {params.max_tokens} for the "
                                "completion)", "max_tokens", code="context_length_exceeded")
    return CompletionRequest(prompts, texts, _number(body, "n", 1, 1, MAX_N, integer=True),
                             params, body.get("stream", False),
                             bool(options.get("include_usage", False)))


def logprobs_object(entries: list, text_offset: int = 0) -> dict:
    """OpenAI's (legacy completions) logprobs: tokens, token_logprobs, top_logprobs,
    text_offset; an entry of None (a prompt's first token) has no log-probability."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_offset
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append(e["top"])
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


# --- chat completions ----------------------------------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant", "developer")  # developer: OpenAI's new "system"


def _message_text(content, index: int) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts only)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise ApiError(400, f"messages[{index}].content: only text parts are supported",
                       f"messages[{index}].content")
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts",
                   f"messages[{index}].content")


MAX_MESSAGES = 2048


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects",
                       "messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"messages: {len(messages)} of them; at most {MAX_MESSAGES}",
                       "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of "
                                f"{', '.join(CHAT_ROLES)}", f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _message_text(m.get("content"), i)})
    return out


def parse_chat(body, model_name: str, n_ctx: int, encoder, template) -> CompletionRequest:
    """``/v1/chat/completions``: the messages rendered by the model's chat template with the
    assistant's prompt after them; the reply ends at ``<|endoftext|>`` (finish_reason stop)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, neutral in (("tools", None), ("tool_choice", None), ("functions", None),
                          ("function_call", None), ("audio", None), ("prediction", None)):
        if body.get(name, neutral) not in (neutral, [], "none"):
            raise ApiError(400, f"{name} is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported",
                       "response_format")
    if not isinstance(body.get("logprobs", False), bool):
        raise ApiError(400, "logprobs must be true or false", "logprobs")
    top = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
    if top is not None and not body.get("logprobs"):
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    messages = chat_messages(body)
    if body.get("echo") is not None:
        raise ApiError(400, "echo is not a chat completions field", "echo")
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    legacy = {k: v for k, v in body.items() if k not in (
        "messages", "logprobs", "top_logprobs", "max_completion_tokens", "max_tokens", "tools",
        "tool_choice", "functions", "function_call", "response_format", "audio", "prediction",
        "modalities", "store", "metadata", "parallel_tool_calls", "service_tier")}
    if given is not None:
        given = _number({"max_tokens": given}, "max_tokens", None, 0, n_ctx, integer=True)
    if body.get("logprobs"):
        legacy["logprobs"] = top or 0
    # A long conversation loses its oldest turns, as in gpt2 chat: to leave room for
    # max_tokens, or without it for a reply of min(256, n_ctx / 2) (or, if the newest message
    # leaves less, what is left); the reply may then take what the context has left.
    def fitted(reserve: int) -> list[int]:
        return prompt_ids(template, encoder, messages, n_ctx, reserve)[0]

    try:
        if given is not None:
            ids = fitted(max(given, 1))
        else:
            try:
                ids = fitted(min(256, max(n_ctx // 2, 1)))
            except ContextTooLong:
                ids = fitted(1)
    except ContextTooLong as e:
        raise ApiError(400, str(e), "max_tokens", code="context_length_exceeded") from None
    except UserError as e:  # the template refused the conversation (raise_exception, a bound)
        raise ApiError(400, f"the chat template cannot render these messages: {e}",
                       "messages") from None
    legacy["max_tokens"] = given if given is not None else min(256, n_ctx + 1 - len(ids))
    legacy["prompt"] = ids
    req = parse_completion(legacy, model_name, n_ctx, encoder)
    req.prompt_texts = [encoder.decode(ids)]
    return req


def chat_logprobs(entries: list) -> dict:
    """OpenAI's chat logprobs: for each token its log-probability, bytes and top alternatives."""
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(e["token"], e["logprob"]),
                         "top_logprobs": [item(t, v) for t, v in (e["top"] or {}).items()]}
                        for e in entries]}
