"""gpt2.files.tf_checkpoint: OpenAI's TensorFlow checkpoint format, read and written without TensorFlow.

tests/fixtures/release-tiny/ was saved by real TensorFlow 2.21 (tests/fixtures/
make_release_fixture.py), with logits TensorFlow computed; the writer's output was checked to
load in TensorFlow by the same script.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2.files import tf_format
from gpt2.files.checksums import mask as crc32c_mask
from gpt2.errors import UserError
from gpt2.files.tf_checkpoint import (crc32c, list_tf_checkpoint, read_tf_checkpoint,
                                resolve_checkpoint_prefix, write_tf_checkpoint)

FIXTURE = Path(__file__).parent / "fixtures" / "release-tiny"
HPARAMS = json.loads((FIXTURE / "hparams.json").read_text())


def release_names_and_shapes(hp: dict) -> dict[str, tuple[int, ...]]:
    E = hp["n_embd"]
    out = {"model/wte": (hp["n_vocab"], E), "model/wpe": (hp["n_ctx"], E),
           "model/ln_f/g": (E,), "model/ln_f/b": (E,)}
    for i in range(hp["n_layer"]):
        for ln in ("ln_1", "ln_2"):
            out[f"model/h{i}/{ln}/g"] = out[f"model/h{i}/{ln}/b"] = (E,)
        for layer, nx, nf in (("attn/c_attn", E, 3 * E), ("attn/c_proj", E, E),
                              ("mlp/c_fc", E, 4 * E), ("mlp/c_proj", 4 * E, E)):
            out[f"model/h{i}/{layer}/w"] = (1, nx, nf)
            out[f"model/h{i}/{layer}/b"] = (nf,)
    return out


def numpy_gpt2_logits(v: dict[str, np.ndarray], tokens: np.ndarray, hp: dict) -> np.ndarray:
    """The release's forward pass in float64 numpy: an independent check of the values read."""
    v = {k: a.astype(np.float64) for k, a in v.items()}

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * v[p + "/g"] + v[p + "/b"]

    def dense(x, p):
        return x @ v[p + "/w"][0] + v[p + "/b"]

    B, T = tokens.shape
    H, E = hp["n_head"], hp["n_embd"]
    h = v["model/wte"][tokens] + v["model/wpe"][:T]
    causal = np.tril(np.ones((T, T), dtype=bool))
    for i in range(hp["n_layer"]):
        p = f"model/h{i}"
        q, k, val = np.split(dense(ln(h, p + "/ln_1"), p + "/attn/c_attn"), 3, axis=-1)
        q, k, val = (t.reshape(B, T, H, E // H).transpose(0, 2, 1, 3) for t in (q, k, val))
        w = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(E // H), -np.inf)
        w = np.exp(w - w.max(-1, keepdims=True))
        a = (w / w.sum(-1, keepdims=True)) @ val
        h = h + dense(a.transpose(0, 2, 1, 3).reshape(B, T, E), p + "/attn/c_proj")
        x = dense(ln(h, p + "/ln_2"), p + "/mlp/c_fc")
        x = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
        h = h + dense(x, p + "/mlp/c_proj")
    return ln(h, "model/ln_f") @ v["model/wte"].T


# --- the TensorFlow-written fixture ----------------------------------------------------------

def test_fixture_variables_as_tensorflow_wrote_them():
    tensors = read_tf_checkpoint(FIXTURE, verify=True)
    expected = release_names_and_shapes(HPARAMS)
    assert list(tensors) == sorted(expected)  # TF stores keys sorted
    for name, shape in expected.items():
        assert tensors[name].shape == shape, name
        assert tensors[name].dtype == np.float32, name
    assert list_tf_checkpoint(FIXTURE) == {n: ("float32", s) for n, s in expected.items()}


def test_fixture_values_give_tensorflows_logits():
    expected = np.load(FIXTURE / "expected_logits.npz")
    logits = numpy_gpt2_logits(read_tf_checkpoint(FIXTURE), expected["tokens"], HPARAMS)
    np.testing.assert_allclose(logits, expected["logits"], atol=2e-5, rtol=0)


def test_load_model_on_release_layout_matches_tensorflow_logits():
    torch = pytest.importorskip("torch")
    from gpt2.io.model_dir import load_model

    expected = np.load(FIXTURE / "expected_logits.npz")
    model = load_model(FIXTURE)
    assert model.config.n_vocab == HPARAMS["n_vocab"]
    with torch.no_grad():
        logits = model(torch.from_numpy(expected["tokens"]).long()).numpy()
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-5, rtol=0)


def test_fixture_encoder_is_consistent_with_hparams():
    encoder = json.loads((FIXTURE / "encoder.json").read_text(encoding="utf-8"))
    merges = (FIXTURE / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    assert len(encoder) == HPARAMS["n_vocab"] == 256 + len(merges) + 1
    assert encoder["<|endoftext|>"] == HPARAMS["n_vocab"] - 1
    assert sorted(encoder.values()) == list(range(len(encoder)))
    for line in merges:
        a, b = line.split(" ")
        assert a in encoder and b in encoder and a + b in encoder


def test_read_returns_views_of_the_data_file_not_copies():
    tensors = read_tf_checkpoint(FIXTURE)
    wte = tensors["model/wte"]
    assert not wte.flags.owndata and wte.flags.writeable  # copy-on-write map
    wte[0, 0] = 123.0  # must not reach the file
    assert read_tf_checkpoint(FIXTURE)["model/wte"][0, 0] != 123.0


# --- locating the checkpoint -----------------------------------------------------------------

def test_prefix_index_file_and_directory_resolve_the_same(tmp_path):
    prefix = FIXTURE / "model.ckpt"
    assert resolve_checkpoint_prefix(FIXTURE) == prefix
    assert resolve_checkpoint_prefix(prefix) == prefix
    assert resolve_checkpoint_prefix(FIXTURE / "model.ckpt.index") == prefix


def copy_fixture(tmp_path: Path) -> Path:
    d = tmp_path / "release"
    shutil.copytree(FIXTURE, d)
    return d


def test_checkpoint_file_with_another_machines_absolute_path(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "checkpoint").write_text('model_checkpoint_path: "/home/someone/gpt-2/models/117M/'
                                  'model.ckpt"\nall_model_checkpoint_paths: "/x/model.ckpt"\n')
    assert resolve_checkpoint_prefix(d) == d / "model.ckpt"


def test_checkpoint_file_with_absolute_and_relative_paths(tmp_path):
    d = copy_fixture(tmp_path)
    sub = d / "run"
    sub.mkdir()
    for suffix in (".index", ".data-00000-of-00001"):
        os.replace(d / f"model.ckpt{suffix}", sub / f"model-5{suffix}")
    (d / "checkpoint").write_text('model_checkpoint_path: "run/model-5"\n')
    assert resolve_checkpoint_prefix(d) == sub / "model-5"
    (d / "checkpoint").write_text(f'model_checkpoint_path: "{sub / "model-5"}"\n')
    assert resolve_checkpoint_prefix(d) == sub / "model-5"
    assert len(read_tf_checkpoint(d)) == len(release_names_and_shapes(HPARAMS))


def test_missing_checkpoint_file_falls_back_to_model_ckpt(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "checkpoint").unlink()
    assert resolve_checkpoint_prefix(d) == d / "model.ckpt"


def test_checkpoint_file_naming_a_missing_checkpoint(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "checkpoint").write_text('model_checkpoint_path: "model-1000"\n')
    with pytest.raises(UserError, match=r"checkpoint.*model-1000.*does not exist"):
        read_tf_checkpoint(d)


def test_directory_without_any_checkpoint(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        read_tf_checkpoint(tmp_path)


# --- corrupt inputs --------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 20, 47, 200, -1])
def test_truncated_index(tmp_path, keep):
    d = copy_fixture(tmp_path)
    index = d / "model.ckpt.index"
    data = index.read_bytes()
    index.write_bytes(data[:keep])
    with pytest.raises(UserError, match=r"model\.ckpt\.index"):
        read_tf_checkpoint(d)


def test_wrong_magic(tmp_path):
    d = copy_fixture(tmp_path)
    index = d / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    data[-1] ^= 0xFF
    index.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.ckpt\.index.*magic"):
        read_tf_checkpoint(d)


def test_flipped_byte_in_index_block_is_a_checksum_error(tmp_path):
    d = copy_fixture(tmp_path)
    index = d / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    data[30] ^= 0x01
    index.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.ckpt\.index.*(checksum|corrupt)"):
        read_tf_checkpoint(d)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_damage_to_the_index_is_a_user_error_or_harmless(tmp_path_factory, data):
    index = bytearray((FIXTURE / "model.ckpt.index").read_bytes())
    if data.draw(st.booleans()):
        index = index[:data.draw(st.integers(0, len(index) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            # Favour the footer and handles, which no checksum covers.
            pos = data.draw(st.one_of(st.integers(0, len(index) - 1),
                                      st.integers(len(index) - 48, len(index) - 1)))
            index[pos] ^= data.draw(st.integers(1, 255))
    d = tmp_path_factory.mktemp("fuzz")
    for f in FIXTURE.iterdir():
        if f.name != "model.ckpt.meta":
            shutil.copy(f, d)
    (d / "model.ckpt.index").write_bytes(bytes(index))
    try:
        tensors = read_tf_checkpoint(d)
    except UserError as e:
        assert "model.ckpt" in str(e) and "\n" not in str(e)
    else:  # only padding bytes were hit
        assert list(tensors) == sorted(release_names_and_shapes(HPARAMS))


def test_truncated_data_file(tmp_path):
    d = copy_fixture(tmp_path)
    data = d / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model\.ckpt\.data-00000-of-00001.*truncated"):
        read_tf_checkpoint(d)


def test_missing_data_shard(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(UserError, match=r"model\.ckpt\.data-00000-of-00001.*not found"):
        read_tf_checkpoint(d)


def test_corrupt_data_detected_only_when_verifying(tmp_path):
    d = copy_fixture(tmp_path)
    data = d / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"data-00000-of-00001.*checksum mismatch"):
        read_tf_checkpoint(d, verify=True)
    assert len(read_tf_checkpoint(d, verify=False)) == len(release_names_and_shapes(HPARAMS))


def raw_checkpoint(prefix: Path, entries: dict[str, bytes], data: bytes,
                   compression: int = 0) -> None:
    """Hand-built index (for cases our writer never produces)."""
    table = tf_format.TableWriter()
    table.add(b"", tf_format.encode_header(1))
    for name in sorted(entries):
        table.add(name.encode(), entries[name])
    index = bytearray(table.finish())
    if compression:
        # Mark the first data block compressed, with a checksum that matches the change.
        start, end = _first_block(bytes(index))
        index[end] = compression
        index[end + 1:end + 5] = struct.pack(
            "<I", crc32c_mask(crc32c(bytes(index[start:end + 1]))))
    (prefix.parent / (prefix.name + ".index")).write_bytes(bytes(index))
    (prefix.parent / (prefix.name + ".data-00000-of-00001")).write_bytes(data)


def _first_block(index: bytes) -> tuple[int, int]:
    """Start and end (trailer offset) of the first data block, from the index block."""
    footer = index[-48:]
    _, pos = tf_format.varint(footer, 0, 40)
    _, pos = tf_format.varint(footer, pos, 40)
    off, pos = tf_format.varint(footer, pos, 40)
    size, _ = tf_format.varint(footer, pos, 40)
    (_, handle), *_ = tf_format.block_entries(index[off:off + size])
    b_off, p = tf_format.varint(handle, 0, len(handle))
    b_size, _ = tf_format.varint(handle, p, len(handle))
    return b_off, b_off + b_size


def test_snappy_block_is_refused_clearly(tmp_path):
    entry = tf_format.encode_entry(1, (2,), 0, 8, crc32c(b"\0" * 8))
    raw_checkpoint(tmp_path / "model.ckpt", {"x": entry}, b"\0" * 8, compression=1)
    with pytest.raises(UserError, match=r"model\.ckpt\.index.*snappy"):
        read_tf_checkpoint(tmp_path)


def test_bfloat16_becomes_float32_and_strings_are_skipped(tmp_path):
    torch = pytest.importorskip("torch")
    bf16 = torch.tensor([1.0, -2.5, 3.14159, 1e30]).to(torch.bfloat16)  # an independent encoder
    raw = bf16.view(torch.int16).numpy().astype("<i2").tobytes()
    values = bf16.float().numpy()
    entries = {"bf": tf_format.encode_entry(14, (2, 2), 0, len(raw), crc32c(raw)),
               "_CHECKPOINTABLE_OBJECT_GRAPH": tf_format.encode_entry(7, (), 0, 0, 0)}
    raw_checkpoint(tmp_path / "model.ckpt", entries, raw)
    got = read_tf_checkpoint(tmp_path, verify=True)
    assert list(got) == ["bf"]
    assert got["bf"].dtype == np.float32
    np.testing.assert_array_equal(got["bf"], values.reshape(2, 2))


def test_size_disagreeing_with_shape_is_an_error(tmp_path):
    entries = {"x": tf_format.encode_entry(1, (3,), 0, 8, crc32c(b"\0" * 8))}
    raw_checkpoint(tmp_path / "model.ckpt", entries, b"\0" * 8)
    with pytest.raises(UserError, match=r"model\.ckpt\.index.*'x'.*shape"):
        read_tf_checkpoint(tmp_path)


# --- writing ---------------------------------------------------------------------------------

def test_round_trip_every_supported_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "model/wte": rng.normal(size=(50, 8)).astype(np.float32),
        "model/h0/attn/c_attn/w": rng.normal(size=(1, 8, 24)).astype(np.float32),
        "half": rng.normal(size=(3, 5)).astype(np.float16),
        "double": rng.normal(size=(2, 2)),
        "int32": np.arange(-5, 7, dtype=np.int32).reshape(3, 4),
        "int64": np.array([1, -(2 ** 40), 3], dtype=np.int64),
        "uint8": np.arange(10, dtype=np.uint8),
        "flags": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "transposed": rng.normal(size=(4, 6)).astype(np.float32).T,  # not C-contiguous
        "big_endian": np.arange(5, dtype=">i4"),
        "naïve/ünïcode": np.ones(2, dtype=np.float32),
        "big": rng.normal(size=(300, 1000)).astype(np.float32),  # vectorised crc path
    }
    prefix = write_tf_checkpoint(tmp_path / "model.ckpt", tensors)
    assert prefix == tmp_path / "model.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index"]  # no temp files
    got = read_tf_checkpoint(tmp_path, verify=True)
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype.newbyteorder("="), name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_rewriting_the_fixture_gives_tensorflows_exact_bytes(tmp_path):
    # Same tensor order, same table layout, same index-key shortening as TF's BundleWriter.
    write_tf_checkpoint(tmp_path / "model.ckpt", read_tf_checkpoint(FIXTURE))
    for name in ("model.ckpt.data-00000-of-00001", "model.ckpt.index", "checkpoint"):
        assert (tmp_path / name).read_bytes() == (FIXTURE / name).read_bytes(), name


def test_many_blocks_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(tf_format, "BLOCK_SIZE", 128)
    tensors = {f"model/h{i}/mlp/c_fc/b": np.full(3, i, np.float32) for i in range(300)}
    write_tf_checkpoint(tmp_path / "m", tensors)
    got = read_tf_checkpoint(tmp_path / "m")
    assert all(np.array_equal(got[n], v) for n, v in tensors.items()) and len(got) == 300


def test_state_file_points_at_the_new_prefix(tmp_path):
    write_tf_checkpoint(tmp_path / "model-1", {"a": np.zeros(1, np.float32)})
    write_tf_checkpoint(tmp_path / "model-2", {"a": np.ones(1, np.float32)})
    assert (tmp_path / "checkpoint").read_text().splitlines()[0] == \
        'model_checkpoint_path: "model-2"'
    assert read_tf_checkpoint(tmp_path)["a"][0] == 1.0


def test_unsupported_dtype_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="obj"):
        write_tf_checkpoint(tmp_path / "m", {"obj": np.array(["x"], dtype=object)})
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12),
    st.tuples(st.sampled_from(["float32", "float16", "int32", "int64"]),
              st.lists(st.integers(0, 5), max_size=3)),
    max_size=8))
def test_round_trip_property(tmp_path_factory, spec):
    rng = np.random.default_rng(0)
    tensors = {name: (rng.normal(size=shape) * 100).astype(dtype)
               for name, (dtype, shape) in spec.items()}
    d = tmp_path_factory.mktemp("rt")
    write_tf_checkpoint(d / "model.ckpt", tensors)
    got = read_tf_checkpoint(d, verify=True)
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        np.testing.assert_array_equal(got[name], want)


# --- crc32c ----------------------------------------------------------------------------------

def crc32c_reference(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_answers():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vectors
    assert crc32c(b"\xff" * 32) == 0x62A8AB43


@pytest.mark.parametrize("n", [1, 3, 15, 16, 255, 256, 1023, 4096, 65535, 65536 + 7, 300_001])
def test_crc32c_matches_bitwise_reference(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32c(data) == crc32c_reference(data)
    k = n // 3
    assert crc32c(data[k:], crc32c(data[:k])) == crc32c_reference(data)
