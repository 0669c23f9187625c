"""The sample scripts give the same output from each of the three model-directory layouts."""

from __future__ import annotations

import re
import shutil

import torch
import transformers

import gpt2
from gpt2.commands.sample import unconditional_main

RELEASE = "tests/fixtures/release-tiny"  # written by real TensorFlow (make_release_fixture.py)


def hf_directory(model: gpt2.GPT, encoder_dir, out):
    """A Hugging Face GPT-2 directory with the same weights, built with transformers itself."""
    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.n_vocab, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, activation_function="gelu_new"))
    conv = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
    state = {("transformer." + k): (v.t() if conv.fullmatch(k) else v)
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    hf.save_pretrained(out)
    shutil.copy(f"{encoder_dir}/encoder.json", out / "vocab.json")
    shutil.copy(f"{encoder_dir}/vocab.bpe", out / "merges.txt")
    return out


def test_three_layouts_sample_the_same(tmp_path, capsys):
    model = gpt2.load_model(RELEASE)
    ours = gpt2.save_model(model, tmp_path / "ours", encoder_dir=RELEASE)
    hf = hf_directory(model, RELEASE, tmp_path / "hf")
    tokens = torch.randint(0, model.config.n_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens)
        for d in (ours, hf):
            assert torch.equal(gpt2.load_model(d)(tokens), reference), d

    outputs = []
    for d in (RELEASE, ours, hf):
        argv = ["--model_dir", str(d), "--nsamples", "2", "--batch_size", "2", "--length", "10",
                "--seed", "1", "--top_k", "5"]
        assert unconditional_main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].count("SAMPLE") == 2
    assert outputs[0] == outputs[1] == outputs[2]
