"""Tokenizers: GPT-2's byte-level BPE (tiktoken-fast, the original's ids), sentencepiece, and
training either on your own corpus.

    from gpt2.tokenizer import load_encoder
    enc = load_encoder("models/124M")
    enc.encode("Hello world<|endoftext|>")     # [15496, 995, 50256]
"""

from .bpe import EOT, Encoder, bytes_to_unicode
from .files import (ENCODER_FILES, copy_encoder_files, encoder_fingerprint, encoder_format,
                    get_encoder, load_encoder)
from .sentencepiece import SentencePieceEncoder

__all__ = ["EOT", "ENCODER_FILES", "Encoder", "SentencePieceEncoder", "bytes_to_unicode",
           "copy_encoder_files", "encoder_fingerprint", "encoder_format", "get_encoder",
           "load_encoder"]
