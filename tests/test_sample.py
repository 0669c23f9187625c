"""Sampling: the KV-cached loop against full recompute, the filters against hand-computed and
pure-Python references, seeding, stopping at <|endoftext|>, and both sample scripts end to end."""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gpt2.model import GPT, GPTConfig
from gpt2.sampling import Decoder, next_token, sample_sequence, top_k_logits, top_p_logits
from gpt2.commands.sample import interactive_main, unconditional_main
from bounded import run

REPO = Path(__file__).resolve().parents[1]
BANNER = "=" * 40 + " SAMPLE {} " + "=" * 40
PROMPT = "Model prompt >>> "


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads that
    # wait for each other make small batched matmuls ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model(tiny_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


def _context(config: GPTConfig, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(config.n_vocab, (batch, length), generator=g)


# --- the sampling loop -----------------------------------------------------------------------

def test_kv_cache_equals_full_recompute(model):
    context = _context(model.config, batch=3, length=5)
    length = 20
    cached = sample_sequence(model, length, context, temperature=0)
    assert cached.shape == (3, 5 + length)
    assert torch.equal(cached[:, :5], context)

    # Reference: no cache, the whole sequence re-run for every new token.
    seq = context.clone()
    with torch.no_grad():
        for _ in range(length):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)

    # The logits the cached loop sees, step by step, equal those of one full pass.
    with torch.no_grad():
        full = model(cached)[:, 4:-1]
        logits, past = model(context, use_cache=True)
        steps = [logits[:, -1]]
        for t in range(5, 5 + length - 1):
            logits, past = model(cached[:, t:t + 1], past=past, use_cache=True)
            steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=0)


def test_same_seed_same_samples_different_seed_different(model):
    context = _context(model.config, batch=2, length=3)
    a = sample_sequence(model, 20, context, seed=123)
    b = sample_sequence(model, 20, context, seed=123)
    c = sample_sequence(model, 20, context, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 3:], c[:, 3:])
    # One generator carried across calls keeps drawing new numbers.
    g = torch.Generator().manual_seed(123)
    first = sample_sequence(model, 20, context, generator=g)
    assert torch.equal(first, a)
    assert not torch.equal(sample_sequence(model, 20, context, generator=g), a)


def test_greedy_settings_agree(model):
    context = _context(model.config, batch=2, length=4)
    greedy = sample_sequence(model, 12, context, temperature=0)
    # temperature 0 is greedy whatever the other filters say; top_k=1 is greedy at any temperature
    assert torch.equal(sample_sequence(model, 12, context, temperature=0, top_k=5, top_p=0.5,
                                       seed=3), greedy)
    assert torch.equal(sample_sequence(model, 12, context, temperature=1.7, top_k=1, seed=3),
                       greedy)
    # top_p=0 is no nucleus filter, as 1 is (nshepperd's and train.py's meaning), not greedy
    assert torch.equal(sample_sequence(model, 12, context, top_p=0.0, seed=3),
                       sample_sequence(model, 12, context, top_p=1.0, seed=3))


def test_sampled_tokens_respect_top_k(model):
    context = _context(model.config, batch=1, length=4).expand(400, -1)
    with torch.no_grad():
        allowed = set(model(context[:1])[0, -1].topk(3).indices.tolist())
    drawn = sample_sequence(model, 1, context, top_k=3, temperature=5.0, seed=0)[:, -1]
    assert set(drawn.tolist()) == allowed  # 400 draws at a high temperature hit all three


def test_too_long_is_refused(model):
    n_ctx = model.config.n_ctx
    # The last sampled token is never fed back: 1 + n_ctx fits, as in the original.
    out = sample_sequence(model, n_ctx, _context(model.config, 1, 1), temperature=0)
    assert out.shape == (1, n_ctx + 1)
    with pytest.raises(ValueError, match=rf"context of 10 tokens \+ length {n_ctx - 8} exceeds "
                                         rf"the model's n_ctx {n_ctx}"):
        sample_sequence(model, n_ctx - 8, _context(model.config, 1, 10))
    sample_sequence(model, n_ctx - 9, _context(model.config, 1, 10))  # fits exactly


def test_length_zero_and_bad_arguments(model):
    context = _context(model.config, 2, 3)
    assert torch.equal(sample_sequence(model, 0, context), context)
    for kwargs in ({"temperature": -1}, {"top_k": -1}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            sample_sequence(model, 2, context, **kwargs)
    with pytest.raises(ValueError, match="context must be"):
        sample_sequence(model, 2, torch.zeros(2, 0, dtype=torch.long))


def test_training_mode_is_restored(tiny_config):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**tiny_config.to_dict(), "dropout": 0.5})).train()
    context = _context(m.config, 1, 3)
    # Dropout is off while sampling, so greedy sampling is deterministic.
    assert torch.equal(sample_sequence(m, 8, context, temperature=0),
                       sample_sequence(m, 8, context, temperature=0))
    assert m.training


class Counter(nn.Module):
    """A fake model that always predicts (last token + 1) mod V, and counts its calls."""

    def __init__(self, n_vocab: int = 50, n_ctx: int = 64):
        super().__init__()
        self.config = GPTConfig(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=4, n_head=1, n_layer=1)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, tokens, past=None, use_cache=False, last_only=False):
        self.calls += 1
        tokens = tokens[:, -1:] if last_only else tokens
        logits = 10.0 * nn.functional.one_hot((tokens + 1) % self.config.n_vocab,
                                              self.config.n_vocab).float()
        return (logits, past) if use_cache else logits


def test_stop_at_eot_per_row():
    fake = Counter()
    eot = 40
    context = torch.tensor([[37], [10]])  # row 0 reaches eot after 3 tokens, row 1 never does
    out = sample_sequence(fake, 8, context, temperature=0, stop_at_eot=True, eot_token=eot)
    assert out.tolist() == [[37, 38, 39, 40, 40, 40, 40, 40, 40],
                            [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    # Without stop_at_eot nothing stops (the original's behaviour).
    out = sample_sequence(fake, 5, context, temperature=0, eot_token=eot)
    assert out[0].tolist() == [37, 38, 39, 40, 41, 42]


def test_stop_at_eot_ends_early_when_all_rows_stopped():
    fake = Counter()
    context = torch.tensor([[38], [39]])
    out = sample_sequence(fake, 30, context, temperature=0, stop_at_eot=True, eot_token=40)
    assert out.shape == (2, 31)  # padded with eot to the full length
    assert out.tolist() == [[38, 39] + [40] * 29, [39] + [40] * 30]
    assert fake.calls == 2  # the context, then token 39 of row 0; then both rows had stopped


# --- the filters -----------------------------------------------------------------------------

def test_top_k_keeps_exactly_k_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    out = top_k_logits(logits, 2)
    assert (out.isfinite().sum(-1) == 2).all()
    assert set(out[0][out[0].isfinite()].tolist()) == {3.0}
    kept = out.isfinite()
    assert torch.equal(out[kept], logits[kept])  # kept logits are unchanged
    assert torch.equal(top_k_logits(logits, 0), logits)
    assert torch.equal(top_k_logits(logits, 5), logits)


def test_top_k_against_python_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 30, generator=g)
    for k in (1, 3, 29):
        out = top_k_logits(logits, k)
        for row, row_out in zip(logits.tolist(), out):
            best = sorted(range(len(row)), key=lambda i: -row[i])[:k]
            assert set(row_out.isfinite().nonzero().flatten().tolist()) == set(best)


def test_top_p_hand_computed():
    probs = [0.1, 0.4, 0.2, 0.3]  # sorted: 0.4 (1), 0.3 (3), 0.2 (2), 0.1 (0)
    logits = torch.tensor([probs]).log() + 7.0  # any shift: only the softmax matters
    cases = {0.35: {1}, 0.75: {1, 3}, 0.95: {1, 3, 2}, 0.01: {1}, 0.0: {0, 1, 2, 3}}
    for p, expected in cases.items():
        out = top_p_logits(logits, p)[0]
        assert set(out.isfinite().nonzero().flatten().tolist()) == expected, p
        kept = out.isfinite()
        assert torch.equal(out[kept], logits[0][kept])
    assert torch.equal(top_p_logits(logits, 1.0), logits)
    assert torch.equal(top_p_logits(logits, 0.0), logits)  # 0, like 1: no filter


def test_top_p_against_python_reference():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(50, 20, generator=g, dtype=torch.float64)
    for p in (0.3, 0.6, 0.9):
        out = top_p_logits(logits, p)
        for row, row_out in zip(logits.tolist(), out):
            z = sum(math.exp(x) for x in row)
            order = sorted(range(len(row)), key=lambda i: -row[i])
            kept, total = set(), 0.0
            for i in order:
                total += math.exp(row[i]) / z
                if total > p:
                    break
                kept.add(i)
            kept = kept or {order[0]}
            assert set(row_out.isfinite().nonzero().flatten().tolist()) == kept


def test_top_p_after_top_k_renormalises_over_the_survivors():
    logits = torch.tensor([[0.3, 0.2, 0.27, 0.23]]).log()
    # Alone, p=0.7 keeps 0.3 and 0.27 (cumulative 0.57). After top-k=2 the survivors share the
    # mass as 0.53/0.47, so the second one's inclusive cumulative probability is 1 > p.
    assert top_p_logits(logits, 0.7)[0].isfinite().tolist() == [True, False, True, False]
    assert top_p_logits(top_k_logits(logits, 2), 0.7)[0].isfinite().tolist() == \
        [True, False, False, False]


# --- the scripts -----------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in its order (printable bytes first)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("l", "l"), ("Ġ", "w")]


def tiny_encoder() -> dict[str, int]:
    """A GPT-2-format vocabulary: 256 bytes, the MERGES, then <|endoftext|>."""
    encoder = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    for a, b in MERGES:
        encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    return encoder


def reference_decode(ids: list[int]) -> str:
    """Independent of gpt2.encoder: token strings -> bytes -> UTF-8 with replacement."""
    byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
    token_of = {i: t for t, i in tiny_encoder().items()}
    data = b"".join(token_of[i].encode() if token_of[i] == "<|endoftext|>"
                    else bytes(byte_of[c] for c in token_of[i]) for i in ids)
    return data.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random model saved as checkpoint.save_model writes it, under models/tiny."""
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("models") / "tiny"
    out.mkdir()
    encoder = tiny_encoder()
    (out / "encoder.json").write_text(json.dumps(encoder))
    (out / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES),
                                   encoding="utf-8")
    config = GPTConfig(n_vocab=len(encoder), n_ctx=24, n_embd=32, n_head=4, n_layer=2)
    torch.manual_seed(0)
    model = GPT(config)
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(out / "model.safetensors"))
    (out / "hparams.json").write_text(json.dumps(config.to_dict()))
    return out


def reference_greedy(model_dir: Path, context: list[int], length: int) -> list[int]:
    """Greedy continuation by full recompute, from the saved weights (no gpt2.checkpoint)."""
    from safetensors.torch import load_file

    config = GPTConfig(**json.loads((model_dir / "hparams.json").read_text()))
    model = GPT(config).eval()
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    seq = torch.tensor([context])
    with torch.no_grad():
        for _ in range(length):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(context):].tolist()


def _run(script: str, *args: str, stdin: str = "", cwd: Path | None = None, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("PYTHONPATH", None)
    return run([sys.executable, str(REPO / "src" / script), *args], input=stdin, cwd=cwd,
               env=env, timeout=120)


def _banners(stdout: str) -> list[int]:
    # Not anchored at line starts: with piped stdin the echo of "Model prompt >>> " has no
    # newline after it, so the first banner follows it on the same line (as in the original).
    return [int(n) for n in re.findall(r"={40} SAMPLE (\d+) ={40}\n", stdout)]


def test_unconditional_script_end_to_end(model_dir, tmp_path, monkeypatch, capsys):
    # nsamples 5 with batch_size 2: the original stopped after 4 and numbered them 2, 4, 6...
    args = ["--models_dir", "$TINY_MODELS", "--model_name", "tiny", "--nsamples=5",
            "--batch_size=2", "--length", "10", "--seed", "7", "--top_k", "40"]
    r = _run("generate_unconditional_samples.py", *args, cwd=tmp_path,
             env={"TINY_MODELS": str(model_dir.parent)})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert _banners(r.stdout) == [1, 2, 3, 4, 5]
    assert BANNER.format(1) in r.stdout.splitlines()
    # Same seed, same samples (here in-process, which also checks $VAR expansion there).
    monkeypatch.setenv("TINY_MODELS", str(model_dir.parent))
    assert unconditional_main(args) == 0
    assert capsys.readouterr().out == r.stdout


def test_interactive_script_end_to_end(model_dir, tmp_path):
    r = _run("interactive_conditional_samples.py", "--model_dir", str(model_dir),
             "--nsamples", "4", "--batch_size", "2", "--length", "6", "--seed", "1",
             stdin="hello there\n\nthe world\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout.count("Model prompt >>> ") == 4  # two prompts, one empty, then EOF
    assert r.stdout.count("Prompt should not be empty!") == 1
    assert _banners(r.stdout) == [1, 2, 3, 4, 1, 2, 3, 4]  # numbering restarts per prompt
    assert r.stdout.count("=" * 80 + "\n") == 2


def test_python_m_gpt2_interact_and_errors(model_dir):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    r = run([sys.executable, "-m", "gpt2", "interact", "--model_dir", str(model_dir),
             "--nsamples", "3", "--batch_size", "2"], env=env, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: --nsamples 3 must be a multiple of --batch_size 2"


def test_interactive_truncates_long_prompts(model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("a" * 200 + "\n"))
    assert interactive_main(["--model_dir", str(model_dir), "--length", "20",
                             "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    # n_ctx 24, length 20: the last 5 prompt tokens are kept (the last sample is never fed back)
    assert "warning: the prompt has 200 tokens; only its last 5 are used" in err
    text = reference_decode(reference_greedy(model_dir, [tiny_encoder()["a"]] * 5, 20))
    assert out == (PROMPT + BANNER.format(1) + "\n" + text + "\n" + "=" * 80 + "\n"
                   + PROMPT + "\n")


def test_interactive_ctrl_c_exits_quietly(model_dir, monkeypatch):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    assert interactive_main(["--model_dir", str(model_dir)]) == 0


@pytest.mark.parametrize("main, args, message", [
    (unconditional_main, ["--length", "30"], "--length 30 is longer than the model's n_ctx 24"),
    (unconditional_main, ["--top_p", "2"], "--top_p must be in [0, 1]"),
    (unconditional_main, ["--batch_size", "0"], "--batch_size must be >= 1"),
    (interactive_main, ["--nsamples", "0"], "--nsamples must be >= 1"),
    (unconditional_main, ["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
])
def test_script_errors(model_dir, main, args, message):
    from gpt2.errors import UserError

    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        main(["--model_dir", str(model_dir), *args])


def test_unconditional_greedy_output_is_exact(model_dir, capsys):
    # --length=None (fire's spelling) is n_ctx; the leading <|endoftext|> is not printed.
    assert unconditional_main(["--model_dir", str(model_dir), "--nsamples", "2",
                               "--length=None", "--temperature", "0"]) == 0
    eot = tiny_encoder()["<|endoftext|>"]
    text = reference_decode(reference_greedy(model_dir, [eot], 24))
    sample = "\n" + text + "\n"
    assert capsys.readouterr().out == BANNER.format(1) + sample + BANNER.format(2) + sample


def test_missing_model_names_the_directory(tmp_path):
    from gpt2.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        unconditional_main(["--models_dir", str(tmp_path), "--model_name", "124M"])


@pytest.mark.parametrize("top_k,top_p,temperature", [(4, 1.0, 1.0), (4, 0.8, 0.7), (0, 0.8, 1.3),
                                                      (0, 1.0, 1.0), (10, 1.0, 2.0)])
def test_next_token_draws_from_the_filtered_softmax(top_k, top_p, temperature):
    """The draw among the top k alone has the distribution of masking the rest to -inf."""
    g = torch.Generator().manual_seed(5)
    row = 1.5 * torch.randn(10, generator=g)
    expected = top_p_logits(top_k_logits(row[None] / temperature, top_k), top_p)[0].softmax(-1)
    n = 40000
    tokens = next_token(row.expand(n, -1), temperature, top_k, top_p, g)
    freq = torch.bincount(tokens, minlength=10).double() / n
    assert (freq[expected == 0] == 0).all()  # nothing outside the filters, ever
    # 5 standard deviations of a binomial frequency
    tol = 5 * (expected * (1 - expected) / n).sqrt() + 1e-9
    assert ((freq - expected).abs() <= tol).all(), (freq, expected)


def test_draw_keeps_the_distribution_and_never_draws_probability_zero():
    from gpt2.sampling import _inverse_cdf, draw

    probs = torch.tensor([0.0, 0.1, 0.0, 0.25, 0.65, 0.0])
    n = 40000
    ids = draw(probs.expand(n, -1), torch.Generator().manual_seed(3))
    freq = torch.bincount(ids, minlength=6).double() / n
    assert (freq[probs == 0] == 0).all()
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt() + 1e-9).all(), freq
    # the ends of [0, 1): the first and the last id of probability > 0
    ends = torch.tensor([[0.0], [1 - 2.0 ** -53]], dtype=torch.float64)
    assert _inverse_cdf(probs.expand(2, -1), ends).tolist() == [1, 4]
    assert _inverse_cdf(torch.tensor([[0.3, 0.7 + 1e-7]]), ends[1:]).tolist() == [1]
    again = [draw(probs.expand(50, -1), torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(*again)
    for bad in (torch.zeros(1, 6), torch.full((1, 6), float("nan"))):
        with pytest.raises(ValueError, match="not a distribution"):
            draw(bad)


def test_a_tiny_temperature_is_the_argmax_not_nan():
    from gpt2.speculative import token_probs

    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    for top_k in (0, 2):
        assert next_token(logits, 1e-40, top_k, 1.0, torch.Generator().manual_seed(0)) == 1
        assert token_probs(logits, 1e-40, top_k, 1.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_decoder_rows_that_join_and_leave_compute_what_each_computes_alone():
    """The server's schedule: rows of different lengths join a running batch (left-padded),
    some leave, the rest go on; every row's logits equal that row decoded on its own."""
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_model

    model = make_model(GPTConfig(n_vocab=61, n_ctx=48, n_embd=32, n_head=4, n_layer=2))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]
    steps = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]]
    with torch.inference_mode():
        alone = []
        for prompt, feed in zip(prompts, steps):
            dec = Decoder(model, torch.tensor([prompt]), 8)
            alone.append([dec.logits[0].clone()] + [dec.feed(torch.tensor([t]))[0].clone()
                                                    for t in feed])
        dec = Decoder(model, torch.tensor([prompts[0]]), 8)
        rows, done = [0], {0: 0}
        schedule = {1: "join 1", 2: "join 2", 4: "leave 0"}
        for step in range(6):
            for i, row in enumerate(rows):
                torch.testing.assert_close(dec.logits[i], alone[row][done[row]], rtol=0,
                                           atol=1e-5)
            event = schedule.get(step, "")
            if event.startswith("join"):
                row = int(event[-1])
                dec.join(Decoder(model, torch.tensor([prompts[row]]), 8))
                rows.append(row)
                done[row] = 0
                assert dec.mask is not None  # the rows differ in length: padded
            elif event.startswith("leave"):
                keep = [i for i, r in enumerate(rows) if r != int(event[-1])]
                dec.keep(keep)
                rows = [rows[i] for i in keep]
            dec.feed(torch.tensor([steps[r][done[r]] for r in rows]))
            for r in rows:
                done[r] += 1
        for i, row in enumerate(rows):
            torch.testing.assert_close(dec.logits[i], alone[row][done[row]], rtol=0, atol=1e-5)
