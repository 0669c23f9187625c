"""Model directories: find them, load any of the three layouts a user may have, save ours.

A model directory is one of:

- **release**: OpenAI's layout, as ``download_model.py`` fetches it: ``checkpoint``,
  ``model.ckpt.{index,data-00000-of-00001,meta}``, ``hparams.json``, ``encoder.json``,
  ``vocab.bpe``. The TensorFlow checkpoint is read without TensorFlow (:mod:`gpt2.tf_checkpoint`).
- **huggingface**: ``config.json`` + ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``) + ``vocab.json`` + ``merges.txt``.
- **ours**: ``hparams.json`` + ``model.safetensors`` + the encoder files; what :func:`save_model`
  and training checkpoints write, so a checkpoint directory is itself a model directory.

Foreign names are mapped by one table per format; every source tensor must be used and every
parameter filled with the right shape, or loading stops with a one-line error. Pickled weights
(``.bin``, ``.pt``, ``.ckpt`` from PyTorch) are refused: unpickling a downloaded file runs code.

    model = load_model("models/124M")                 # eval mode, fp32 on CPU
    save_model(model, "out/my-model", encoder_dir="models/124M")
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from .download import ALIASES
from .download import MODELS as RELEASED_MODELS
from .errors import UserError
from .model import GPT, GPTConfig

WEIGHTS = "model.safetensors"
HPARAMS = "hparams.json"
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def canonical_name(model_name: str) -> str:
    return ALIASES.get(model_name, model_name)


def _expand(path: str | os.PathLike) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def resolve_model_dir(model_name: str = "124M", models_dir: str | os.PathLike = "models",
                      model_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding a model: ``model_dir`` if given, else ``models_dir/model_name``.

    117M and 124M (and 345M and 355M) name the same model: either directory is accepted.
    """
    if model_dir is not None:
        path = _expand(model_dir)
        if not path.is_dir():
            raise UserError(f"model directory {path} does not exist")
        return path
    root = _expand(models_dir)
    names = [model_name, canonical_name(model_name)]
    names += [old for old, new in ALIASES.items() if new == model_name]
    for name in dict.fromkeys(names):
        if (root / name).is_dir():
            return root / name
    hint = ""
    if canonical_name(model_name) in RELEASED_MODELS:
        hint = f"; download it with: python download_model.py {model_name} --models_dir {root}"
    raise UserError(f"model directory {root / model_name} does not exist{hint}")


def detect_format(model_dir: Path) -> str:
    """'ours', 'huggingface' or 'release', from the files present."""
    if (model_dir / HPARAMS).is_file() and (model_dir / WEIGHTS).is_file():
        return "ours"
    if (model_dir / HF_CONFIG).is_file() and ((model_dir / WEIGHTS).is_file()
                                              or (model_dir / HF_INDEX).is_file()):
        return "huggingface"
    if (model_dir / "checkpoint").is_file() or any(model_dir.glob("*.index")):
        return "release"
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{model_dir / pickles[0]}: refusing to load a pickled file (it can run "
                        "arbitrary code); convert it to model.safetensors first")
    raise UserError(f"{model_dir}: no model weights found (expected model.safetensors, or a "
                    "TensorFlow checkpoint as download_model.py fetches)")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None


def _config_from(path: Path, values: dict) -> GPTConfig:
    try:
        return GPTConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None


def load_config(model_dir: str | os.PathLike) -> GPTConfig:
    """The model's GPTConfig, from hparams.json (ours, release) or config.json (Hugging Face)."""
    model_dir = Path(model_dir)
    if (model_dir / HPARAMS).is_file():
        return _config_from(model_dir / HPARAMS, _read_json(model_dir / HPARAMS))
    if (model_dir / HF_CONFIG).is_file():
        return _hf_config(model_dir / HF_CONFIG)
    raise UserError(f"{model_dir / HPARAMS}: file not found")


# --- Hugging Face ----------------------------------------------------------------------------

# Settings under which transformers' GPT2LMHeadModel computes exactly what GPT does.
_HF_REQUIRED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
    "add_cross_attention": (False,),
}


def _hf_config(path: Path) -> GPTConfig:
    c = _read_json(path)
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
    return _config_from(path, values)


def _hf_target(name: str) -> tuple[str | None, bool]:
    """Hugging Face name -> (our name or None to ignore, transpose?). Conv1D stores [in, out]."""
    name = name.removeprefix("transformer.")
    if re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", name):
        return None, False  # causal-mask buffers saved by old transformers versions
    if name == "lm_head.weight":
        return "lm_head.weight", False
    transpose = bool(re.fullmatch(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                                  r"\.weight", name))
    return name, transpose


def _hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    if (model_dir / WEIGHTS).is_file():
        files = [model_dir / WEIGHTS]
    else:
        index = _read_json(model_dir / HF_INDEX)
        files = [model_dir / f for f in sorted(set(index.get("weight_map", {}).values()))]
    tensors = {}
    for f in files:
        tensors.update(_load_safetensors(f))
    out = {}
    for name, t in tensors.items():
        target, transpose = _hf_target(name)
        if target is not None:
            out[target] = t.t() if transpose else t
    head = out.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in out and not torch.equal(head, out["wte.weight"]):
        raise UserError(f"{model_dir}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    if head is not None and "wte.weight" not in out:
        out["wte.weight"] = head
    return out


# --- OpenAI release (TensorFlow) ------------------------------------------------------------

def _release_target(name: str) -> tuple[str, bool]:
    """Release variable name -> (our name, is a conv1d weight [1, in, out] to squeeze and transpose)."""
    m = re.fullmatch(r"model/(.+)", name)
    if not m:
        return name, False
    parts = m.group(1).split("/")
    if parts[0] in ("wte", "wpe") and len(parts) == 1:
        return f"{parts[0]}.weight", False
    if re.fullmatch(r"h\d+", parts[0]):
        parts[0] = f"h.{parts[0][1:]}"
    leaf = {"g": "weight", "b": "bias", "w": "weight"}.get(parts[-1], parts[-1])
    return ".".join(parts[:-1] + [leaf]), parts[-1] == "w"


def _release_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from .tf_checkpoint import read_tf_checkpoint

    out = {}
    for name, array in read_tf_checkpoint(model_dir).items():
        target, conv = _release_target(name)
        if conv:
            if array.ndim != 3 or array.shape[0] != 1:
                raise UserError(f"{model_dir}: {name} has shape {list(array.shape)}, expected [1, in, out]")
            array = array[0].T
        out[target] = torch.from_numpy(np.ascontiguousarray(array))
    return out


# --- ours ------------------------------------------------------------------------------------

def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read safetensors ({e}); the file may be truncated") from None


def _check_and_build(config: GPTConfig, tensors: dict[str, torch.Tensor], where: Path) -> GPT:
    """Make a GPT from named tensors: every tensor used, every parameter filled, shapes checked."""
    with torch.device("meta"):
        model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    unused = sorted(set(tensors) - set(expected))
    if unused:
        raise UserError(f"{where}: unexpected tensor {unused[0]!r} ({len(unused)} unused in all); "
                        "is this a GPT-2 checkpoint?")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UserError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise UserError(f"{where}: {name} has shape {list(tensors[name].shape)}, but the "
                            f"hparams imply {list(shape)}")
    state = {k: tensors[k] for k in expected}
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.lm_head.weight = model.wte.weight  # assign=True replaced wte's parameter: tie again
    return model


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def load_model(path: str | os.PathLike, device=None, dtype=None) -> GPT:
    """Load a model directory of any layout; returns the model in eval mode.

    ``path`` may also be a released model's name (``"124M"``), looked up under ``models/``.
    Weights keep float32 unless ``dtype`` says otherwise; ``device`` defaults to the CPU.
    """
    model_dir = _expand(path)
    if (not model_dir.exists() and os.sep not in str(path)
            and canonical_name(str(path)) in RELEASED_MODELS):
        model_dir = resolve_model_dir(str(path))
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    fmt = detect_format(model_dir)
    config = load_config(model_dir)
    if fmt == "ours":
        tensors = _load_safetensors(model_dir / WEIGHTS)
    elif fmt == "huggingface":
        tensors = _hf_tensors(model_dir)
    else:
        tensors = _release_tensors(model_dir)
    model = _check_and_build(config, tensors, model_dir)
    model.to(device=device or "cpu", dtype=_parse_dtype(dtype) or torch.float32)
    return model.eval()


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT inside torch.compile / DDP / FSDP wrappers."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"cannot find a GPT inside {type(model).__name__}")
        model = inner
    return model


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then rename onto ``path``: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model directory is meant to be shared
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_hparams(config: GPTConfig, model_dir: Path) -> None:
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    atomic_write(model_dir / HPARAMS, lambda p: p.write_text(text))


def save_model(model: torch.nn.Module, path: str | os.PathLike,
               encoder_dir: str | os.PathLike | None = None) -> Path:
    """Write ``path`` as our model directory: model.safetensors, hparams.json, encoder files.

    Each file is written to a temporary name and renamed, so an existing model directory is
    never left half-overwritten. Weights keep the model's dtype and come from the unwrapped
    module (no ``_orig_mod.`` or ``module.`` prefixes); the tied head is stored once, as wte.
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    out = _expand(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    atomic_write(out / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_hparams(model.config, out)
    if encoder_dir is not None and Path(encoder_dir).resolve() != out.resolve():
        from .encoder import copy_encoder_files

        copy_encoder_files(encoder_dir, out)
    return out
