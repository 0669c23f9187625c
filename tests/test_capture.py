"""The captured decode step (gpt2.capture): the same numbers as eager decoding (fp32 logits
within 1e-5, greedy tokens identical in fp32, bf16 and int8, padded batches whose rows join and
leave included), its compiled code reused from disk, and eager decoding with one warning line
where compiling fails."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2 import capture
from gpt2.capture import CapturedStep
from gpt2.kernels import decode_kernels
from gpt2.model import GPT, GPTConfig
from gpt2.quant import quantize_int8
from gpt2.sampling import Decoder, decode

# One worker runs these (./test.sh: --dist loadgroup): Inductor's first compile in a process
# costs ~10 s, paid once instead of on every worker.
pytestmark = pytest.mark.xdist_group("compile")

CONFIG = GPTConfig(n_vocab=96, n_ctx=64, n_embd=32, n_head=4, n_layer=1)


@pytest.fixture(scope="module")
def inductor_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inductor")


@pytest.fixture(autouse=True)
def captured(monkeypatch, inductor_dir):
    """Capture on; compiled code kept in the test's directory, not the user's cache."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("GPT2_CAPTURE", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_dir))
    # compile in this process: a pool of compile workers costs seconds to start, per worker
    with inductor_config.patch(compile_threads=1):
        yield


def model(clear: bool = False) -> GPT:
    torch.manual_seed(0)
    m = GPT(CONFIG).eval()
    if clear:  # logits far apart: a greedy token that rounding cannot flip (bf16, int8)
        with torch.no_grad():
            m.wte.weight.mul_(40)
    return m


def test_captured_step_equals_eager_step_by_step():
    m = model()
    context = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode(), decode_kernels(m):
        eager, captured = Decoder(m, context, 30), Decoder(m, context, 30, step=CapturedStep())
        for _ in range(29):
            token = eager.logits.argmax(-1)
            assert torch.equal(token, captured.logits.argmax(-1))
            torch.testing.assert_close(captured.feed(token), eager.feed(token), rtol=0, atol=1e-5)
        assert captured.length == eager.length == 34
        assert all(torch.equal(a, b) or (a - b).abs().max() < 1e-5
                   for layer_a, layer_b in zip(captured.past, eager.past)
                   for a, b in zip(layer_a, layer_b))


@pytest.mark.slow  # (the default suite's engine test below joins and drops rows too)
def test_padded_rows_that_join_and_leave_decode_as_eagerly():
    """decode() of contexts of different lengths (left-padded, joined) whose rows finish at
    different steps (the cache shrinks): the tokens eager decoding gives."""
    m = model()
    contexts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14]]

    def finished(row, ids):
        return len(ids) >= 8 + 7 * row

    want = decode(m, contexts, 40, temperature=0, finished=finished)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2_CAPTURE", "0")
        assert decode(m, contexts, 40, temperature=0, finished=finished) == want
    # and sampling: the same draws from the same generator
    draws = [decode(m, contexts[:2], 33, temperature=1.0, top_k=20,
                    generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2_CAPTURE", "0")
        assert decode(m, contexts[:2], 33, temperature=1.0, top_k=20,
                      generator=torch.Generator().manual_seed(3)) == draws[0] == draws[1]


@pytest.mark.slow  # two more compiles (~10 s); the fp32 tests cover the step's code
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_bf16_and_int8_greedy_tokens_equal_eager(dtype, monkeypatch):
    m = model(clear=True)
    m = quantize_int8(copy.deepcopy(m)) if dtype == "int8" else m.to(torch.bfloat16)
    context = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    want = decode(m, context, 40, temperature=0)
    monkeypatch.setenv("GPT2_CAPTURE", "0")
    assert decode(m, context, 40, temperature=0) == want


def test_the_captured_step_is_asked_for(monkeypatch):
    monkeypatch.delenv("GPT2_CAPTURE")
    assert not capture.capture_enabled()
    for off in ("0", "off", ""):
        monkeypatch.setenv("GPT2_CAPTURE", off)
        assert not capture.capture_enabled()
    monkeypatch.setenv("GPT2_CAPTURE", "1")
    assert capture.capture_enabled()


@pytest.mark.slow  # a second compile from the cache (~3-8 s under the suite's load)
def test_compiled_code_is_reused_from_disk(tmp_path, monkeypatch):
    """A new process (here: dynamo's in-memory state dropped) compiles nothing: Inductor's
    compiled code comes back from the cache directory."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    m = model()
    context = torch.tensor([[1, 2, 3]])
    torch._dynamo.reset()
    counters.clear()
    want = decode(m, context, 35, temperature=0)
    assert counters["inductor"]["fxgraph_cache_miss"] >= 1
    assert any((tmp_path / "inductor").rglob("*.py"))
    torch._dynamo.reset()
    counters.clear()
    assert decode(m, context, 35, temperature=0) == want
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    torch._dynamo.reset()


def test_without_a_compiler_decoding_is_eager_with_one_warning(tmp_path, monkeypatch, capsys):
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor_config.cpp, "cxx", (str(tmp_path / "no-such-c++"),))
    monkeypatch.setattr(CapturedStep, "failed", None)
    monkeypatch.setattr(capture, "_shared", None)
    torch._dynamo.reset()
    m = model()
    context = torch.tensor([[7, 8]])
    try:
        first = decode(m, context, 40, temperature=0)
        second = decode(m, context, 40, temperature=0)
    finally:
        torch._dynamo.reset()
    err = capsys.readouterr().err
    assert err.count("warning: decoding without a compiled step") == 1, err
    assert len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("GPT2_CAPTURE", "0")
    assert first == second == decode(m, context, 40, temperature=0)


def test_the_server_engine_decodes_with_the_captured_step_as_eagerly(monkeypatch):
    """Requests of different lengths joining one batch and leaving it (continuous batching):
    each gets the tokens it gets without the captured step."""
    from gpt2.serve.engine import Engine, Params
    from helpers import run_engine

    class Ids:
        eot_token, n_vocab = 0, CONFIG.n_vocab

        def decode(self, ids):
            return " ".join(map(str, ids))

    def serve_all(m) -> list[list[int]]:
        engine = Engine(m, Ids(), max_batch=4)
        assert (engine.step is not None) == (capture.capture_enabled())
        return [c.ids for c in run_engine(engine, [
            ([1 + i] * (1 + 2 * i), Params(max_tokens=10 + 5 * i, temperature=0), None)
            for i in range(5)], timeout=120)]

    m = model()
    captured = serve_all(m)
    monkeypatch.setenv("GPT2_CAPTURE", "0")
    assert serve_all(m) == captured


def test_rows_that_dropped_guesses_then_grew_their_cache_decode_as_eagerly():
    """Speculative decoding's retract with rows keeping different numbers of guesses (holes
    masked out), then more guesses than the buffers hold (they grow, the mask does not): the
    captured step attends to what the eager one does, never past the positions in use."""
    m = model()
    with torch.inference_mode(), decode_kernels(m):
        decoders = [Decoder(m, torch.tensor([[5, 6, 7], [8, 9, 10]]), 4, step=step)
                    for step in (None, capture.shared_step())]
        for d in decoders:
            out = d.extend(torch.tensor([[1, 2, 3], [4, 5, 6]]))
            d.retract(3, [3, 1], torch.stack([out[0, 2], out[1, 0]]))
            out = d.extend(torch.tensor([[7, 8, 9], [10, 11, 12]]))  # past the capacity
            d.retract(3, [1, 3], torch.stack([out[0, 0], out[1, 2]]))
        eager, captured = decoders
        for _ in range(6):
            token = eager.logits.argmax(-1)
            torch.testing.assert_close(captured.feed(token), eager.feed(token), rtol=0,
                                       atol=1e-5)
