"""Hugging Face transformers' GPT-2 layout: read it (one name table) and write it.

    tensors = hf_tensors(Path("gpt2-hf"))          # our names, Conv1D weights transposed back
    export_huggingface(model, "out/run1-hf", encoder_dir="checkpoint/run1")

**Writing** produces config.json (model_type gpt2, GPT2LMHeadModel), model.safetensors under
transformers' names (``transformer.h.0.attn.c_attn.weight`` ..., Conv1D weights as [in, out];
the head is tied to wte, so it is not stored), vocab.json and merges.txt (the same content as
encoder.json and vocab.bpe), tokenizer_config.json, special_tokens_map.json and
generation_config.json. The names come from inverting the reading table (:func:`hf_name`), so
the two directions cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

from ..errors import UserError
from ..model import GPTConfig
from ..tokenizer.bpe import EOT
from ..tokenizer.files import bpe_files
from ..files.atomic import atomic_write, copy_file, write_json
from ..files.paths import HF_INDEX, WEIGHTS
from .tensors import (config_from, load_safetensors, read_json, safetensors_shapes, unwrap,
                      weights_of)


# Settings under which transformers' GPT2LMHeadModel computes exactly what GPT does.
_HF_REQUIRED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
    "add_cross_attention": (False,),
}


def hf_config(path: Path) -> GPTConfig:
    c = read_json(path)
    if not isinstance(c, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(c).__name__}")
    if c.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type {c.get('model_type')!r} is not gpt2")
    for key, allowed in _HF_REQUIRED.items():
        if key in c and c[key] not in allowed:
            raise UserError(f"{path}: {key}={c[key]!r} is not supported (GPT-2 uses {allowed[0]!r})")
    if c.get("n_inner") not in (None, 4 * c.get("n_embd", 768)):
        raise UserError(f"{path}: n_inner={c['n_inner']} is not supported (GPT-2 uses 4 * n_embd)")
    values = {"n_vocab": c.get("vocab_size", 50257), "n_ctx": c.get("n_positions", 1024),
              "n_embd": c.get("n_embd", 768), "n_head": c.get("n_head", 12),
              "n_layer": c.get("n_layer", 12)}
    return config_from(path, values)


def hf_target(name: str) -> tuple[str | None, bool]:
    """Hugging Face name -> (our name or None to ignore, transpose?). Conv1D stores [in, out]."""
    name = name.removeprefix("transformer.")
    if re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", name):
        return None, False  # causal-mask buffers saved by old transformers versions
    if name == "lm_head.weight":
        return "lm_head.weight", False
    transpose = bool(re.fullmatch(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                                  r"\.weight", name))
    return name, transpose


def hf_files(model_dir: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names (checked)."""
    if (model_dir / WEIGHTS).is_file():
        return [model_dir / WEIGHTS]
    index_file = model_dir / HF_INDEX
    index = read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index_file}: its \"weight_map\" must be an object of tensor names to "
                        "file names")
    files = sorted(set(weight_map.values()))
    bad = [f for f in files if Path(f).name != f or not f.endswith(".safetensors")]
    if bad:
        raise UserError(f"{index_file}: {bad[0]!r} is not a .safetensors file in this directory")
    return [model_dir / f for f in files]


def hf_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Our names -> shapes, from the files' headers (nothing is loaded)."""
    out = {}
    for f in hf_files(model_dir):
        for name, shape in safetensors_shapes(f).items():
            target, transpose = hf_target(name)
            if target is not None:
                out[target] = tuple(reversed(shape)) if transpose else shape
    if "wte.weight" not in out and "lm_head.weight" in out:
        out["wte.weight"] = out["lm_head.weight"]
    out.pop("lm_head.weight", None)
    return out


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = hf_files(model_dir)
    tensors = {}
    for f in files:
        tensors.update(load_safetensors(f))
    out = {}
    for name, t in tensors.items():
        target, transpose = hf_target(name)
        if target is not None:
            out[target] = t.t() if transpose else t
    head = out.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in out and not torch.equal(head, out["wte.weight"]):
        raise UserError(f"{model_dir}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    if head is not None and "wte.weight" not in out:
        out["wte.weight"] = head
    return out


# --- writing ---------------------------------------------------------------------------------

def hf_name(name: str) -> tuple[str, bool]:
    """Our parameter name -> (transformers' name, transpose?), checked against hf_target."""
    hf = "transformer." + name
    target, transpose = hf_target(hf)
    if target != name:
        raise ValueError(f"no Hugging Face name maps to {name!r}")
    return hf, transpose


def _eot_id(vocab_file: Path | None) -> int | None:
    if vocab_file is None:
        return None
    return json.loads(vocab_file.read_text(encoding="utf-8")).get(EOT)


def warn_no_tokenizer(encoder_dir) -> None:
    if encoder_dir is not None:  # a library call without encoder_dir asked for weights only
        print(f"warning: {encoder_dir} has no encoder.json + vocab.bpe (or vocab.json + "
              "merges.txt); the export has no tokenizer", file=sys.stderr)


def export_huggingface(model: torch.nn.Module, out_dir: str | os.PathLike,
                       encoder_dir: str | os.PathLike | None = None,
                       weights: bool = True) -> Path:
    """Write a transformers GPT-2 directory; the tokenizer files come from ``encoder_dir``.
    ``weights=False``: everything but model.safetensors (for exports that hold the weights in
    another format)."""
    from safetensors.torch import save_file

    config = unwrap(model).config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in weights_of(model).items():
        hf, transpose = hf_name(name)
        tensors[hf] = (t.t() if transpose else t).contiguous()
    if weights:
        atomic_write(out / WEIGHTS, lambda p: save_file(tensors, str(p),
                                                        metadata={"format": "pt"}))

    files = bpe_files(encoder_dir) if encoder_dir is not None else None
    eot = _eot_id(files[0] if files else None)
    if eot is None and config.n_vocab == 50257:
        eot = 50256
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json(out / "config.json", {
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
    write_json(out / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})
    if files is None:
        warn_no_tokenizer(encoder_dir)
        return out
    # encoder.json is vocab.json and vocab.bpe is merges.txt under transformers' names.
    copy_file(files[0], out / "vocab.json")
    copy_file(files[1], out / "merges.txt")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT} if eot is not None else {}
    write_json(out / "special_tokens_map.json", special)
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.n_ctx,
                        "add_prefix_space": False, "errors": "replace", **special}
    if eot is not None:
        tokenizer_config["added_tokens_decoder"] = {str(eot): {
            "content": EOT, "lstrip": False, "rstrip": False, "normalized": True,
            "single_word": False, "special": True}}
    write_json(out / "tokenizer_config.json", tokenizer_config)
    # The chat template the model was trained with (else gpt2's own, which every command here
    # uses for it): transformers reads chat_template.jinja beside the tokenizer.
    from ..tokenizer.chat import ChatTemplate

    ChatTemplate.load(encoder_dir).save(out)
    return out
