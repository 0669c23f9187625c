"""``gpt2 export MODEL_DIR OUT_DIR``: a model for other tools, in Hugging Face's or OpenAI's layout.

    gpt2 export checkpoint/run1 out/run1-hf                   # transformers.from_pretrained(...)
    gpt2 export checkpoint/run1 out/run1-tf --format release  # for tools built on the TF release

The formats are written by :mod:`gpt2.io.hf` and :mod:`gpt2.io.release`; import needs no
command: ``load_model`` reads both layouts. The output directory is built under a temporary
name and renamed into place when complete.
"""

from __future__ import annotations

from ..cli import ArgumentParser, HelpFormatter
from ..errors import UserError
from ..io.atomic import publish_dir
from ..io.hf import export_huggingface
from ..io.model_dir import load_model
from ..io.paths import expand, find_model_dir
from ..io.release import export_release

FORMATS = {"huggingface": export_huggingface, "hf": export_huggingface, "release": export_release}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="gpt2 export", formatter_class=HelpFormatter,
        description="Write a model as a Hugging Face transformers directory, or in OpenAI's "
                    "TensorFlow release layout (without the .meta graph, which needs "
                    "TensorFlow). To import either, point any command at the directory.")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="model directory (ours, release or Hugging Face) or a released name")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create")
    p.add_argument("--format", choices=["huggingface", "hf", "release"], default="huggingface",
                   help="huggingface: config.json + model.safetensors + tokenizer files; "
                        "release: checkpoint + model.ckpt.{index,data-00000-of-00001} + "
                        "hparams.json + encoder.json + vocab.bpe")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    args = p.parse_args(argv)

    model_dir = find_model_dir(args.model_dir)
    out = expand(args.out_dir)
    if out.resolve() == model_dir.resolve():
        raise UserError(f"OUT_DIR {out} is the model directory itself; choose another")
    model = load_model(model_dir)
    export = FORMATS[args.format]
    publish_dir(lambda tmp: export(model, tmp, encoder_dir=model_dir), out, force=args.force)
    print(f"wrote {out} ({'release' if export is export_release else 'huggingface'} layout)")
    if export is export_release:
        print("note: model.ckpt.meta (the TensorFlow graph) is not written; it needs TensorFlow. "
              "Scripts that rebuild the graph from hparams.json and restore variables by name "
              "(OpenAI's and nshepperd's) do not need it.")
    return 0
