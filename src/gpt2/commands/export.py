"""``gpt2 export MODEL_DIR OUT``: a model for other tools: Hugging Face, OpenAI's release
layout, GGUF (llama.cpp, ollama, LM Studio) or ONNX (ONNX Runtime, transformers.js).

    gpt2 export checkpoint/run1 out/run1-hf                   # transformers.from_pretrained(...)
    gpt2 export checkpoint/run1 out/run1-tf --format release  # for tools built on the TF release
    gpt2 export checkpoint/run1 out/run1.gguf --format gguf --outtype q8_0   # llama-cli -m ...
    gpt2 export checkpoint/run1 out/run1-onnx --format onnx   # onnxruntime, transformers.js

The formats are written by :mod:`gpt2.io.hf`, :mod:`gpt2.io.release`, :mod:`gpt2.io.gguf_file`
and :mod:`gpt2.io.onnx_export`; ``load_model`` reads the first two back. The output (a
directory, or GGUF's one file) is built under a temporary name and renamed into place when
complete; an existing one is replaced only with ``--force``.
"""

from __future__ import annotations

from ..flags import ArgumentParser, HelpFormatter
from ..errors import UserError
from ..files.atomic import publish_dir
from ..io.hf import export_huggingface
from ..io.model_dir import load_model
from ..files.paths import expand, find_model_dir
from ..io.release import export_release

FORMATS = {"huggingface": export_huggingface, "hf": export_huggingface, "release": export_release}
NAMES = {"huggingface": "huggingface", "hf": "huggingface", "release": "release", "gguf": "GGUF",
         "onnx": "ONNX"}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="gpt2 export", formatter_class=HelpFormatter,
        description="Write a model as a Hugging Face transformers directory, or in OpenAI's "
                    "TensorFlow release layout (without the .meta graph, which needs "
                    "TensorFlow). To import either, point any command at the directory.")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="model directory (ours, release or Hugging Face) or a released name")
    p.add_argument("out_dir", metavar="OUT", help="directory to create (a file for gguf)")
    p.add_argument("--format", choices=list(NAMES), default="huggingface",
                   help="huggingface: config.json + model.safetensors + tokenizer files; "
                        "release: checkpoint + model.ckpt.{index,data-00000-of-00001} + "
                        "hparams.json + encoder.json + vocab.bpe; gguf: one .gguf file "
                        "(llama.cpp's gpt2 architecture; pip install 'gpt2[gguf]'); onnx: "
                        "model.onnx with KV-cache inputs and outputs, as Optimum lays out "
                        "GPT-2, + tokenizer files (pip install 'gpt2[onnx]')")
    p.add_argument("--outtype", choices=["f32", "f16", "q8_0"], default="f32",
                   help="gguf: tensor type of the 2-D weights (norms, biases and the position "
                        "table stay f32, as llama.cpp's converter does)")
    p.add_argument("--fp16", action="store_true", help="onnx: float16 weights and compute")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    if args.outtype != "f32" and args.format != "gguf":
        raise UserError(f"--outtype: only for --format gguf, not {args.format}")
    if args.fp16 and args.format != "onnx":
        raise UserError(f"--fp16: only for --format onnx, not {args.format}")

    model_dir = find_model_dir(args.model_dir)
    out = expand(args.out_dir)
    if out.resolve() == model_dir.resolve():
        raise UserError(f"OUT_DIR {out} is the model directory itself; choose another")
    if args.format == "gguf":
        from ..io.gguf_file import export_gguf, require_gguf

        require_gguf()  # the extra is checked before the model is loaded
        if out.exists() and not args.force:
            raise UserError(f"{out}: exists; pass --force to replace it")
        if out.is_dir():
            raise UserError(f"{out}: is a directory; GGUF is one file (model.gguf, say)")
        export_gguf(load_model(model_dir), out, encoder_dir=model_dir, outtype=args.outtype)
        print(f"wrote {out} (GGUF, llama.cpp's gpt2 architecture, {args.outtype})")
        return 0
    if args.format == "onnx":
        from ..io.onnx_export import export_onnx, require_onnx

        require_onnx()
        model = load_model(model_dir)
        publish_dir(lambda tmp: export_onnx(model, tmp, encoder_dir=model_dir, fp16=args.fp16),
                    out, force=args.force)
        print(f"wrote {out} (ONNX decoder with KV cache, {'fp16' if args.fp16 else 'fp32'})")
        return 0
    model = load_model(model_dir)
    export = FORMATS[args.format]
    publish_dir(lambda tmp: export(model, tmp, encoder_dir=model_dir), out, force=args.force)
    print(f"wrote {out} ({NAMES[args.format]} layout)")
    if export is export_release:
        print("note: model.ckpt.meta (the TensorFlow graph) is not written; it needs TensorFlow. "
              "Scripts that rebuild the graph from hparams.json and restore variables by name "
              "(OpenAI's and nshepperd's) do not need it.")
    return 0
