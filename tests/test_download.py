"""download_model.py against a local HTTP server (127.0.0.1): Range, HEAD and injected faults."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpt2.files import download
from gpt2.commands.download import main
from gpt2.files.download import HUGGINGFACE_FILES, RELEASE_FILES, download_model, file_urls
from gpt2.errors import UserError
from bounded import run

ROOT = Path(__file__).resolve().parents[1]


class FakeServer:
    """Serves ``files`` (URL path -> bytes) and records every request.

    Faults, each keyed by URL path: ``cut`` (send the full Content-Length, then close after half
    the body; once per listed path), ``fail500`` (answer 500 this many times), ``ignore_range``
    (always answer 200 with the whole file), ``no_length`` (no Content-Length header),
    ``redirect`` (302 to another path, as the Hugging Face hub does for large files), ``stall``
    (send half the body, then go silent for a second; once per listed path).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut: set[str] = set()
        self.fail500: dict[str, int] = {}
        self.ignore_range: set[str] = set()
        self.no_length: set[str] = set()
        self.redirect: dict[str, str] = {}
        self.stall: set[str] = set()
        self.lock = threading.Lock()

    def gets(self, path: str | None = None) -> list[tuple[str, str, str | None]]:
        return [e for e in self.log if e[0] == "GET" and (path is None or e[1] == path)]


def _handler(state: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path, rng = self.path, self.headers.get("Range")
            with state.lock:
                state.log.append((self.command, path, rng))
                # a pending cut comes first, then the pending 500s
                cut = body and path in state.cut
                state.cut.discard(path)
                stall = body and path in state.stall
                state.stall.discard(path)
                fail = body and not cut and state.fail500.get(path, 0) > 0
                if fail:
                    state.fail500[path] -= 1
            if path in state.redirect:
                self.send_response(302)
                self.send_header("Location", state.redirect[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if fail:
                self.send_error(500)
                return
            data = state.files.get(path)
            if data is None:
                self.send_error(404)
                return
            start, status = 0, 200
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and path not in state.ignore_range:
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            payload = data[start:]
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            if path not in state.no_length:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if not body:
                return
            if cut:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if stall:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                time.sleep(1.0)
                payload = payload[len(payload) // 2:]
            try:
                self.wfile.write(payload)
            except OSError:  # the client gave up on a stalled response
                pass

    return Handler


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr(download, "CHUNK_SIZE", 4096)  # so a cut leaves bytes in the .part
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    state = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _release(state: FakeServer, name: str = "124M") -> dict[str, bytes]:
    """Put fake release files for ``name`` on the server; sizes differ so mix-ups show."""
    files = {f: os.urandom(1000 + 50_000 * i) for i, f in enumerate(RELEASE_FILES)}
    for f, data in files.items():
        state.files[f"/models/{name}/{f}"] = data
    return files


def _range_start(header: str | None) -> int:
    m = re.fullmatch(r"bytes=(\d+)-", header or "")
    assert m, header
    return int(m.group(1))


def _assert_complete(out: Path, files: dict[str, bytes]) -> None:
    for f, data in files.items():
        assert (out / f).read_bytes() == data, f
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # no .part left


def test_default_urls_are_the_public_release():
    urls = file_urls("124M")
    assert [f for f, _, _ in urls] == list(RELEASE_FILES)
    assert urls[3][1] == ("https://openaipublic.blob.core.windows.net/gpt-2/models/124M/"
                          "model.ckpt.data-00000-of-00001")
    hf = file_urls("355M", source="huggingface")
    assert hf[1][1] == ("https://huggingface.co/openai-community/gpt2-medium/resolve/main/"
                        "model.safetensors")
    assert [f for f, _, req in hf if not req] == ["tokenizer.json"]
    assert file_urls("1558M", base_url="http://m/x/")[0][1] == "http://m/x/models/1558M/checkpoint"


def test_cut_and_500_are_retried_and_resumed_with_range(server, tmp_path):
    files = _release(server)
    big = "/models/124M/model.ckpt.data-00000-of-00001"
    server.cut.add(big)
    server.fail500[big] = 1
    out = download_model("124M", tmp_path, base_url=server.url)
    assert out == tmp_path / "124M"
    _assert_complete(out, files)
    # first GET cut at half, then a 500, then the rest from where the kept part ended
    ranges = [r for _, _, r in server.gets(big)]
    assert ranges[0] is None and ranges[1] == ranges[2]
    assert 0 < _range_start(ranges[1]) <= len(files["model.ckpt.data-00000-of-00001"]) // 2
    assert [r for _, p, r in server.gets() if p != big] == [None] * 6


def test_complete_files_are_skipped_without_get(server, tmp_path):
    files = _release(server)
    download_model("124M", tmp_path, base_url=server.url)
    server.log.clear()
    download_model("124M", tmp_path, base_url=server.url)
    assert server.gets() == []
    assert {m for m, _, _ in server.log} == {"HEAD"}
    _assert_complete(tmp_path / "124M", files)


def test_truncated_final_file_is_resumed(server, tmp_path):
    # the original downloader wrote in place, so an interrupted run left a short final file
    files = _release(server)
    out = tmp_path / "124M"
    out.mkdir()
    (out / "vocab.bpe").write_bytes(files["vocab.bpe"][:777])
    download_model("124M", tmp_path, base_url=server.url)
    _assert_complete(out, files)
    assert [r for _, _, r in server.gets("/models/124M/vocab.bpe")] == ["bytes=777-"]


def test_existing_part_is_resumed(server, tmp_path):
    files = _release(server)
    out = tmp_path / "124M"
    out.mkdir()
    (out / "encoder.json.part").write_bytes(files["encoder.json"][:1234])
    download_model("124M", tmp_path, base_url=server.url)
    _assert_complete(out, files)
    assert [r for _, _, r in server.gets("/models/124M/encoder.json")] == ["bytes=1234-"]


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    files = _release(server)
    server.ignore_range.add("/models/124M/hparams.json")
    out = tmp_path / "124M"
    out.mkdir()
    (out / "hparams.json.part").write_bytes(b"x" * 500)  # wrong bytes: must not survive
    download_model("124M", tmp_path, base_url=server.url)
    _assert_complete(out, files)


def test_part_already_whole_is_finished_on_416(server, tmp_path):
    files = _release(server)
    out = tmp_path / "124M"
    out.mkdir()
    (out / "checkpoint.part").write_bytes(files["checkpoint"])
    download_model("124M", tmp_path, base_url=server.url)
    _assert_complete(out, files)
    ranges = [r for _, _, r in server.gets("/models/124M/checkpoint")]
    assert ranges == [f"bytes={len(files['checkpoint'])}-"]


def test_no_content_length_still_works(server, tmp_path):
    files = _release(server)
    server.no_length.update(f"/models/124M/{f}" for f in files)
    download_model("124M", tmp_path, base_url=server.url)
    _assert_complete(tmp_path / "124M", files)


def test_stalled_response_times_out_and_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT", (5, 0.2))
    files = _release(server)
    server.stall.add("/models/124M/vocab.bpe")
    download_model("124M", tmp_path, base_url=server.url)
    _assert_complete(tmp_path / "124M", files)
    ranges = [r for _, _, r in server.gets("/models/124M/vocab.bpe")]
    assert len(ranges) == 2 and ranges[0] is None and _range_start(ranges[1]) > 0


def test_exhausted_retries_name_the_file(server, tmp_path):
    _release(server)
    server.fail500["/models/124M/hparams.json"] = 100
    with pytest.raises(UserError, match=r"^hparams\.json: download failed after 3 tries") as e:
        download_model("124M", tmp_path, base_url=server.url, retries=3)
    assert "\n" not in str(e.value)
    assert len(server.gets("/models/124M/hparams.json")) == 3
    assert not (tmp_path / "124M" / "hparams.json").exists()


def test_404_is_one_line_error_from_the_script(server, tmp_path):
    env = {**os.environ, "NO_PROXY": "127.0.0.1"}
    r = run([sys.executable, str(ROOT / "download_model.py"), "124M", "--models_dir",
             str(tmp_path), "--base_url", server.url], env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {server.url}/models/124M/checkpoint: not found (HTTP 404)"]
    assert not (tmp_path / "124M").exists()


def test_unknown_names_refused_for_default_source_only(server, tmp_path, monkeypatch):
    # refused before any network access: the default URL is unreachable here anyway
    monkeypatch.setattr(download, "RELEASE_URL", server.url)
    with pytest.raises(UserError, match=r"unknown model 'gpt5'.*124M, 355M, 774M, 1558M"):
        main(["gpt5", "--models_dir", str(tmp_path)])
    assert server.log == [] and not (tmp_path / "gpt5").exists()
    files = _release(server, "gpt5")
    download_model("gpt5", tmp_path, base_url=server.url)
    _assert_complete(tmp_path / "gpt5", files)


@pytest.mark.parametrize("name", ["..", "../124M", "a/b", "/tmp/x", "a\\b", "..\\x", "", "."])
def test_path_escaping_names_are_refused(server, tmp_path, name):
    with pytest.raises(UserError, match="plain name"):
        download_model(name, tmp_path / "models", base_url=server.url)
    assert server.log == [] and not (tmp_path / "models").exists()


def test_old_names_download_the_canonical_model(server, tmp_path, capsys):
    files = _release(server, "124M")
    out = download_model("117M", tmp_path, base_url=server.url)
    assert out == tmp_path / "124M" and not (tmp_path / "117M").exists()
    _assert_complete(out, files)
    assert {p.split("/")[2] for _, p, _ in server.log} == {"124M"}
    assert "117M is the old name of 124M" in capsys.readouterr().err


def test_huggingface_source(server, tmp_path):
    repo = "/openai-community/gpt2/resolve/main"
    files = {f: os.urandom(3000 + 20_000 * i) for i, (f, _) in enumerate(HUGGINGFACE_FILES)
             if f != "tokenizer.json"}  # the optional file is missing on this mirror
    for f, data in files.items():
        server.files[f"{repo}/{f}"] = data
    # the hub answers large files with a redirect to its storage; a cut there must resume too
    server.files["/cdn/weights"] = server.files.pop(f"{repo}/model.safetensors")
    server.redirect[f"{repo}/model.safetensors"] = "/cdn/weights"
    server.cut.add("/cdn/weights")
    assert main(["124M", "--source", "huggingface", "--base_url", server.url + "/",
                 "--models_dir", str(tmp_path)]) == 0
    _assert_complete(tmp_path / "124M", files)
    ranges = [r for _, _, r in server.gets("/cdn/weights")]
    assert len(ranges) == 2 and 0 < _range_start(ranges[1]) <= len(files["model.safetensors"]) // 2


def test_dataset_urls_are_the_canonical_ones():
    from gpt2.tasks import TASKS

    assert TASKS["hellaswag"].data.url == ("https://raw.githubusercontent.com/rowanz/hellaswag/"
                                           "master/data/hellaswag_val.jsonl")
    assert TASKS["lambada"].data.url == ("https://openaipublic.blob.core.windows.net/gpt-2/data/"
                                         "lambada_test.jsonl")
    assert (TASKS["wikitext103"].data.url, TASKS["wikitext103"].data.name) == (
        "https://wikitext.smerity.com/wikitext-103-raw-v1.zip", "wikitext-103-raw-v1.zip")


def test_dataset_download_resumes_retries_and_checks_sha256(server, tmp_path, monkeypatch, capsys):
    import hashlib

    import dataclasses

    from gpt2.cli import main as cli
    from gpt2.tasks import TASKS, DataFile

    data = b"".join(b'{"text": "row %d of the test set"}\n' % i for i in range(5000))
    server.files["/gpt-2/data/lambada_test.jsonl"] = data
    monkeypatch.setitem(TASKS, "lambada", dataclasses.replace(TASKS["lambada"], data=DataFile(
        f"{server.url}/gpt-2/data/lambada_test.jsonl", "lambada_test.jsonl", len(data),
        hashlib.sha256(data).hexdigest())))
    server.cut.add("/gpt-2/data/lambada_test.jsonl")
    server.fail500["/gpt-2/data/lambada_test.jsonl"] = 1
    assert cli(["download", "--dataset", "lambada", "--data_dir", str(tmp_path / "data")]) == 0
    assert (tmp_path / "data/lambada_test.jsonl").read_bytes() == data
    assert os.listdir(tmp_path / "data") == ["lambada_test.jsonl"]
    ranges = [r for _, _, r in server.gets()]
    assert ranges[0] is None and 0 < _range_start(ranges[-1]) < len(data)
    assert "Dataset saved in" in capsys.readouterr().out
    server.log.clear()  # a second run checks the file and asks the server nothing
    assert cli(["download", "--dataset", "lambada", "--data_dir", str(tmp_path / "data")]) == 0
    assert server.log == [] and "already downloaded (sha256 checked)" in capsys.readouterr().err

    # A file that is not the published one is moved aside and named, in one line
    server.files["/gpt-2/data/lambada_test.jsonl"] = data[:-5] + b"XXXXX"
    (tmp_path / "data/lambada_test.jsonl").unlink()
    assert cli(["download", "--dataset", "lambada", "--data_dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {tmp_path / 'data/lambada_test.jsonl'}: sha256 ") and \
        "is not the published" in err
    assert os.listdir(tmp_path / "data") == ["lambada_test.jsonl.bad"]

    # Neither or both of a model and --dataset: one line
    assert cli(["download"]) == 1 and cli(["download", "124M", "--dataset", "lambada"]) == 1
    assert capsys.readouterr().err.count("name a model or --dataset NAME") == 2
