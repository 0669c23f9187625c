"""Speculative decoding (gpt2.speculative): greedy output identical to plain decoding with
prompt lookup and with a draft model (single rows, and padded batches whose rows finish at
different steps), and sampling that keeps the model's distribution (Leviathan et al.'s rule),
tested statistically on the rule alone and end to end."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from gpt2.model import GPT, GPTConfig
from gpt2.sampling import decode
from gpt2.speculative import DraftModel, PromptLookup, accept, token_probs

# chi-square critical values at p = 0.001 by degrees of freedom (a correct sampler fails one
# in a thousand seeds; the seeds here are fixed, so a test either always passes or never)
CHI2_999 = {5: 20.52, 7: 24.32, 63: 103.4}


def target_and_draft(n_vocab: int = 96):
    torch.manual_seed(0)
    target = GPT(GPTConfig(n_vocab=n_vocab, n_ctx=128, n_embd=32, n_head=4, n_layer=2)).eval()
    torch.manual_seed(1)
    draft = GPT(GPTConfig(n_vocab=n_vocab, n_ctx=128, n_embd=16, n_head=2, n_layer=1)).eval()
    return target, draft


@pytest.mark.parametrize("kind", ["lookup", "draft", "self-draft"])
def test_greedy_tokens_are_those_of_plain_decoding(kind):
    target, draft = target_and_draft()
    speculator = {"lookup": PromptLookup(5), "draft": DraftModel(draft, 3),
                  "self-draft": DraftModel(target, 4)}[kind]  # (the last accepts everything)
    contexts = [[1, 2, 3, 1, 2, 3, 1, 2], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14]]

    def finished(row, ids):
        return len(ids) >= 8 + 7 * row

    assert decode(target, contexts, 40, temperature=0, finished=finished,
                  speculator=speculator) == decode(target, contexts, 40, temperature=0,
                                                   finished=finished)
    one = torch.tensor([contexts[0] * 3])
    assert decode(target, one, 60, temperature=0, speculator=speculator) == \
        decode(target, one, 60, temperature=0)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(tokens=3, max_ngram=2)
    assert lookup.propose([5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6], 10) == [1, 2, 5]  # latest "5 6"
    assert lookup.propose([5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6], 2) == [1, 2]     # the limit
    assert lookup.propose([1, 2, 3, 4], 10) == []                             # nothing matches
    assert lookup.propose([7, 3, 9, 4, 9], 10) == [4, 9]  # falls back to a 1-gram
    # in a repeating run the latest match has one token after it: an earlier one has more
    assert lookup.propose([1, 2, 5, 5, 5, 5, 5, 5], 10) == [5, 5, 5]
    with pytest.raises(ValueError):
        PromptLookup(tokens=0)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("draft", [True, False])
def test_the_rule_keeps_the_target_distribution(draft):
    """accept() with guesses drawn from q (a draft) or certain (prompt lookup): the first token
    it yields is distributed as p, whatever q is."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 6, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(1, 6, generator=g) * 1.5, -1)
    counts = torch.zeros(6)
    for _ in range(20000):
        guess = int(torch.multinomial(q[0], 1, generator=g)) if draft else 2
        n, token = accept([guess], p, q if draft else None, False, g)
        counts[guess if n == 1 else token] += 1
    assert chi_square(counts, p[0]) < CHI2_999[5]


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_sampled_pairs_have_the_models_distribution(kind):
    """The first two sampled tokens (the second a guess kept or replaced) of 4,000 rows
    decoded together (rows keep different numbers of guesses: their caches get holes) against
    the model's exact joint distribution, top-k and temperature applied."""
    target, draft = target_and_draft(n_vocab=8)
    context = [3, 1, 3, 1, 3]
    temperature, top_k = 0.8, 6
    with torch.inference_mode():
        first = token_probs(target(torch.tensor([context]))[0, -1], temperature, top_k, 1.0)
        pairs = torch.tensor([context + [a] for a in range(8)])
        second = token_probs(target(pairs)[:, -1], temperature, top_k, 1.0)
    joint = (first[:, None] * second).flatten()
    speculator = PromptLookup(3) if kind == "lookup" else DraftModel(draft, 3)
    # 3 tokens: the first comes from the prompt's logits, the second is a checked guess
    rows = decode(target, torch.tensor([context] * 4000), 3, temperature=temperature,
                  top_k=top_k, generator=torch.Generator().manual_seed(0),
                  speculator=speculator)
    counts = torch.zeros(64)
    for a, b, _ in rows:
        counts[a * 8 + b] += 1
    dof = int((joint > 0).sum()) - 1
    assert chi_square(counts, joint) < CHI2_999.get(dof, 1.4 * dof + 20), dof


def test_sampling_reproduces_with_a_seed():
    target, draft = target_and_draft()
    runs = [decode(target, torch.tensor([[1, 2, 3]]), 30, temperature=1.0, top_k=20,
                   generator=torch.Generator().manual_seed(5), speculator=DraftModel(draft, 3))
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0][0]) == 30
    assert list(itertools.chain(*runs[0])) != [runs[0][0][0]] * 30


@pytest.fixture
def model_dirs(gpt2_vocab_dir, tmp_path):
    from gpt2.io.model_dir import save_model
    from helpers import make_model

    big = save_model(make_model(GPTConfig(n_vocab=50257, n_ctx=64, n_embd=32, n_head=2,
                                          n_layer=2)), tmp_path / "big",
                     encoder_dir=gpt2_vocab_dir)
    small = save_model(make_model(GPTConfig(n_vocab=50257, n_ctx=64, n_embd=16, n_head=2,
                                            n_layer=1)), tmp_path / "small",
                       encoder_dir=gpt2_vocab_dir)
    return big, small


def test_generate_and_chat_take_prompt_lookup_and_a_draft(model_dirs, tmp_path, capsys):
    from gpt2.commands.generate import main

    big, small = model_dirs
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat"
    base = [str(big), "--prompt", prompt, "--length", "20", "--temperature", "0"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for extra in (["--prompt_lookup", "8"], ["--draft", str(small), "--draft_tokens", "3"]):
        assert main(base + extra) == 0
        assert capsys.readouterr().out == plain, extra
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi there, hi there"}]}\n')
    chat = [str(big), "--chat", "--prompts", str(chats), "--length", "12", "--temperature", "0"]
    assert main(chat) == 0
    plain = capsys.readouterr().out
    assert main(chat + ["--draft", str(small)]) == 0
    assert capsys.readouterr().out == plain


def test_bad_speculation_flags_are_one_line_errors(model_dirs, tmp_path):
    import sys

    import bounded
    from gpt2.commands.generate import main
    from gpt2.errors import UserError
    from gpt2.io.model_dir import save_model
    from gpt2.tokenizer.bpe import bytes_to_unicode
    from helpers import make_model

    big, small = model_dirs
    vocab = {c: i for i, c in enumerate(bytes_to_unicode()[b] for b in range(256))}
    vocab["<|endoftext|>"] = 256
    (tmp_path / "bytes").mkdir()
    (tmp_path / "bytes" / "encoder.json").write_text(json.dumps(vocab))
    (tmp_path / "bytes" / "vocab.bpe").write_text("#version: 0.2\n")
    other = save_model(make_model(GPTConfig(n_vocab=257, n_ctx=64, n_embd=16, n_head=2,
                                            n_layer=1)), tmp_path / "other",
                       encoder_dir=tmp_path / "bytes")
    for flags, message in ((["--draft", str(other)], "tokenizer or vocabulary differs"),
                           (["--prompt_lookup", "-1"], "--prompt_lookup must be"),
                           (["--draft", str(small), "--prompt_lookup", "3"], "choose one"),
                           (["--draft", str(small), "--draft_tokens", "0"], "--draft_tokens")):
        with pytest.raises(UserError, match=message):
            main([str(big), "--prompt", "hi", "--length", "4", *flags])
    # and as the command line shows it: one line, no traceback
    r = bounded.run([sys.executable, "-m", "gpt2", "generate", str(big), "--prompt", "hi",
                     "--length", "4", "--draft", str(other)], timeout=60)
    assert r.returncode != 0 and r.stderr.startswith("error: --draft "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_the_server_checks_guesses_for_all_rows_at_once():
    """The engine's continuous batching with prompt lookup and with a draft model: requests of different lengths
    and settings joining and leaving; greedy rows get exactly the plain engine's tokens, and
    sampled rows run (their distribution: the rule's tests above)."""
    from gpt2.serve.engine import Engine, Params
    from helpers import run_engine

    target, draft = target_and_draft()

    class Ids:
        eot_token, n_vocab = 0, 96

        def decode(self, ids):
            return " ".join(map(str, ids))

    def serve_all(speculator) -> list[list[int]]:
        choices = run_engine(Engine(target, Ids(), max_batch=3, speculator=speculator), [
            ([1 + i, 2, 3, 1 + i, 2, 3] * (1 + i % 2),
             Params(max_tokens=12 + 7 * i, temperature=0 if i % 3 else 0.9,
                    top_k=0 if i % 3 else 20, seed=i), torch.Generator().manual_seed(i))
            for i in range(6)])
        assert all(c.finished in ("stop", "length") for c in choices)
        return [c.ids for c in choices]

    plain = serve_all(None)
    greedy = [i for i in range(6) if i % 3]
    for speculator in (PromptLookup(6), DraftModel(draft, 3)):
        spec = serve_all(speculator)
        assert speculator.guessed > 0 and speculator.kept > 0
        assert [spec[i] for i in greedy] == [plain[i] for i in greedy], speculator
