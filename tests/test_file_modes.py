"""Every file we write is readable by others: mode 0644 under umask 022 (mkstemp alone gives
0600, which made a model directory saved by one user unreadable to a colleague)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gpt2.commands.encode import main as encode_main
from gpt2.commands.export import main as export_main
from gpt2.commands.generate import main as generate_main
from gpt2.commands.train import main as train_main
from gpt2.files.atomic import WriteError, atomic_write, write_error, write_text
from gpt2.tokenizer.train import train_tokenizer
from test_train import args, make_model_dir, synthetic_text


@pytest.fixture(autouse=True)
def umask_022(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_shared(root: Path) -> None:
    found = modes(root)
    assert found, f"nothing written under {root}"
    bad = {name: oct(mode) for name, mode in found.items() if mode != 0o644}
    assert not bad, bad


def test_the_atomic_helpers_give_the_umask_mode(tmp_path):
    write_text(tmp_path / "a.txt", "x")
    atomic_write(tmp_path / "b.bin", lambda p: p.write_bytes(b"x"))
    os.umask(0o077)
    write_text(tmp_path / "private.txt", "x")
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    os.umask(0o022)
    shared = {n: m for n, m in modes(tmp_path).items() if n != "private.txt"}
    assert set(shared.values()) == {0o644}


def test_a_write_error_names_the_target_only_when_it_is_about_the_target(tmp_path):
    """An error writing the target, its temporary name, a file inside it or a directory made
    on the way names the target; one about another file (a source that cannot be read) is
    left as it is, not blamed on where the output goes."""
    import errno

    out = tmp_path / "out" / "model"
    about = [None, out, tmp_path / "out" / ".model.tmp-12-0a1b2c3d" / "model.safetensors",
             out / "hparams.json", tmp_path / "out", tmp_path]
    for name in about:
        error = write_error(PermissionError(errno.EACCES, "Permission denied", name), out)
        assert isinstance(error, WriteError) and error.path == out, name
        assert "permission denied" in str(error)
    for name in (tmp_path / "models" / "124M" / "model.ckpt", tmp_path / "out" / "model2",
                 tmp_path / "out" / ".other.tmp-12-0a1b2c3d"):
        assert write_error(PermissionError(errno.EACCES, "Permission denied", name), out) is None
    full = OSError(errno.ENOSPC, "No space left on device")  # (a write to an open file)
    assert write_error(full, out).no_space


def test_training_encoding_export_and_generation_write_shared_files(tmp_path):
    model_dir = make_model_dir(tmp_path / "tiny")
    os.chmod(model_dir / "encoder.json", 0o644)
    data = tmp_path / "data.txt"
    data.write_text(synthetic_text(3000))
    assert train_main(args(data, model_dir, max_steps=2, save_every=1, sample_every=2,
                           sample_length=4, val_every=1, val_batch_count=1)) == 0
    assert_shared(tmp_path / "checkpoint")
    assert_shared(tmp_path / "samples")
    assert_shared(tmp_path / "cache")
    for out in ("enc/data.bin", "enc/data.npz"):
        assert encode_main(["--model_dir", str(model_dir), "--quiet", str(data), out]) == 0
    assert_shared(tmp_path / "enc")
    run = str(tmp_path / "checkpoint/run1")
    assert export_main([run, "hf"]) == 0
    assert export_main([run, "tf", "--format", "release"]) == 0
    assert_shared(tmp_path / "hf")
    assert_shared(tmp_path / "tf")
    assert generate_main([run, "--length", "3", "--seed", "0", "--out", "gen/out.jsonl"]) == 0
    assert_shared(tmp_path / "gen")
    train_tokenizer([str(data)], 300, tmp_path / "tok", quiet=True)
    assert_shared(tmp_path / "tok")
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "checkpoint").rglob("*")
            if p.is_dir()} | {stat.S_IMODE((tmp_path / "hf").stat().st_mode)}
    assert dirs == {0o755}
