"""gpt2.lm_eval.GPT2LM answers lm-evaluation-harness's requests as transformers computes them
on our export of the same weights (the harness end to end: tests/test_tasks.py, slow)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_model
from test_tasks import CTXS, hf_greedy

from gpt2.cli import main
from gpt2.io.hf import export_huggingface
from gpt2.io.model_dir import save_model
from gpt2.model import GPTConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, gpt2_vocab_dir):
    tmp = tmp_path_factory.mktemp("lm_eval")
    model = make_model(GPTConfig(n_vocab=50257, n_ctx=32, n_embd=32, n_head=2, n_layer=2))
    with torch.no_grad():
        model.wte.weight.mul_(4)
    save_model(model, tmp / "model", encoder_dir=gpt2_vocab_dir)
    export_huggingface(model, tmp / "hf", encoder_dir=gpt2_vocab_dir)
    return tmp / "model", transformers.GPT2LMHeadModel.from_pretrained(tmp / "hf").eval()


def requests(*args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="x", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_requests_are_answered_as_transformers_computes_them(dirs):
    from gpt2.lm_eval import GPT2LM
    from gpt2.tokenizer.files import load_encoder

    model_dir, hf = dirs
    enc = load_encoder(model_dir)
    lm = GPT2LM(str(model_dir), batch_size=3)

    # generate_until: greedy, rows of different lengths batched on one cache, cut at `until`
    until = {"until": [".", "\n"], "max_gen_toks": 10, "do_sample": False}
    got = lm.generate_until(requests(*[(c, until) for c in CTXS]), disable_tqdm=True)
    assert got == [hf_greedy(hf, enc, c, 10, [".", "\n", "<|endoftext|>"]) for c in CTXS]

    # loglikelihood_rolling: every token once, windows of n_ctx from <|endoftext|>
    text = " ".join(CTXS)  # ~90 tokens: three windows of 32
    ids = [50256] + enc.encode(text)
    want = 0.0
    for start in range(0, len(ids) - 1, 32):
        end = min(start + 32, len(ids) - 1)
        first = max(end - 32, 0)
        with torch.no_grad():
            logits = hf(torch.tensor([ids[first:end]])).logits[0]
        logprobs = F.log_softmax(logits, -1)
        for pos in range(start, end):
            want += float(logprobs[pos - first, ids[pos + 1]])
    (rolled,) = lm.loglikelihood_rolling(requests((text,)), disable_tqdm=True)
    assert rolled == pytest.approx(want, rel=1e-5)

    # loglikelihood: an empty context starts from <|endoftext|>; trailing spaces move over
    (empty, spaced) = lm.loglikelihood(requests(("", " A man"), ("A man is ", "sitting")),
                                       disable_tqdm=True)
    with torch.no_grad():
        lp = F.log_softmax(hf(torch.tensor([[50256] + enc.encode(" A man")])).logits[0], -1)
    want = sum(float(lp[i, t]) for i, t in enumerate(enc.encode(" A man")))
    assert empty[0] == pytest.approx(want, rel=1e-5)
    whole, ctx = enc.encode("A man is sitting"), enc.encode("A man is")
    with torch.no_grad():
        lp = F.log_softmax(hf(torch.tensor([whole])).logits[0], -1)
    cont = whole[len(ctx):]
    assert spaced[0] == pytest.approx(sum(float(lp[len(ctx) - 1 + i, t])
                                          for i, t in enumerate(cont)), rel=1e-5)
    assert spaced[1] == all(int(lp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))


def test_lm_eval_without_the_harness_is_one_line(dirs, capsys, monkeypatch):
    model_dir, _ = dirs
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    assert main(["lm-eval", str(model_dir), "--tasks", "x"]) == 1
    assert capsys.readouterr().err.strip() == ("error: gpt2 lm-eval needs lm-evaluation-harness: "
                                               "pip install 'gpt2[eval]'")
