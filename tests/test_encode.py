"""gpt2 encode / encode.py: .npz (original layout) and .bin outputs, errors, up-to-date skip."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2.commands import encode as E
from gpt2.errors import UserError
from test_dataset import EOT, joined, ref  # noqa: F401  (ref is a fixture)
from bounded import run

REPO = Path(__file__).resolve().parents[1]
DOCS = {"one.txt": "First document.\nIt has two lines.\n",
        "sub/two.txt": "Second: ünïcödé, 漢字 and  spaces\n",
        "sub/three.jsonl": json.dumps({"text": "third as a record"}) + "\n"}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "in"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def doc_texts():
    out = []
    for name in sorted(DOCS):
        out.append(json.loads(DOCS[name])["text"] if name.endswith(".jsonl") else DOCS[name])
    return out


def original_loader(path) -> list[np.ndarray]:
    # How the original load_dataset read an .npz: every array, in npz.files order.
    chunks = []
    with np.load(path) as npz:
        for item in npz.files:
            chunks.append(npz[item])
    return chunks


def run_cli(*args, cwd=REPO, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    return run([sys.executable, *args], cwd=cwd, env=env, timeout=120)


def test_npz_original_layout(corpus, tmp_path, gpt2_vocab_dir, ref):  # noqa: F811
    out = tmp_path / "out.npz"
    assert E.main(["--model_dir", str(gpt2_vocab_dir), "--quiet", str(corpus), str(out)]) == 0
    with np.load(out) as npz:
        assert npz.files == ["arr_0"]
    chunks = original_loader(out)
    assert chunks[0].ndim == 1 and chunks[0].dtype.kind == "i"
    assert chunks[0].tolist() == joined(ref, doc_texts())
    assert not [p for p in tmp_path.iterdir() if p.name != "in" and p != out]  # no temp files

    E.main(["--model_dir", str(gpt2_vocab_dir), "--combine", "0", "--quiet",
            str(corpus / "**" / "*.txt"), str(out)])
    texts = [DOCS["one.txt"], DOCS["sub/two.txt"]]
    assert [c.tolist() for c in original_loader(out)] == [ref.encode_ordinary(t) for t in texts]


def test_bin_index_and_up_to_date(corpus, tmp_path, gpt2_vocab_dir, ref, capsys):  # noqa: F811
    from gpt2.tokenizer import encoder_fingerprint

    out = tmp_path / "out.bin"
    args = ["--model_dir", str(gpt2_vocab_dir), "--workers", "2", str(corpus), str(out)]
    assert E.main(args) == 0
    index = json.loads((tmp_path / "out.bin.json").read_text())
    assert np.fromfile(out, dtype=index["dtype"]).tolist() == joined(ref, doc_texts())
    assert index["dtype"] == "uint16" and index["eot_token"] == EOT
    assert index["n_documents"] == 3 and index["n_chunks"] == 1
    assert index["encoder_fingerprint"] == encoder_fingerprint(gpt2_vocab_dir)
    assert [Path(s["path"]).name for s in index["sources"]] == ["one.txt", "three.jsonl", "two.txt"]
    assert all(s["size"] > 0 for s in index["sources"])

    mtime = out.stat().st_mtime_ns
    capsys.readouterr()
    E.main(args)
    assert "up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == mtime
    (corpus / "one.txt").write_text("changed")
    E.main(args)
    assert "up to date" not in capsys.readouterr().out
    assert np.fromfile(out, dtype=np.uint16)[:1].tolist() == ref.encode_ordinary("changed")
    E.main(args + ["--combine", "0"])  # other settings: redone too
    assert json.loads((tmp_path / "out.bin.json").read_text())["n_chunks"] == 3


def test_user_errors(tmp_path, corpus, gpt2_vocab_dir):
    base = ["--model_dir", str(gpt2_vocab_dir), "--quiet"]
    with pytest.raises(UserError, match="must end in .npz or .bin"):
        E.main(base + [str(corpus), str(tmp_path / "out.txt")])
    with pytest.raises(UserError, match="matches no files"):
        E.main(base + [str(tmp_path / "nope*.txt"), str(tmp_path / "o.bin")])
    with pytest.raises(UserError, match="model directory .* does not exist"):
        E.main(["--model_dir", str(tmp_path / "none"), str(corpus), str(tmp_path / "o.bin")])
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="bad.txt: byte 0 is not valid utf-8"):
        E.main(base + [str(tmp_path / "bad.txt"), str(tmp_path / "o.bin")])
    assert not list(tmp_path.glob("o.bin*"))  # nothing half-written left behind


def test_cli_subprocess_one_line_error_and_flat_script(tmp_path, corpus, gpt2_vocab_dir, ref):  # noqa: F811
    r = run_cli("-m", "gpt2", "encode", "--model_dir", str(gpt2_vocab_dir),
                str(tmp_path / "missing*.txt"), str(tmp_path / "x.npz"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")

    (tmp_path / "x.npz").write_bytes(b"garbage")
    r = run_cli("-m", "gpt2", "encode", "--model_dir", str(gpt2_vocab_dir), str(tmp_path / "x.npz"),
                str(tmp_path / "y.bin"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "x.npz" in r.stderr

    # The flat script of the original layout.
    r = run_cli("encode.py", "--model_dir", str(gpt2_vocab_dir), str(corpus / "one.txt"),
                str(tmp_path / "one.npz"))
    assert r.returncode == 0, r.stderr
    assert original_loader(tmp_path / "one.npz")[0].tolist() == ref.encode_ordinary(DOCS["one.txt"])


def test_npz_input_passes_through(tmp_path, gpt2_vocab_dir):
    np.savez_compressed(tmp_path / "a.npz", np.arange(100), np.arange(7))
    E.main(["--model_dir", str(gpt2_vocab_dir), "--quiet", str(tmp_path / "a.npz"),
            str(tmp_path / "b.bin")])
    from gpt2.data.dataset import load_dataset

    chunks = load_dataset(tmp_path / "b.bin", None, quiet=True)
    assert [c.tolist() for c in chunks] == [list(range(100)), list(range(7))]
    np.savez_compressed(tmp_path / "big.npz", np.array([60000]))
    with pytest.raises(UserError, match="token id 60000"):
        E.main(["--model_dir", str(gpt2_vocab_dir), "--quiet", str(tmp_path / "big.npz"),
                str(tmp_path / "c.bin")])


def test_output_inside_input_directory_is_not_an_input(corpus, gpt2_vocab_dir, capsys):
    args = ["--model_dir", str(gpt2_vocab_dir), str(corpus), str(corpus / "all.bin")]
    E.main(args)
    first = np.fromfile(corpus / "all.bin", dtype=np.uint16)
    E.main(args)
    assert "up to date" in capsys.readouterr().out
    E.main(args + ["--force"])
    assert np.array_equal(np.fromfile(corpus / "all.bin", dtype=np.uint16), first)
