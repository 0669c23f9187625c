"""GGUF, for llama.cpp, ollama and LM Studio: llama.cpp's ``gpt2`` architecture, written with
llama.cpp's own ``gguf`` package (``pip install 'gpt2[gguf]'``).

    export_gguf(model, "out/model.gguf", encoder_dir="checkpoint/run1", outtype="q8_0")

What llama.cpp's ``convert_hf_to_gguf.py`` writes for a GPT-2, from our tensors: its tensor
names (``token_embd``, ``position_embd``, ``blk.N.attn_qkv`` ...; the head is tied to
``token_embd``, so no ``output``), weights as [out, in] (nn.Linear's layout, which is what
the converter makes of transformers' transposed Conv1D), its ``gpt2.*`` hyperparameters, and
the byte-level BPE tokenizer (``tokenizer.ggml.model`` gpt2, pre-tokenizer ``gpt-2``: tokens,
token types, merges, ``<|endoftext|>`` as BOS and EOS). Types follow the converter: f16 and
q8_0 apply to 2-D weights; biases, norms and the position table stay f32. The chat template
goes to ``tokenizer.chat_template`` when the model directory has one (its ``{% generation %}``
markers removed: they mark answers for training and render nothing).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import UserError
from ..tokenizer.bpe import EOT
from ..files.atomic import atomic_write
from .tensors import unwrap, weights_of

OUTTYPES = ("f32", "f16", "q8_0")

# Our parameter names -> llama.cpp's (gguf-py's TENSOR_NAMES for MODEL_ARCH.GPT2).
_NAMES = {
    "wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias",
}
_BLOCK = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("--format gguf needs the gguf package: pip install 'gpt2[gguf]' "
                        "(or pip install gguf)") from None
    return gguf


def gguf_name(name: str) -> str:
    """Our tensor name -> llama.cpp's GPT-2 tensor name."""
    if name in _NAMES:
        return _NAMES[name]
    m = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None or m.group(2) not in _BLOCK:
        raise ValueError(f"no GGUF name for tensor {name}")
    return f"blk.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"


def _tensor_type(gguf, name: str, t: np.ndarray, outtype: str):
    """The converter's rule: f32 for 1-D tensors, norms and the position table; q8_0 needs
    rows that are whole 32-value blocks (else f16)."""
    Q = gguf.GGMLQuantizationType
    if outtype == "f32" or t.ndim < 2 or name.startswith("position_embd"):
        return Q.F32
    if outtype == "q8_0" and t.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def _tokenizer(gguf, writer, encoder, n_vocab: int, where: str) -> None:
    """GPT-2's byte-level BPE as llama.cpp reads it; ids past the tokenizer's are padding."""
    from ..tokenizer.bpe import Encoder

    if not isinstance(encoder, Encoder):
        raise UserError(f"{where}: a {type(encoder).__name__} tokenizer cannot be written to "
                        "GGUF's gpt2 architecture, which reads byte-level BPE (encoder.json + "
                        "vocab.bpe) only")
    if encoder.n_vocab > n_vocab:
        raise UserError(f"{where}: the tokenizer has {encoder.n_vocab} tokens but the model "
                        f"only {n_vocab} rows of embeddings")
    T = gguf.TokenType
    tokens = [encoder.decoder[i] for i in range(encoder.n_vocab)]
    types = [T.CONTROL if t == EOT else T.NORMAL for t in tokens]
    tokens += [f"[PAD{i}]" for i in range(encoder.n_vocab, n_vocab)]
    types += [T.UNUSED] * (n_vocab - encoder.n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # A tokenizer without merges (bytes only): llama.cpp requires the key and gguf-py cannot
    # write an empty list, so it gets one merge that never applies: a letter and a digit are
    # never in one piece of GPT-2's pre-tokenizer.
    merges = [f"{a} {b}" for a, b in encoder.bpe_merges] or ["a 1"]
    writer.add_token_merges(merges)
    if encoder.eot_token is not None:
        writer.add_bos_token_id(encoder.eot_token)
        writer.add_eos_token_id(encoder.eot_token)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def export_gguf(model: torch.nn.Module, out: str | os.PathLike, encoder_dir: str | os.PathLike,
                outtype: str = "f32", name: str | None = None) -> Path:
    """Write ``model`` and ``encoder_dir``'s tokenizer (and chat template, if any) to ``out``,
    atomically (a temporary name, renamed into place when complete)."""
    gguf = require_gguf()
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    from ..tokenizer.chat import ChatTemplate
    from ..tokenizer.files import load_encoder

    config = unwrap(model).config
    encoder = load_encoder(encoder_dir)
    template = ChatTemplate.saved(encoder_dir)
    out = Path(out)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        try:
            fill(w)
        finally:
            w.close()

    def fill(w) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or out.stem)
        w.add_description(f"GPT-2 exported by gpt2 {__version__} from {encoder_dir}")
        w.add_block_count(config.n_layer)
        w.add_context_length(config.n_ctx)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(4 * config.n_embd)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(1e-5)
        w.add_file_type(file_type)
        if outtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer(gguf, w, encoder, config.n_vocab, str(encoder_dir))
        if template is not None:
            w.add_chat_template(template.unmarked_source)
        for ours, t in weights_of(model).items():
            gname = gguf_name(ours)
            data = t.float().numpy()
            qtype = _tensor_type(gguf, gname, data, outtype)
            if qtype == gguf.GGMLQuantizationType.Q8_0:
                w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(gname, data.astype(np.float16 if qtype ==
                                                gguf.GGMLQuantizationType.F16 else np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()

    return atomic_write(out, write)
