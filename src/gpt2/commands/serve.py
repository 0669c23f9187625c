"""``gpt2 serve MODEL_DIR``: the model behind OpenAI's completions API, on 127.0.0.1:8000.

    gpt2 serve checkpoint/run1 --port 8000 --max_batch 16
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "Once upon a time", "max_tokens": 32}'

Any model directory (ours, a run's checkpoint, the release, Hugging Face). Needs
``pip install 'gpt2[serve]'`` (Starlette and uvicorn). SIGTERM or Ctrl-C stop accepting
requests, let the running ones finish, and exit 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from ..flags import ArgumentParser, HelpFormatter
from ..errors import UserError
from ..files.paths import expand
from ..io.inference import load_for_inference
from ..files.memory import return_large_frees
from .common import add_dtype_argument, add_speculation_arguments, speculator_for


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gpt2 serve", formatter_class=HelpFormatter,
                       description="Serve a model over OpenAI's completions and chat "
                                   "completions APIs, with batching, streaming and a "
                                   "playground page at /.")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="model directory (ours, a run, release or Hugging Face) or a released name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: the "
                        "GPT2_API_KEY environment variable; none: open)")
    p.add_argument("--max_batch", type=int, default=16,
                   help="completions decoded together in one forward pass per step")
    p.add_argument("--max_queue", type=int, default=256,
                   help="completions that may wait for a place in the batch; more get 429")
    add_speculation_arguments(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    add_dtype_argument(p, "--dtype", "--precision", dest="precision")
    p.add_argument("--served_name", default=None,
                   help="the model's name in the API (default: the directory's name)")
    p.add_argument("--chat_template", default=None, metavar="FILE",
                   help="the Jinja chat template of /v1/chat/completions (default: the "
                        "model's chat_template.jinja, else gpt2's own)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("max_batch", "max_queue"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    try:
        import uvicorn

        from ..serve.app import build_app
    except ImportError as e:
        raise UserError(f"gpt2 serve needs Starlette and uvicorn ({e.name} is missing): pip "
                        "install 'gpt2[serve]'") from None
    from ..serve.engine import Engine

    model, enc, device, model_dir = load_for_inference(args.model_dir, args.device,
                                                       args.precision)
    if device.type == "cpu":
        return_large_frees()  # the KV caches change size at every join: keep RSS flat
    if enc.eot_token is None:
        raise UserError(f"{model_dir}: the tokenizer has no <|endoftext|> token")
    given = expand(args.model_dir)  # a run's name, not the model-N it points at now
    name = args.served_name or (given.resolve() if given.is_dir() else model_dir).name
    from ..tokenizer.chat import ChatTemplate

    template = ChatTemplate.for_model(model_dir, args.chat_template)
    engine = Engine(model, enc, max_batch=args.max_batch, max_queue=args.max_queue,
                    speculator=speculator_for(args, model, enc, device))
    engine.warm_up()
    app = build_app(engine, enc, name, api_key=args.api_key or os.environ.get("GPT2_API_KEY"),
                    template=template)
    print(f"serving {model_dir} as {name!r} on http://{args.host}:{args.port} ({device}, "
          f"{args.precision}, batches of up to {args.max_batch})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=60, access_log=False)
    server = uvicorn.Server(config)
    failed: list[BaseException] = []
    http = threading.Thread(target=_listen, args=(server, engine, failed), name="gpt2-serve-http",
                            daemon=True)
    # The model runs in this thread, the one that loaded it (Engine's docstring says why); the
    # HTTP server beside it. SIGTERM and Ctrl-C go to uvicorn as they would in this thread:
    # stop accepting, let the running requests finish (a second Ctrl-C: stop waiting for the
    # clients), exit 0; one more stops waiting for the model, too.
    def on_signal(sig, frame) -> None:
        if server.force_exit:
            raise KeyboardInterrupt
        server.handle_exit(sig, frame)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        engine.run()
    except BaseException as e:  # the loop stopped for good: no request may wait for it
        engine.abandon(f"the server stopped ({type(e).__name__})")
        server.force_exit = True
        raise
    finally:
        server.should_exit = True
        http.join(timeout=90)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    error = next((e for e in failed if not isinstance(e, SystemExit)), None)
    if isinstance(error, OSError):  # e.g. the port is taken
        raise UserError(f"--port {args.port}: {error.strerror or error}")
    if error is not None:
        raise error
    if not server.started:
        raise UserError(f"{args.host}:{args.port}: could not listen there (in use?)")
    return 0


def _listen(server, engine, failed: list[BaseException]) -> None:
    """uvicorn's loop (in its own thread), then the engine told to stop once it has returned."""
    try:
        server.run()
    except BaseException as e:  # noqa: BLE001 (uvicorn exits with SystemExit when it cannot bind)
        failed.append(e)
    finally:
        engine.stop()
