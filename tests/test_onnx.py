"""ONNX export, run by ONNX Runtime: logits equal ours, a cached decode step equals the uncached
one, greedy decoding equals ours, and the tokenizer.json gives our ids in Hugging Face's
``tokenizers`` (what transformers.js reimplements)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_model

from gpt2.io.model_dir import load_model, save_model
from gpt2.model import GPTConfig
from gpt2.sampling import sample_sequence
from gpt2.tokenizer.files import load_encoder

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CONFIG = GPTConfig(n_vocab=50257, n_ctx=160, n_embd=64, n_head=4, n_layer=2)
TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnewlines", "naïve café déjà vu",
         "日本語のテキスト", "emoji 🤖🎉 and ZWJ 👩‍👩‍👧", "numbers 12345 67.89",
         "'s 't 're <|endoftext|>",
         "Ünïcödé ЖЖЖ Ελληνικά", "a" * 40, "   "]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gpt2_vocab_dir):
    from gpt2.cli import main

    root = tmp_path_factory.mktemp("onnx")
    save_model(make_model(CONFIG), root / "model", encoder_dir=gpt2_vocab_dir)
    assert main(["export", str(root / "model"), str(root / "out"), "--format", "onnx"]) == 0
    return root


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, ids, mask, positions, past):
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for i, (k, v) in enumerate(past):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
    logits, *flat = sess.run(None, feed)
    return logits, list(zip(flat[::2], flat[1::2]))


def empty(batch: int, dtype=np.float32):
    return [(np.zeros((batch, 4, 0, 16), dtype),) * 2 for _ in range(CONFIG.n_layer)]


def test_onnx_layout_is_optimums(exported):
    out = exported / "out"
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "onnx", "config.json", "generation_config.json", "tokenizer.json",
            "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert "model.safetensors" not in names
    assert (out / "onnx/model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert oct((out / "model.onnx").stat().st_mode & 0o777) == "0o644"
    sess = session(out / "model.onnx")
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes["input_ids"] == ["batch_size", "sequence_length"]
    assert shapes["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert shapes["position_ids"] == ["batch_size", "sequence_length"]
    assert shapes["past_key_values.1.value"] == ["batch_size", 4, "past_sequence_length", 16]
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert outs["logits"] == ["batch_size", "sequence_length", 50257]
    assert outs["present.1.key"] == ["batch_size", 4, "past_sequence_length + sequence_length", 16]
    assert [o.name for o in sess.get_outputs()] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"


def test_onnx_runtime_logits_cache_and_greedy_equal_ours(exported):
    model = load_model(exported / "model")
    sess = session(exported / "out/model.onnx")
    ids = np.random.default_rng(0).integers(0, 50257, (1, 64))
    logits, past = run(sess, ids, np.ones((1, 64), np.int64), np.arange(64)[None], empty(1))
    with torch.no_grad():
        ours = model(torch.from_numpy(ids)).numpy()
    assert np.abs(logits - ours).max() < 1e-4

    # one cached step (63 tokens, then the 64th) equals the uncached last row
    _, past63 = run(sess, ids[:, :63], np.ones((1, 63), np.int64), np.arange(63)[None], empty(1))
    step, grown = run(sess, ids[:, 63:], np.ones((1, 64), np.int64), np.array([[63]]), past63)
    assert np.abs(step[0, -1] - logits[0, -1]).max() < 1e-5
    assert all(np.allclose(a, b, atol=1e-6) for (a, _), (b, _) in zip(grown, past))

    # greedy decoding of 64 tokens, token by token through the cache, equals ours
    prompt = ids[:, :16]
    logits, past = run(sess, prompt, np.ones((1, 16), np.int64), np.arange(16)[None], empty(1))
    out = []
    for t in range(64):
        out.append(int(logits[0, -1].argmax()))
        n = 16 + t
        logits, past = run(sess, np.array([[out[-1]]]), np.ones((1, n + 1), np.int64),
                           np.array([[n]]), past)
    ours = sample_sequence(model, 64, torch.from_numpy(prompt), top_k=1)[0, 16:].tolist()
    assert out == ours


def test_onnx_left_padded_batch_equals_each_row_alone(exported):
    """attention_mask and position_ids as transformers.js and Optimum's generate pass them."""
    sess = session(exported / "out/model.onnx")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 50257, 10), rng.integers(0, 50257, 6)
    ids = np.stack([a, np.concatenate([np.full(4, 50256), b])])
    mask = np.stack([np.ones(10, np.int64), np.r_[np.zeros(4, np.int64), np.ones(6, np.int64)]])
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    batch, _ = run(sess, ids, mask, positions, empty(2))
    alone, _ = run(sess, b[None], np.ones((1, 6), np.int64), np.arange(6)[None], empty(1))
    assert np.abs(batch[1, 4:] - alone[0]).max() < 1e-4


def test_onnx_fp16_runs_in_onnx_runtime(exported, tmp_path):
    from gpt2.cli import main

    assert main(["export", str(exported / "model"), str(tmp_path / "h"), "--format", "onnx",
                 "--fp16"]) == 0
    assert (tmp_path / "h/onnx/model_fp16.onnx").read_bytes() == \
        (tmp_path / "h/model.onnx").read_bytes()
    sess = session(tmp_path / "h/model.onnx")
    ids = np.random.default_rng(2).integers(0, 50257, (1, 32))
    logits, _ = run(sess, ids, np.ones((1, 32), np.int64), np.arange(32)[None],
                    empty(1, np.float16))
    with torch.no_grad():
        ours = load_model(exported / "model")(torch.from_numpy(ids)).numpy()
    assert logits.dtype == np.float16
    assert (logits.astype(np.float32).argmax(-1) == ours.argmax(-1)).mean() >= 0.9
    assert np.abs(logits.astype(np.float32) - ours).max() < 0.05


def test_tokenizer_json_gives_our_ids_in_hugging_face_tokenizers(exported):
    tokenizers = pytest.importorskip("tokenizers")
    theirs = tokenizers.Tokenizer.from_file(str(exported / "out/tokenizer.json"))
    enc = load_encoder(exported / "model")
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False).ids == enc.encode(text), text
        assert theirs.decode(enc.encode(text), skip_special_tokens=False) == text


TRANSFORMERS_JS = "@huggingface/transformers@4.3.2"
GENERATE_JS = """
import { AutoTokenizer, AutoModelForCausalLM, env } from "@huggingface/transformers";
env.localModelPath = process.argv[2]; env.allowRemoteModels = false;
const tok = await AutoTokenizer.from_pretrained(process.argv[3]);
const model = await AutoModelForCausalLM.from_pretrained(process.argv[3], { dtype: "fp32" });
const inputs = tok(process.argv[4]);
const out = await model.generate({ ...inputs, max_new_tokens: 32, do_sample: false });
console.log(JSON.stringify(Array.from(out.tolist()[0]).map(Number)));
"""


@pytest.mark.slow
def test_transformers_js_loads_the_export_and_decodes_as_we_do(exported):
    """transformers.js (npm, on onnxruntime-node) tokenizes with tokenizer.json, runs
    onnx/model.onnx with its cache and greedy-decodes exactly our tokens."""
    import shutil

    import bounded
    from gpt2_vocab import CACHE

    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("needs Node.js and npm")
    js = CACHE / "transformers-js"
    if not (js / "node_modules/@huggingface/transformers").is_dir():
        js.mkdir(parents=True, exist_ok=True)
        # onnxruntime-node's install script fetches GPU extras from nuget; its CPU binaries
        # are in the npm package itself
        r = bounded.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts",
                         "--prefix", str(js), TRANSFORMERS_JS], timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    (js / "generate.mjs").write_text(GENERATE_JS)
    text = "Hello world, naïve café 🤖"
    r = bounded.run(["node", str(js / "generate.mjs"), str(exported) + "/", "out", text],
                    timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    model = load_model(exported / "model")
    ids = load_encoder(exported / "model").encode(text)
    ours = sample_sequence(model, 32, torch.tensor([ids]), top_k=1)[0].tolist()
    assert theirs == ours
