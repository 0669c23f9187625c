"""The HTTP server: OpenAI's completions and chat completions APIs over
:class:`~gpt2.serve.engine.Engine`, on Starlette (``pip install 'gpt2[serve]'``).

    app = build_app(engine, encoder, model_name="run1", api_key=None, template=template)
    # GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream:
    # server-sent events), GET / (the playground)

Every refused request is a 4xx with OpenAI's error body; a client that hangs up mid-stream
frees its rows at the engine's next step; bodies and the queue are bounded (413, 429).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from importlib import resources

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from .api import (ApiError, CompletionRequest, chat_logprobs, logprobs_object, parse_chat,
                  parse_completion)
from .engine import Busy, Choice, Engine, Params

MAX_BODY = 1 << 20  # bytes


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_json(request: Request, limit: int):
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply") from None


class _Stream:
    """One choice's events, handed from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt: list[int], params: Params,
                 seed: int | None):
        self.queue: asyncio.Queue = asyncio.Queue()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        self.choice = Choice(prompt, params, self._sink, generator)
        self.loop = loop

    def _sink(self, event) -> None:
        if not self.loop.is_closed():  # (closed: the server stopped without waiting for it)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Completions:
    """POST /v1/completions."""

    prefix, object_name = "cmpl-", "text_completion"

    def __init__(self, engine: Engine, encoder, model_name: str, max_body: int = MAX_BODY):
        self.engine, self.enc, self.model_name, self.max_body = \
            engine, encoder, model_name, max_body

    def parse(self, body) -> CompletionRequest:
        return parse_completion(body, self.model_name, self.engine.n_ctx, self.enc)

    async def handle(self, request: Request):
        try:
            body = await read_json(request, self.max_body)
            # (off the event loop: a chat template may take its time limit to render)
            req = await asyncio.to_thread(self.parse, body)
            streams = self._start(req)
        except ApiError as e:
            return error_response(e)
        meta = {"id": self.prefix + secrets.token_hex(12), "object": self.object_name,
                "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return StreamingResponse(self._sse(req, streams, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            choices = [await self._collect(req, i, s) for i, s in enumerate(streams)]
        finally:
            for s in streams:
                s.choice.cancelled = True  # a client gone: its rows leave at the next step
        return JSONResponse({**meta, "choices": choices, "usage": self._usage(req, streams)})

    def _start(self, req: CompletionRequest) -> list[_Stream]:
        loop = asyncio.get_running_loop()
        streams = []
        for p, prompt in enumerate(req.prompts):
            for j in range(req.n):
                seed = None if req.params.seed is None else \
                    (req.params.seed * 1_000_003 + p * 1009 + j) % 2**63
                streams.append(_Stream(loop, prompt, req.params, seed))
        try:
            self.engine.submit([s.choice for s in streams])
        except Busy as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        return streams

    def _prefix(self, req: CompletionRequest, index: int, prompt_entries) -> tuple[str, list]:
        """What echo puts before the completion: the prompt's text and its logprob entries."""
        if not req.params.echo:
            return "", []
        prompt = req.prompts[index // req.n]
        text = self.enc.decode(prompt)
        if req.params.logprobs is None:
            return text, []
        entries = list(prompt_entries or [])
        if entries and entries[0] is None:
            entries[0] = {"token": self.enc.decode(prompt[:1]), "logprob": None, "top": None}
        return text, entries

    async def _collect(self, req: CompletionRequest, index: int, stream: _Stream) -> dict:
        text, entries, prompt_entries, finish = "", [], None, None
        while finish is None:
            kind, *rest = await stream.queue.get()
            if kind == "prompt":
                prompt_entries = rest[0]
            elif kind == "token":
                text += rest[0]
                if rest[1] is not None:
                    entries.append(rest[1])
            elif kind == "done":
                finish = rest[0]
            else:
                raise ApiError(500, rest[0], type="server_error")
        prefix, prefix_entries = self._prefix(req, index, prompt_entries)
        return self.choice(req, index, prefix + text, prefix_entries + entries, finish)

    def choice(self, req: CompletionRequest, index: int, text: str, entries: list,
               finish: str | None, first: bool = False) -> dict:
        """One choice of a response (or, streaming, a chunk's: ``first`` is the first)."""
        logprobs = logprobs_object(entries) if req.params.logprobs is not None else None
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}

    def _usage(self, req: CompletionRequest, streams: list[_Stream]) -> dict:
        prompt = sum(len(p) for p in req.prompts)
        completion = sum(len(s.choice.ids) for s in streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def _sse(self, req: CompletionRequest, streams: list[_Stream], meta: dict):
        started = set()

        def chunk(index: int, text: str, entries, finish) -> str:
            body = {**meta, "choices": [self.choice(req, index, text, entries, finish,
                                                    first=index not in started)]}
            started.add(index)
            return f"data: {json.dumps(body)}\n\n"

        merged: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(_forward(i, s.queue, merged)) for i, s in enumerate(streams)]
        try:
            if req.params.echo:
                for i, s in enumerate(streams):
                    prefix, _ = self._prefix(req, i, None)
                    if req.params.logprobs is None:
                        yield chunk(i, prefix, [], None)
            open_ = len(streams)
            while open_:
                i, (kind, *rest) = await merged.get()
                if kind == "prompt" and req.params.logprobs is not None:
                    prefix, entries = self._prefix(req, i, rest[0])
                    yield chunk(i, prefix, entries, None)
                elif kind == "token":
                    yield chunk(i, rest[0], [rest[1]] if rest[1] is not None else [], None)
                elif kind in ("done", "error"):
                    open_ -= 1
                    yield chunk(i, "", [], rest[0] if kind == "done" else "error")
            if req.include_usage:
                usage = {**meta, "choices": [], "usage": self._usage(req, streams)}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client hung up: its rows leave the batch at the next step
            for s in streams:
                s.choice.cancelled = True
            for t in tasks:
                t.cancel()


class ChatCompletions(Completions):
    """POST /v1/chat/completions: the conversation through the model's chat template; the reply
    ends at <|endoftext|> (how gpt2's template ends an assistant turn)."""

    prefix, object_name = "chatcmpl-", "chat.completion"

    def __init__(self, engine: Engine, encoder, model_name: str, template,
                 max_body: int = MAX_BODY):
        super().__init__(engine, encoder, model_name, max_body)
        self.template = template
        self.unprefixed: set[int] = set()  # streamed choices whose reply prefix is dropped

    def parse(self, body) -> CompletionRequest:
        req = parse_chat(body, self.model_name, self.engine.n_ctx, self.enc, self.template)
        if req.stream:
            self.object_name = "chat.completion.chunk"
        return req

    def choice(self, req: CompletionRequest, index: int, text: str, entries: list,
               finish: str | None, first: bool = False) -> dict:
        logprobs = chat_logprobs(entries) if req.params.logprobs is not None else None
        if not req.stream:
            return {"index": index, "logprobs": logprobs, "finish_reason": finish,
                    "message": {"role": "assistant", "content": self.template.content_of(text)}}
        if text and index not in self.unprefixed:  # the template's " " before the content
            text = self.template.content_of(text)
            self.unprefixed.add(index)
        delta = {"role": "assistant", "content": text} if first else \
            ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


async def _forward(index: int, source: asyncio.Queue, merged: asyncio.Queue) -> None:
    while True:
        event = await source.get()
        await merged.put((index, event))
        if event[0] in ("done", "error"):
            return


def build_app(engine: Engine, encoder, model_name: str, api_key: str | None = None,
              max_body: int = MAX_BODY, template=None) -> Starlette:
    page = resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")
    page = page.replace("__MODEL__", json.dumps(model_name)).replace(
        "__KEY_NEEDED__", "true" if api_key else "false")

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_name, **engine.load})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "gpt2"}]})

    async def playground(request: Request):
        return HTMLResponse(page)

    async def http_error(request: Request, exc: HTTPException):
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", Completions(engine, encoder, model_name, max_body).handle,
                    methods=["POST"]),
              Route("/v1/chat/completions", _chat_handler(engine, encoder, model_name,
                                                          template, max_body), methods=["POST"]),
              Route("/", playground)]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.stop)  # after the in-flight requests have drained

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error},
                    lifespan=lifespan)
    if api_key:
        app.add_middleware(_ApiKey, key=api_key)
    return app


def _chat_handler(engine: Engine, encoder, model_name: str, template, max_body: int):
    """A fresh ChatCompletions per request (its object name depends on the request)."""
    if template is None:
        from ..tokenizer.chat import ChatTemplate

        template = ChatTemplate.default()

    async def handle(request: Request):
        return await ChatCompletions(engine, encoder, model_name, template, max_body).handle(
            request)
    return handle


class _ApiKey:
    """``Authorization: Bearer KEY`` on /v1/*, else 401 (the page and /health stay open)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given, f"Bearer {self.key}"):
                response = error_response(ApiError(
                    401, "incorrect or missing API key: send Authorization: Bearer <key>",
                    code="invalid_api_key"))
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
