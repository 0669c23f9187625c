"""Sentencepiece models (``sp.model``) behind the same interface as the BPE :class:`Encoder`.

    enc = SentencePieceEncoder("my-tok/sp.model")     # pip install 'gpt2[sentencepiece]'
    enc.encode("a<|endoftext|>b")                     # the <|endoftext|> piece's id in the middle
"""

from __future__ import annotations

import os
from typing import Iterable

from ..errors import UserError
from .bpe import EOT


class SentencePieceEncoder:
    """A sentencepiece model behind the same interface as :class:`Encoder`.

    ``eot_token`` is the id of a ``<|endoftext|>`` piece if the model has one (train with
    ``user_defined_symbols=["<|endoftext|>"]``), else the model's eos id (which decodes to
    nothing). sentencepiece always matches user-defined pieces: ``encode_ordinary`` keeps that
    text as text by writing it with the model's byte pieces (byte fallback, our trainer's
    default). ``model_proto`` (the model's bytes) is loaded instead of
    ``model_file`` when given; pickling uses it.
    """

    backend = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike, errors: str = "replace",
                 model_proto: bytes | None = None) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise UserError(f"{model_file}: reading a sentencepiece model needs the "
                            "sentencepiece package: pip install 'gpt2[sentencepiece]'") from None
        self.model_file = str(model_file)
        self.errors = errors
        self.fingerprint: str | None = None
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            if model_proto is None:
                self.sp.Load(self.model_file)
            else:
                self.sp.LoadFromSerializedProto(model_proto)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{model_file}: not a valid sentencepiece model ({e})") from None
        pid = self.sp.piece_to_id(EOT)
        if pid != self.sp.unk_id() and self.sp.id_to_piece(pid) == EOT:
            self._eot = pid
        else:
            self._eot = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def __getstate__(self) -> dict:
        # The model itself travels, so unpickling does not depend on the file still existing.
        return {"model_file": self.model_file, "errors": self.errors,
                "model_proto": self.sp.serialized_model_proto(), "fingerprint": self.fingerprint}

    def __setstate__(self, state: dict) -> None:
        fingerprint = state.pop("fingerprint")
        self.__init__(**state)
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        return f"SentencePieceEncoder({self.model_file!r}, n_vocab={self.n_vocab})"

    @property
    def n_vocab(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eot_token(self) -> int | None:
        return self._eot

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text``, a literal ``<|endoftext|>`` included as text: sentencepiece would
        match it as the user-defined piece, so it is encoded as a character the vocabulary
        lacks (byte fallback gives that character's byte pieces), whose pieces are then
        replaced by the literal's bytes: the same segmentation around it, decoded back
        exactly."""
        if self._eot is None or self._eot == self.sp.eos_id() or EOT not in text:
            return self.sp.encode(text)
        unk = self.sp.unk_id()
        stand_in = next((chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text
                         and self.sp.piece_to_id(chr(c)) == unk), "")
        literal, marker = self._byte_pieces(EOT), self._byte_pieces(stand_in)
        if not stand_in or unk in literal + marker:
            raise UserError(f"{self.model_file}: this sentencepiece model has no byte pieces, so "
                            "it cannot keep the text <|endoftext|> as text (sentencepiece makes "
                            "it the special piece); train it with byte fallback")
        ids, out, i = self.sp.encode(text.replace(EOT, stand_in)), [], 0
        while i < len(ids):
            if ids[i:i + len(marker)] == marker:
                out += literal
                i += len(marker)
            else:
                out.append(ids[i])
                i += 1
        return out

    def _byte_pieces(self, text: str) -> list[int]:
        return [self.sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]

    def encode(self, text: str) -> list[int]:
        if self._eot is None:
            return self.encode_ordinary(text)
        pieces = text.split(EOT)
        out = self.sp.encode(pieces[0])
        for piece in pieces[1:]:
            out.append(self._eot)
            out.extend(self.sp.encode(piece) if piece else [])
        return out

    def encode_ordinary_batch(self, texts: Iterable[str], num_threads: int = 8) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def encode_batch(self, texts: Iterable[str], num_threads: int = 8) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is not in 0..{self.n_vocab - 1}")
        return self.sp.decode(ids, out_type=bytes)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=self.errors)
