"""ONNX, for ONNX Runtime and transformers.js: a decoder with a KV cache, laid out as Optimum
exports GPT-2 (``pip install 'gpt2[onnx]'``).

    export_onnx(model, "out/run1-onnx", encoder_dir="checkpoint/run1")

The directory holds ``model.onnx`` (also as ``onnx/model.onnx``, or ``onnx/model_fp16.onnx``
with ``fp16``: hard links, where transformers.js looks; weights over 2 GB go to
``model.onnx_data`` beside it), config.json, generation_config.json and the tokenizer files of
the Hugging Face export plus ``tokenizer.json`` (the fast tokenizer transformers.js reads). The
graph, one for the prompt and every decode step (an empty cache on the first call):

- inputs ``input_ids`` [batch, sequence_length] (int64), ``attention_mask`` [batch,
  past_sequence_length + sequence_length] (int64, 0 for left padding), ``position_ids`` [batch,
  sequence_length] (int64) and ``past_key_values.N.key`` / ``.value`` [batch, n_head,
  past_sequence_length, head_dim];
- outputs ``logits`` [batch, sequence_length, n_vocab] and ``present.N.key`` / ``.value``
  [batch, n_head, past_sequence_length + sequence_length, head_dim].

It is traced from the model's own modules (embeddings, blocks, final norm, tied head) by
``torch.onnx.export``; nothing here computes attention itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import UserError
from ..tokenizer.bpe import EOT
from .tensors import unwrap

OPSET = 18


def require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("--format onnx needs onnx and onnxscript: pip install 'gpt2[onnx]'") \
            from None


@contextlib.contextmanager
def _quiet(name: str):
    """The exporter's log of every step and skipped op, silenced (errors still raise)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class CachedDecoder(torch.nn.Module):
    """GPT with Optimum's decoder signature, around the model's own forward: explicit
    positions, a 0/1 attention mask over the cache and the new tokens (0: left padding), and
    the cache as flat tensors in and out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = unwrap(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        logits, present = self.model(input_ids, past=pairs, use_cache=True,
                                     key_mask=attention_mask.bool(), positions=position_ids)
        return (logits, *(t for pair in present for t in pair))


def _link(src: Path, dst: Path) -> None:
    """A hard link (no second copy of the weights), or a copy where links are not allowed."""
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]], eot: int | None,
                   ) -> dict:
    """GPT-2's byte-level BPE in the ``tokenizers`` library's format (what transformers'
    GPT2TokenizerFast saves): no normalizer, byte-level pre-tokenizer and decoder."""
    added = [] if eot is None else [{"id": eot, "content": EOT, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": True,
                                     "special": True}]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for a, b in merges]},
    }


def export_onnx(model: torch.nn.Module, out_dir: str | os.PathLike,
                encoder_dir: str | os.PathLike, fp16: bool = False) -> Path:
    """Write the ONNX decoder and the Hugging Face config and tokenizer files to ``out_dir``."""
    require_onnx()
    from ..tokenizer.bpe import Encoder
    from ..tokenizer.files import load_encoder
    from ..files.atomic import WriteError, existing_parent, write_json
    from .hf import export_huggingface

    out = Path(out_dir)
    model = unwrap(model)
    # The graph holds every weight: a disk without room for them fails now, not after tracing
    needed = sum(p.numel() for p in model.parameters()) * (2 if fp16 else 4)
    if shutil.disk_usage(existing_parent(out)).free < needed:
        raise WriteError(out, "no space left on device", no_space=True, needed=needed)
    config = model.config
    encoder = load_encoder(encoder_dir)
    if not isinstance(encoder, Encoder):
        raise UserError(f"{encoder_dir}: a {type(encoder).__name__} tokenizer has no "
                        "tokenizer.json for ONNX runtimes here; only byte-level BPE does")
    export_huggingface(model, out, encoder_dir=encoder_dir, weights=False)
    write_json(out / "tokenizer.json", tokenizer_json(encoder.encoder, encoder.bpe_merges,
                                                      encoder.eot_token), indent=None)
    dtype = torch.float16 if fp16 else torch.float32
    # fp16: a half copy (the graph keeps referring to its weights until saved)
    decoder = CachedDecoder(copy.deepcopy(model).to(dtype) if fp16 else model).eval()
    B, T, P = 2, 3, 4
    shape = (B, config.n_head, P, config.head_dim)
    past = [torch.zeros(shape, dtype=dtype) for _ in range(2 * config.n_layer)]
    example = (torch.zeros(B, T, dtype=torch.long), torch.ones(B, P + T, dtype=torch.long),
               torch.arange(P, P + T).expand(B, T).contiguous(), *past)
    inputs, outputs = io_names(config.n_layer)
    # Axis names as Optimum's (torch.onnx names the graph's axes after these strings).
    batch, seq, past_len = "batch_size", "sequence_length", "past_sequence_length"
    dynamic = [{0: batch, 1: seq}, {0: batch, 1: "past_sequence_length + sequence_length"},
               {0: batch, 1: seq}, ({0: batch, 2: past_len},) * len(past)]  # *past: one entry
    # With gradients off the model writes new keys into a cache's spare room in place
    # (decoding); a graph must concatenate, which the model does with them on.
    with torch.enable_grad(), warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            decoder, example, input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True,
            external_data=False, optimize=True, verbose=False)
    graph = program.model_proto
    for value in graph.graph.output:  # torch names S + T either way round; Optimum's name
        if value.name.startswith("present."):
            value.type.tensor_type.shape.dim[2].dim_param = "past_sequence_length + " \
                                                            "sequence_length"
    import onnx

    # Protobuf stops at 2 GB: larger models keep their weights in model.onnx_data (Optimum's
    # name). The directory is a temporary one, renamed into place when complete.
    (out / "onnx").mkdir()
    files = ["model.onnx"]
    if sum(t.numel() * t.element_size() for t in model.parameters()) > 1_800_000_000:
        onnx.save(graph, str(out / "model.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=True, location="model.onnx_data")
        files.append("model.onnx_data")
    else:
        onnx.save(graph, str(out / "model.onnx"))
    # transformers.js picks onnx/model.onnx for dtype fp32 and onnx/model_fp16.onnx for fp16
    _link(out / "model.onnx", out / "onnx" / ("model_fp16.onnx" if fp16 else "model.onnx"))
    if len(files) > 1:
        _link(out / files[1], out / "onnx" / files[1])
    meta = json.loads((out / "config.json").read_text())
    meta["dtype"] = "float16" if fp16 else "float32"
    write_json(out / "config.json", meta)
    return out
