"""GPT-2's byte-level BPE: text <-> token ids, identical to OpenAI's ``src/encoder.py``.

    enc = Encoder(read_vocab_json("encoder.json"), read_merges("vocab.bpe"))
    enc.encode("Hello world<|endoftext|>")     # [15496, 995, 50256]
    enc.encode_ordinary("<|endoftext|>")       # the text as plain text: 7 ordinary tokens
    enc.decode([15496, 995])                   # "Hello world"

(``gpt2.tokenizer.load_encoder(model_dir)`` finds the files and the format for you.)

Byte-level BPE files are run by one of three backends, chosen when the vocabulary is loaded so
that the ids are always those of the original algorithm:

- ``tiktoken``: tiktoken's native BPE, when a token's id equals its merge priority
  (true of GPT-2's files: byte tokens 0-255, then merge i makes token 256 + i);
- ``tiktoken+lookup``: the same with merge priorities as tiktoken ranks, ids mapped through a
  numpy array, when the ids are any other consistent numbering;
- ``python``: a pure-Python BPE written like the original (``regex`` pre-tokenizer, cached
  ``bpe()``), ~5x slower, for vocabularies tiktoken cannot reproduce exactly.

tiktoken ranks a pair by the *result* token, the original by the merge line. They agree when
every byte and merge result has an id, no two merges build the same token, and every merge is
"canonical": BPE of the merged token with the earlier merges alone stops at exactly its two
parts (then no run can ever reach a token by another split, or merge out of the original's
order). That is checked when loading (~0.4 s for 50k merges; skipped for GPT-2's own merges,
which are known to pass). Unreachable extra tokens (``<|endoftext|>``, added tokens) are fine:
neither algorithm ever emits them.

Unicode: the tiktoken backends know letters and digits from tiktoken's Rust tables, the python
backend (like the original) from the installed ``regex`` package. They differ only on characters
assigned in recent Unicode versions (~17k code points such as CJK Extension J, none below
U+0500), which the older tables call punctuation.

Deliberate differences from the original:
``encode`` turns the literal text ``<|endoftext|>`` into its id (the original split it into ~7
tokens; ``encode_ordinary`` keeps that behaviour); lone surrogates are replaced by U+FFFD (as
tiktoken does) instead of raising; a ``vocab.bpe`` without the ``#version`` header or without a
trailing newline keeps all its merges (the original always dropped the first and last line);
tokens outside the byte alphabet decode as their own UTF-8 text instead of raising.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import regex

from ..errors import UserError

EOT = "<|endoftext|>"

# The pre-tokenizer of the GPT-2 release. The python backend runs it with the `regex` package.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# tiktoken's r50k pattern: splits every string exactly as GPT2_PATTERN does (possessive
# quantifiers only skip backtracking that cannot succeed; `\s` alone is what `\s+` matches when
# `\s+(?!\S)` fails), but it is faster in tiktoken's Rust regex engine.
TIKTOKEN_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

# sha256 of GPT-2's merges, normalised as "a b" lines joined by "\n": these merges are known to
# be canonical, which spares the 0.4 s check on every load of a GPT-2 model.
_GPT2_MERGES_SHA256 = "04e3597d7996f292ca9b8b7285ca4d58a6ae171ac47d73fc7140ceb0c7a6bbc0"


@functools.lru_cache(maxsize=1)
def _byte_table() -> tuple[tuple[int, str], ...]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, shift = [], 0
    for b in range(256):
        if b in printable:
            table.append((b, chr(b)))
        else:  # whitespace and control bytes move past Latin-1, so BPE files stay readable
            table.append((b, chr(256 + shift)))
            shift += 1
    return tuple(table)


def gpt2_byte_order() -> list[int]:
    """Bytes in the order of GPT-2's first 256 ids: the printable ones first, then the rest."""
    table = _byte_table()
    return [b for b, c in table if ord(c) < 256] + [b for b, c in table if ord(c) >= 256]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (a new dict each call; callers may edit it).

    Bytes 33-126, 161-172 and 174-255 stand for themselves; the other 68 map to chr(256 + n).
    """
    return dict(_byte_table())


@functools.lru_cache(maxsize=1)
def _alphabet() -> frozenset[str]:
    return frozenset(c for _, c in _byte_table())


@functools.lru_cache(maxsize=1)
def _to_latin1() -> dict[int, str]:
    """str.translate table turning a token's characters into one Latin-1 character per byte.

    Characters below 256 that are not in the alphabet map to U+FFFF so that the Latin-1 encode
    fails and the token is treated as literal text (added tokens such as "<pad>" survive that
    test only because all their characters are in the alphabet and stand for themselves).
    """
    table = {c: "\uffff" for c in range(256)}
    table.update({ord(c): chr(b) for b, c in _byte_table()})
    return table


def _token_bytes(token: str) -> bytes:
    """The bytes a vocabulary entry stands for (its own UTF-8 if it is not byte-level text)."""
    try:
        return token.translate(_to_latin1()).encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8")


def _fix_surrogates(text: str) -> str:
    # Lone surrogates cannot be UTF-8 encoded; pair what can be paired, replace the rest.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _bpe_parts(word: bytes, ranks: dict[bytes, int], limit: int) -> list[bytes]:
    """tiktoken's BPE (merge the adjacent pair whose result ranks lowest) using ranks < limit."""
    parts = [word[i:i + 1] for i in range(len(word))]
    while len(parts) > 1:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], limit)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _merges_are_canonical(merges: list[tuple[bytes, bytes]], ranks: dict[bytes, int]) -> bool:
    # By induction on the rank: if every earlier merge is canonical, tiktoken's run on a token
    # equals the original's, so checking with tiktoken's rule is checking the original's.
    for i, (a, b) in enumerate(merges):
        parts = _bpe_parts(a + b, ranks, 256 + i)
        if len(parts) != 2 or parts[0] != a:
            return False
    return True


class Encoder:
    """Byte-level BPE over ``encoder`` (token text -> id) and ``bpe_merges`` (in priority order).

    Same constructor as the original's ``Encoder(encoder, bpe_merges, errors)``. The input is
    assumed valid (ids 0..N-1, merges in the byte alphabet); :func:`load_encoder` checks files.
    ``backend`` says which implementation runs (see the module docstring); pass
    ``backend="python"`` to force the pure-Python one (for tests and benchmarks).
    """

    def __init__(self, encoder: dict[str, int], bpe_merges: Sequence[tuple[str, str]],
                 errors: str = "replace", source: str = "vocabulary",
                 backend: str | None = None) -> None:
        if backend not in (None, "python"):
            raise ValueError(f"backend must be None (automatic) or 'python', not {backend!r}")
        self.encoder = encoder
        self.decoder = {i: t for t, i in encoder.items()}
        self.bpe_merges = [tuple(m) for m in bpe_merges]
        self.errors = errors
        self.source = source  # named in errors raised while encoding
        self.fingerprint: str | None = None  # set by load_encoder: encoder_fingerprint(dir)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._id_bytes = [b""] * len(encoder)
        latin1 = _to_latin1()
        for token, i in encoder.items():
            try:  # inlined _token_bytes: this loop is most of the load time
                self._id_bytes[i] = token.translate(latin1).encode("latin-1")
            except UnicodeEncodeError:
                self._id_bytes[i] = token.encode("utf-8")
        self._tiktoken, self._lookup = (None, None) if backend else self._build_tiktoken()
        # tiktoken can decode too (5x faster) when its ranks are the ids and cover every id.
        self._tiktoken_decodes = (self._lookup is None and self._tiktoken is not None
                                  and self._tiktoken.n_vocab == self.n_vocab)
        if self._tiktoken is not None:
            self.backend = "tiktoken" if self._lookup is None else "tiktoken+lookup"
        else:
            self.backend = "python"
            self._pattern = regex.compile(GPT2_PATTERN)
            self.bpe_ranks = dict(zip(self.bpe_merges, range(len(self.bpe_merges))))
            self.bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe)

    # -- construction

    def _build_tiktoken(self):
        """(tiktoken.Encoding, id lookup or None), or (None, None) if tiktoken would differ."""
        import tiktoken

        enc, byte_encoder = self.encoder, self.byte_encoder
        if any(byte_encoder[b] not in enc for b in range(256)):
            return None, None
        byte_ids = [enc[byte_encoder[b]] for b in range(256)]
        # Byte ranks never take part in merging, so they may as well be the ids if they can.
        byte_ranks = byte_ids if sorted(byte_ids) == list(range(256)) else list(range(256))
        ranks = {bytes([b]): r for b, r in enumerate(byte_ranks)}
        lookup = [0] * 256
        for b, r in enumerate(byte_ranks):
            lookup[r] = byte_ids[b]
        id_bytes = self._id_bytes
        for i, (a, b) in enumerate(self.bpe_merges):
            merged = enc.get(a + b)
            if merged is None:
                return None, None  # the original raises KeyError if it ever ends there
            token = id_bytes[merged]
            if token in ranks:
                return None, None  # two merges build the same token: one rank cannot say which
            ranks[token] = 256 + i
            lookup.append(merged)
        if _merges_sha256(self.bpe_merges) != _GPT2_MERGES_SHA256:
            pairs = [(_token_bytes(a), _token_bytes(b)) for a, b in self.bpe_merges]
            if not _merges_are_canonical(pairs, ranks):
                return None, None
        special = {}
        if self.eot_token is not None:
            special[EOT] = len(lookup)
            lookup.append(self.eot_token)
        encoding = tiktoken.Encoding(f"bpe:{self.source}", pat_str=TIKTOKEN_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=special)
        table = np.asarray(lookup, dtype=np.int64)
        identity = bool(np.array_equal(table, np.arange(len(table))))
        return encoding, (None if identity else table)

    def __getstate__(self) -> dict:
        # Rebuilt on unpickling (tiktoken objects and lru caches do not pickle).
        return {"encoder": self.encoder, "bpe_merges": self.bpe_merges, "errors": self.errors,
                "source": self.source, "fingerprint": self.fingerprint,
                "backend": "python" if self.backend == "python" else None}

    def __setstate__(self, state: dict) -> None:
        fingerprint = state.pop("fingerprint")
        self.__init__(**state)
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        return f"Encoder({self.source!r}, n_vocab={self.n_vocab}, backend={self.backend!r})"

    # -- properties

    @property
    def n_vocab(self) -> int:
        """Number of ids (entries of encoder.json): 50257 for GPT-2."""
        return len(self._id_bytes)

    @property
    def eot_token(self) -> int | None:
        """Id of ``<|endoftext|>`` (50256 for GPT-2), None if the vocabulary has none."""
        return self.encoder.get(EOT)

    # -- encoding

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text``, with ``<|endoftext|>`` treated as plain text (like the original)."""
        if self._tiktoken is None:
            return self._python_encode(text)
        return self._map(self._tiktoken.encode_ordinary(text))

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; each literal ``<|endoftext|>`` becomes :attr:`eot_token`."""
        if self.eot_token is None:
            return self.encode_ordinary(text)
        if self._tiktoken is None:
            return self._join_eot([self._python_encode(t) for t in text.split(EOT)])
        return self._map(self._tiktoken.encode(text, allowed_special={EOT}))

    def encode_ordinary_batch(self, texts: Iterable[str], num_threads: int = 8) -> list[list[int]]:
        """:meth:`encode_ordinary` of each text. Threads pay off on pieces of ~100 KB; for many
        small documents, join them into such pieces first (threads then make it slower)."""
        texts = list(texts)
        if self._tiktoken is None:  # pure Python holds the GIL: threads would not help
            return [self._python_encode(t) for t in texts]
        out = self._tiktoken.encode_ordinary_batch(texts, num_threads=num_threads)
        return [self._map(ids) for ids in out]

    def encode_batch(self, texts: Iterable[str], num_threads: int = 8) -> list[list[int]]:
        """:meth:`encode` of each text, in threads (see :meth:`encode_ordinary_batch`)."""
        texts = list(texts)
        if self._tiktoken is None or self.eot_token is None:
            return [self.encode(t) for t in texts]
        out = self._tiktoken.encode_batch(texts, num_threads=num_threads, allowed_special={EOT})
        return [self._map(ids) for ids in out]

    def _map(self, ranks: list[int]) -> list[int]:
        if self._lookup is None:
            return ranks
        return self._lookup[np.asarray(ranks, dtype=np.int64)].tolist()

    def _join_eot(self, pieces: list[list[int]]) -> list[int]:
        out = pieces[0]
        for ids in pieces[1:]:
            out.append(self.eot_token)
            out.extend(ids)
        return out

    # -- the pure-Python backend, written like the original

    def _bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            first, second = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if (first, second) not in self.bpe_ranks:
                break
            # Merge every occurrence of the pair, left to right, as the original does.
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def _python_encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _fix_surrogates(text)
        ids = []
        for piece in self._pattern.findall(text):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for part in self.bpe(token):
                i = self.encoder.get(part)
                if i is None:
                    raise UserError(f"{self.source}: BPE produced {part!r}, which has no id in "
                                    f"the vocabulary (a merge result or byte is missing)")
                ids.append(i)
        return ids

    # -- decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for. Accepts lists, numpy arrays and tensors."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self._tiktoken_decodes:
            try:
                return self._tiktoken.decode_bytes(ids)
            except (KeyError, OverflowError, TypeError, ValueError):
                pass  # a bad id: the path below says which
        table = self._id_bytes
        if ids and not 0 <= min(ids) <= max(ids) < len(table):
            bad = next(i for i in ids if not 0 <= i < len(table))
            raise ValueError(f"token id {bad} is not in 0..{len(table) - 1}")
        return b"".join([table[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; bytes that are not valid UTF-8 become U+FFFD (errors='replace')."""
        return self.decode_bytes(ids).decode("utf-8", errors=self.errors)


# ----------------------------------------------------------------------------- vocabulary files

def _merges_sha256(merges: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256("\n".join(map(" ".join, merges)).encode("utf-8")).hexdigest()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def read_vocab_json(path: str | os.PathLike) -> dict[str, int]:
    """encoder.json / vocab.json: a JSON object token -> id, the ids exactly 0..N-1."""
    path = Path(path)
    try:
        vocab = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
                        ) from None
    if not isinstance(vocab, dict) or not vocab:
        raise UserError(f"{path}: expected a non-empty JSON object mapping tokens to ids")
    ids = list(vocab.values())
    if not all(type(i) is int for i in ids):
        token = next(t for t, i in vocab.items() if type(i) is not int)
        raise UserError(f"{path}: the id of {token!r} is {vocab[token]!r}, not an integer")
    if sorted(ids) != list(range(len(ids))):
        seen, n = set(), len(ids)
        for token, i in vocab.items():
            if i in seen or not 0 <= i < n:
                problem = "is used twice" if i in seen else f"is outside 0..{n - 1}"
                raise UserError(f"{path}: id {i} ({token!r}) {problem}; ids must be 0..N-1")
            seen.add(i)
    return vocab


def check_merges(vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                 merges_path: str | os.PathLike, vocab_path: str | os.PathLike) -> None:
    """Every merge joins two tokens of the vocabulary into a third: one line naming the first
    that does not (such a file encodes into ids nobody trained, or fails on some text)."""
    for a, b in merges:
        missing = next((t for t in (a, b, a + b) if t not in vocab), None)
        if missing is None:
            continue
        lines = _read_text(Path(merges_path)).split("\n")
        n = next((i for i, line in enumerate(lines, 1) if line.split() == [a, b]), "?")
        what = "the token it makes" if missing == a + b else "the symbol"
        raise UserError(f"{merges_path}: line {n}: merge {a + ' ' + b!r}: {what} {missing!r} "
                        f"is not in {Path(vocab_path).name} (vocabulary and merges do not match)")


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """vocab.bpe / merges.txt: an optional ``#version`` line, then one ``a b`` merge per line."""
    path = Path(path)
    lines = _read_text(path).split("\n")
    start = 1 if lines and lines[0].startswith("#version") else 0
    split = [line.split() for line in lines[start:]]
    merges = [(p[0], p[1]) for p in split if len(p) == 2]
    chars = set().union(*(m[0] + m[1] for m in merges))
    if len(merges) == sum(1 for p in split if p) and chars <= _alphabet():
        return merges
    # Something is wrong: find the first bad line for the message.
    for n, (line, parts) in enumerate(zip(lines[start:], split), start + 1):
        if parts and len(parts) != 2:
            raise UserError(f"{path}: line {n}: expected two tokens separated by a space, "
                            f"got {line.strip()!r}")
        if parts and not _alphabet().issuperset(parts[0] + parts[1]):
            raise UserError(f"{path}: line {n}: {line.strip()!r} has characters outside GPT-2's "
                            f"byte alphabet (not a byte-level BPE merges file?)")
    raise AssertionError("unreachable")
