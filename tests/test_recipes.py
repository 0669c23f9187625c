"""recipes/: the GPT-2 124M reproduction (llm.c's hyperparameters) parses and validates, and
its CPU-sized twin, which differs only in sizes, runs end to end on parquet shards in
FineWeb's format: encode to .bin shards, train from scratch, validation and HellaSwag."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_tasks import write_rows

from gpt2.cli import main
from gpt2.training.config import parse_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FULL, TWIN = RECIPES / "gpt2-124M-fineweb.yaml", RECIPES / "gpt2-124M-fineweb-cpu.yaml"
# What the twin may change: how big and how long, never how it trains.
SIZES = {"model_dir", "run_name", "warmup_steps", "max_steps", "batch_size", "precision",
         "compile", "val_every", "val_batch_size", "val_batch_count", "eval_every",
         "sample_every", "sample_length", "save_every", "print_every"}


def yaml_of(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_the_recipe_is_llm_c_s_and_the_twin_differs_only_in_sizes(tmp_path, monkeypatch):
    full, twin = yaml_of(FULL), yaml_of(TWIN)
    assert full.keys() == twin.keys()
    assert {k for k in full if full[k] != twin[k]} <= SIZES
    # llm.c's scripts/run_gpt2_124M.sh, flag by flag
    assert (full["learning_rate"], full["min_lr_fraction"], full["warmup_steps"],
            full["weight_decay"], full["adam_beta2"], full["grad_clip"]) == \
        (0.0006, 0.0, 700, 0.1, 0.95, 1.0)
    assert full["batch_size"] * 1024 * 8 * full["accumulate_gradients"] == 524288  # -d, 8 GPUs
    assert full["max_steps"] == 18865 and full["val_every"] == full["eval_every"] == 250
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    write_rows(Path("data/hellaswag_val.jsonl"), 2)
    stand_in_for_the_download(Path("data/hellaswag_val.jsonl"), monkeypatch)
    for path in (FULL, TWIN):
        cfg = parse_config(["--config", str(path)])
        cfg.validate()  # every value passes the flags' checks
        assert cfg.lr_schedule == "cosine" and cfg.init == "fresh"


def stand_in_for_the_download(path: Path, monkeypatch) -> None:
    """``path`` (where `gpt2 download --dataset hellaswag` puts the file) is taken for the
    published file: commands refuse anything else there."""
    import dataclasses
    import hashlib

    from gpt2.tasks import TASKS, DataFile

    data = path.read_bytes()
    monkeypatch.setitem(TASKS, "hellaswag", dataclasses.replace(TASKS["hellaswag"], data=DataFile(
        TASKS["hellaswag"].data.url, path.name, len(data), hashlib.sha256(data).hexdigest())))


def write_fineweb_shards(folder: Path, shards: int = 3) -> None:
    """Parquet files with FineWeb's columns (text, id, dump, url, ...), text of our own."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)[:60]]
    folder.mkdir(parents=True)
    per = len(docs) // shards
    for s in range(shards):
        part = docs[s * per:(s + 1) * per]
        pq.write_table(pa.table({
            "text": part, "id": [f"<urn:uuid:{s}-{i}>" for i in range(len(part))],
            "dump": ["CC-MAIN-2024-10"] * len(part),
            "url": [f"https://example.org/{s}/{i}" for i in range(len(part))],
            "date": ["2024-02-21T00:00:00Z"] * len(part),
            "file_path": ["s3://commoncrawl/x.warc.gz"] * len(part),
            "language": ["en"] * len(part), "language_score": [0.9] * len(part),
            "token_count": [len(t) // 4 for t in part]}), folder / f"{s:03d}_00000.parquet")


def test_the_cpu_twin_runs_end_to_end_on_fineweb_parquet(tmp_path, gpt2_vocab_dir, monkeypatch,
                                                         capsys):
    pytest.importorskip("pyarrow")
    monkeypatch.chdir(tmp_path)
    model = Path("models/fineweb-cpu")
    model.mkdir(parents=True)
    (model / "hparams.json").write_text(json.dumps(
        {"n_vocab": 50257, "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 2}))
    for f in ("encoder.json", "vocab.bpe"):
        shutil.copy(gpt2_vocab_dir / f, model / f)
    write_fineweb_shards(Path("fineweb/sample/10BT"))
    assert main(["encode", "fineweb/sample/10BT/*.parquet", "data/fineweb10B/",
                 "--model_dir", str(model), "--shard_tokens", "20000", "--workers", "1",
                 "--quiet"]) == 0
    write_rows(Path("data/hellaswag_val.jsonl"), 8)
    stand_in_for_the_download(Path("data/hellaswag_val.jsonl"), monkeypatch)
    capsys.readouterr()
    assert main(["train", "--config", str(TWIN)]) == 0
    out = capsys.readouterr().out
    assert "validation: holding out the last 1 of" in out
    rows = [json.loads(line) for line in
            open("checkpoint/gpt2-124M-fineweb-cpu/metrics.jsonl")]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 4, 8]
    assert [r["step"] for r in rows if "hellaswag_acc_norm" in r] == [0, 4, 8]
    assert rows[-1]["step"] == 8 and rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert rows[2]["lr"] == pytest.approx(0.0006)  # warm-up done at step 2
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert Path("checkpoint/gpt2-124M-fineweb-cpu/model-8/model.safetensors").is_file()
