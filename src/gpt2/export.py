"""Export a model directory for other tools: Hugging Face transformers, or OpenAI's release layout.

    gpt2 export checkpoint/run1 out/run1-hf                   # transformers.from_pretrained(...)
    gpt2 export checkpoint/run1 out/run1-tf --format release  # for tools built on the TF release

    from gpt2.export import export_huggingface, export_release
    export_huggingface(model, "out/run1-hf", encoder_dir="checkpoint/run1")

**huggingface** writes config.json (model_type gpt2, GPT2LMHeadModel), model.safetensors under
transformers' names (``transformer.h.0.attn.c_attn.weight`` ..., Conv1D weights as [in, out];
the head is tied to wte, so it is not stored), vocab.json and merges.txt (the same content as
encoder.json and vocab.bpe), tokenizer_config.json, special_tokens_map.json and
generation_config.json.

**release** writes ``checkpoint``, ``model.ckpt.index``, ``model.ckpt.data-00000-of-00001``,
hparams.json, encoder.json and vocab.bpe, exactly the variables of OpenAI's checkpoints
(``model/h0/attn/c_attn/w`` [1, in, out] ...), in float32, without TensorFlow. The
``model.ckpt.meta`` graph cannot be produced without TensorFlow: code that restores variables by
name (``tf.train.Saver`` over a graph built by model.py, as the original scripts do,
``tf.train.load_checkpoint``) works; code that imports the .meta graph does not.

Names come from inverting the loaders' tables in :mod:`gpt2.checkpoint`, so exporting and loading
cannot drift apart. Import needs no command: ``load_model`` reads both layouts. The output
directory is built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .errors import UserError

EOT = "<|endoftext|>"


# --- names: the loaders' tables, inverted ----------------------------------------------------

def hf_name(name: str) -> tuple[str, bool]:
    """Our parameter name -> (transformers' name, transpose?), checked against _hf_target."""
    from .checkpoint import _hf_target

    hf = "transformer." + name
    target, transpose = _hf_target(hf)
    if target != name:
        raise ValueError(f"no Hugging Face name maps to {name!r}")
    return hf, transpose


def release_name(name: str, ndim: int) -> tuple[str, bool]:
    """Our parameter name -> (release variable name, is a conv1d [1, in, out] weight?).

    Candidates are spelled from our name; _release_target decides which ones load back into it,
    and of those the simplest wins (``model/wte``, not ``model/wte/w``), a matrix being a conv1d
    ``w`` and a vector a layer-norm ``g``.
    """
    from .checkpoint import _release_target

    parts = name.split(".")
    if parts[0] == "h":
        parts = [f"h{parts[1]}"] + parts[2:]
    stem = "model/" + "/".join(parts[:-1])
    candidates = [f"model/{parts[0]}"] + [f"{stem}/{leaf}" for leaf in ("w", "g", "b")]
    found = [(c, conv) for c in candidates for target, conv in [_release_target(c)]
             if target == name]
    if len(found) > 1:  # "model/wte" over "model/wte/w"; then "w" for matrices, "g" for vectors
        shortest = min(len(c) for c, _ in found)
        found = [(c, conv) for c, conv in found if len(c) == shortest]
    if len(found) > 1:
        found = [(c, conv) for c, conv in found if conv == (ndim == 2)]
    if len(found) != 1:
        raise ValueError(f"no release variable maps to {name!r}")
    return found[0]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from .checkpoint import unwrap

    model = unwrap(model)
    # The head is wte (tied): both formats store it once.
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}


# --- tokenizer files -------------------------------------------------------------------------

def _vocab_files(encoder_dir: Path | None) -> tuple[Path, Path] | None:
    """(vocab json, merges) in the model directory: encoder.json/vocab.bpe or vocab.json/merges.txt."""
    if encoder_dir is None:
        return None
    for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (encoder_dir / vocab).is_file() and (encoder_dir / merges).is_file():
            return encoder_dir / vocab, encoder_dir / merges
    return None


def _eot_id(vocab_file: Path | None) -> int | None:
    if vocab_file is None:
        return None
    return json.loads(vocab_file.read_text(encoding="utf-8")).get(EOT)


def _warn_no_tokenizer(encoder_dir) -> None:
    if encoder_dir is not None:  # a library call without encoder_dir asked for weights only
        print(f"warning: {encoder_dir} has no encoder.json + vocab.bpe (or vocab.json + "
              "merges.txt); the export has no tokenizer", file=sys.stderr)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# --- the two formats -------------------------------------------------------------------------

def export_huggingface(model: torch.nn.Module, out_dir: str | os.PathLike,
                       encoder_dir: str | os.PathLike | None = None) -> Path:
    """Write a transformers GPT-2 directory; the tokenizer files come from ``encoder_dir``."""
    from safetensors.torch import save_file

    from .checkpoint import unwrap

    config = unwrap(model).config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in _state(model).items():
        hf, transpose = hf_name(name)
        tensors[hf] = (t.t() if transpose else t).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    files = _vocab_files(Path(encoder_dir) if encoder_dir is not None else None)
    eot = _eot_id(files[0] if files else None)
    if eot is None and config.n_vocab == 50257:
        eot = 50256
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _write_json(out / "config.json", {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.n_vocab, "n_positions": config.n_ctx, "n_ctx": config.n_ctx,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "dtype": dtype,
    })
    _write_json(out / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})
    if files is None:
        _warn_no_tokenizer(encoder_dir)
        return out
    # encoder.json is vocab.json and vocab.bpe is merges.txt under transformers' names.
    shutil.copyfile(files[0], out / "vocab.json")
    shutil.copyfile(files[1], out / "merges.txt")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT} if eot is not None else {}
    _write_json(out / "special_tokens_map.json", special)
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.n_ctx,
                        "add_prefix_space": False, "errors": "replace", **special}
    if eot is not None:
        tokenizer_config["added_tokens_decoder"] = {str(eot): {
            "content": EOT, "lstrip": False, "rstrip": False, "normalized": True,
            "single_word": False, "special": True}}
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    return out


def export_release(model: torch.nn.Module, out_dir: str | os.PathLike,
                   encoder_dir: str | os.PathLike | None = None) -> Path:
    """Write OpenAI's release layout (no .meta); tokenizer files come from ``encoder_dir``."""
    from .checkpoint import unwrap
    from .tf_checkpoint import write_tf_checkpoint

    config = unwrap(model).config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in _state(model).items():
        array = t.float().numpy()
        tf_name, conv = release_name(name, array.ndim)
        tensors[tf_name] = array.T[None] if conv else array  # [out, in] -> [1, in, out]
    write_tf_checkpoint(out / "model.ckpt", tensors)
    hparams = {k: getattr(config, k) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}
    _write_json(out / "hparams.json", hparams)
    files = _vocab_files(Path(encoder_dir) if encoder_dir is not None else None)
    if files is None:
        _warn_no_tokenizer(encoder_dir)
    else:
        shutil.copyfile(files[0], out / "encoder.json")
        shutil.copyfile(files[1], out / "vocab.bpe")
    return out


FORMATS = {"huggingface": export_huggingface, "hf": export_huggingface, "release": export_release}


def publish(build, out: Path, force: bool = False) -> Path:
    """Run ``build(tmp_dir)`` and move the finished directory to ``out`` in one rename.

    An existing non-empty ``out`` is replaced only with ``force``; until the final rename it is
    left untouched, so an interrupted export never leaves a half-written directory behind.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; choose another directory or pass --force to "
                        "replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        build(tmp)
        tmp.chmod(0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)  # put the previous directory back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from .generate import HelpFormatter

    p = argparse.ArgumentParser(
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

    from .checkpoint import load_model
    from .generate import find_model_dir

    model_dir = find_model_dir(args.model_dir)
    out = Path(os.path.expandvars(os.path.expanduser(args.out_dir)))
    if out.resolve() == model_dir.resolve():
        raise UserError(f"OUT_DIR {out} is the model directory itself; choose another")
    model = load_model(model_dir)
    export = FORMATS[args.format]
    publish(lambda tmp: export(model, tmp, encoder_dir=model_dir), out, force=args.force)
    print(f"wrote {out} ({'release' if export is export_release else 'huggingface'} layout)")
    if export is export_release:
        print("note: model.ckpt.meta (the TensorFlow graph) is not written; it needs TensorFlow. "
              "Scripts that rebuild the graph from hparams.json and restore variables by name "
              "(OpenAI's and nshepperd's) do not need it.")
    return 0
