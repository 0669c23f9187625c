"""``gpt2 download`` / ``download_model.py``: fetch a released model into ``models/<name>/``.

    python download_model.py 124M                        # the seven OpenAI release files
    python download_model.py 355M --models_dir ~/models
    python download_model.py 774M --source huggingface    # config.json + model.safetensors + ...

The downloading itself (resumable, retrying) is :mod:`gpt2.io.download`.
"""

from __future__ import annotations

import argparse

from ..cli import ArgumentParser
from ..io.download import HUGGINGFACE_URL, RELEASE_URL, download_model
from ..io.paths import ALIASES, MODELS


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="download_model.py", description="Fetch a released GPT-2 model into models/<model>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help=f"one of {', '.join(MODELS)} (old names {', '.join(ALIASES)} "
                                 "work too); any plain name with --base_url")
    p.add_argument("--models_dir", default="models", help="folder that receives <model>/")
    p.add_argument("--base_url", default=None,
                   help=f"mirror to fetch from instead of {RELEASE_URL} (or {HUGGINGFACE_URL} "
                        "with --source huggingface)")
    p.add_argument("--source", choices=("release", "huggingface"), default="release",
                   help="release: OpenAI's TensorFlow checkpoint; huggingface: the same weights "
                        "as safetensors")
    p.add_argument("--retries", type=int, default=5, help="tries per file before giving up")
    args = p.parse_args(argv)
    out = download_model(args.model, args.models_dir, args.base_url, args.source, args.retries)
    print(f"Model saved in {out}")
    return 0
