"""``gpt2 download`` / ``download_model.py``: fetch a released model into ``models/<name>/``.

    python download_model.py 124M                        # the seven OpenAI release files
    python download_model.py 355M --models_dir ~/models
    python download_model.py 774M --source huggingface    # config.json + model.safetensors + ...
    gpt2 download --dataset hellaswag                     # data/hellaswag_val.jsonl, checked

The downloading itself (resumable, retrying) is :mod:`gpt2.files.download`; the tasks' files
(URL, size, sha256) are their rows in :mod:`gpt2.tasks`.
"""

from __future__ import annotations

import argparse

from ..flags import ArgumentParser
from ..errors import UserError
from ..files.download import HUGGINGFACE_URL, RELEASE_URL, download_model
from ..files.paths import ALIASES, MODELS
from ..tasks import TASKS, download_task_data


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="download_model.py", description="Fetch a released GPT-2 model into models/<model>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help=f"one of {', '.join(MODELS)} (old names {', '.join(ALIASES)} work "
                        "too); any plain name with --base_url")
    p.add_argument("--dataset", choices=list(TASKS), default=None,
                   help="instead of a model, fetch an evaluation task's data file from its "
                        "canonical URL into --data_dir, checked against its published sha256 "
                        "(for gpt2 evaluate --task)")
    p.add_argument("--data_dir", default="data", help="folder that receives --dataset's file")
    p.add_argument("--models_dir", default="models", help="folder that receives <model>/")
    p.add_argument("--base_url", default=None,
                   help=f"mirror to fetch from instead of {RELEASE_URL} (or {HUGGINGFACE_URL} "
                        "with --source huggingface)")
    p.add_argument("--source", choices=("release", "huggingface"), default="release",
                   help="release: OpenAI's TensorFlow checkpoint; huggingface: the same weights "
                        "as safetensors")
    p.add_argument("--retries", type=int, default=5, help="tries per file before giving up")
    args = p.parse_args(argv)
    if (args.model is None) == (args.dataset is None):
        raise UserError("name a model or --dataset NAME (one of the two)")
    if args.dataset:
        if args.source != "release":
            raise UserError("--source applies to models, not --dataset")
        out = download_task_data(args.dataset, args.data_dir, args.base_url, args.retries)
        print(f"Dataset saved in {out}")
        return 0
    out = download_model(args.model, args.models_dir, args.base_url, args.source, args.retries)
    print(f"Model saved in {out}")
    return 0
