"""Distributed training on CPU: 2 Gloo processes under torchrun and mpirun, DDP and FSDP.

Each run is the tiny byte-level model of test_train.py (2 layers, 32 wide, 32-token context,
257 ids), so a 2-process run costs a few seconds, mostly process start-up.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gpt2.io.model_dir import load_model
from gpt2.model import GPT, GPTConfig
from helpers import lm_loss
from gpt2.commands.train import main as train_main
from gpt2.training.distributed import DistInfo
from gpt2.training.parallelize import Parallel

sys.path.insert(0, str(Path(__file__).parent))
from bounded import Proc, run, spawn  # noqa: E402
# The training tests' fixtures too: every test in its own folder and cache, a tiny model, data.
from test_train import _isolated, args, data, losses, metrics, model_dir  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
# 2 ranks x batch b draw other windows than 1 rank x batch 2b, so the curves agree only
# statistically; on this tiny model they stay within this over 10 steps.
CURVE_TOL = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def torchrun_cmd(argv: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(REPO / "train.py"), *argv]


def torchrun(argv: list[str], cwd: Path, nproc: int = 2, timeout: float = 120
             ) -> subprocess.CompletedProcess:
    return run(torchrun_cmd(argv, nproc), cwd=cwd, env=env(), timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# --- exactness: DDP's averaged gradient is the gradient of the whole batch ---------------------

CFG = GPTConfig(n_vocab=61, n_ctx=16, n_embd=16, n_head=2, n_layer=2)


CHUNKS = (0, 5)  # the loss in one buffer, and chunked


def _ddp_worker(rank: int, port: int, tokens: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different init on each rank: DDP must broadcast rank 0's
    model = GPT(CFG)
    if rank == 0:
        torch.save(model.state_dict(), out + ".init")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    # 2 micro-batches per rank, the all-reduce only on the last (as the trainer accumulates)
    mine = tokens[rank * 4:(rank + 1) * 4]
    parallel = Parallel(model, ddp, DistInfo(rank, 2), sharded=False)
    for chunk in CHUNKS:
        model.zero_grad(set_to_none=True)
        for i, micro in enumerate((mine[:2], mine[2:])):
            with parallel.no_sync(last_micro_step=i == 1):
                # the loss inside DDP's forward, as the trainer computes it (chunked or not)
                (ddp(micro, targets=micro, loss_chunk=chunk) / 2).backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, f"{out}.{chunk}.{rank}")
    # The product's way out. A bare destroy_process_group() here, with `ddp` still alive,
    # left its reducer to free the group later, from C++: that hung 4 runs in 12.
    from gpt2.training import distributed

    distributed.shutdown()


def test_ddp_gradient_equals_single_process_gradient(tmp_path):
    tokens = torch.randint(0, CFG.n_vocab, (8, CFG.n_ctx), generator=torch.Generator().manual_seed(3))
    out = str(tmp_path / "grads")
    spawn(_ddp_worker, args=(free_port(), tokens, out), nprocs=2, timeout=90)
    model = GPT(CFG)
    model.load_state_dict(torch.load(out + ".init"))
    lm_loss(model(tokens), tokens).backward()
    for chunk in CHUNKS:
        for rank in (0, 1):
            grads = torch.load(f"{out}.{chunk}.{rank}")
            for name, p in model.named_parameters():
                torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6,
                                           msg=(chunk, name))


# --- leaving: destroy_process_group() really frees the group ----------------------------------

def _native_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def _train_one_step(info: DistInfo, fsdp: bool) -> tuple:
    from gpt2.training import optim
    from gpt2.training.parallelize import parallelize

    torch.manual_seed(0)  # FSDP2 does not broadcast: the same init on every rank
    model = GPT(CFG)
    parallel = parallelize(model, info, fsdp=fsdp, compile=False, checkpoint_blocks=[])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, CFG.n_vocab, (2, CFG.n_ctx),
                           generator=torch.Generator().manual_seed(info.rank))
    with parallel.no_sync(last_micro_step=True):
        parallel.train_model(tokens, targets=tokens).backward()
    optimizer.step()
    parallel.full_model()  # the checkpoint's gathers (FSDP: DTensor redistribution)
    optim.optimizer_state(optimizer, model, gather=parallel.sharded)
    return parallel, optimizer


def _leave_worker(rank: int, port: int, fsdp: bool, out: str) -> None:
    from gpt2.training import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = distributed.init("cpu", 1.0)
    # The wrapped model outlives the group, as a traceback or a caller's variable keeps it:
    # shutdown() must still free the group (DDP's reducer held it, and freed it later from C++
    # with the GIL held: the exit deadlock).
    kept = _train_one_step(info, fsdp)
    distributed.shutdown()
    # Gloo's own threads end asynchronously after the group is freed (a loaded machine saw
    # gloo_tcp_loop still exiting): give them a bounded moment; a leaked group keeps them.
    deadline = time.time() + 5
    while any("gloo" in t or "tcpstore" in t for t in _native_threads()) and \
            time.time() < deadline:
        time.sleep(0.05)
    Path(f"{out}.{rank}").write_text(json.dumps(_native_threads()))
    del kept


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names from Linux /proc")
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_shutdown_stops_gloo_threads(tmp_path, fsdp):
    """Nothing of the group may run on into interpreter exit: a Gloo group still alive there
    (kept by torch's import-time default arguments, DTensor's caches or a DDP reducer) now and
    then aborts a finished rank with 'terminate called without an active exception' (exit 134),
    or deadlocks it (the reducer's)."""
    out = str(tmp_path / "threads")
    spawn(_leave_worker, args=(free_port(), fsdp, out), nprocs=2, timeout=90)
    for rank in (0, 1):
        threads = json.loads(Path(f"{out}.{rank}").read_text())
        assert not [t for t in threads if "gloo" in t or "tcpstore" in t], (rank, threads)


# --- torchrun ----------------------------------------------------------------------------------

def evals_equal_gpt2_evaluate(run_dir: Path, step: int, hellaswag: Path, lambada: Path) -> None:
    """The benchmarks a distributed run logged at its last step are what one process scores
    on the saved checkpoint (rows split across ranks or not, the sums add up)."""
    from gpt2.cli import main as cli

    record = next(m for m in metrics(run_dir) if m["step"] == step and "hellaswag_acc" in m)
    # every row once: DDP's shares (4 + 3, 5 + 4) add up, FSDP's copies are not added twice
    assert (record["hellaswag_examples"], record["lambada_examples"]) == (7, 9)
    for task, data, keys in (("hellaswag", hellaswag, ("acc", "acc_norm")),
                             ("lambada", lambada, ("acc", "perplexity"))):
        out = run_dir / f"{task}.json"
        assert cli(["evaluate", str(run_dir), "--task", task, "--data", str(data),
                    "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["examples"] == (7 if task == "hellaswag" else 9)
        for key in keys:
            assert record[f"{task}_{key}"] == pytest.approx(result[key], rel=1e-5), (task, key)


# Flags of the distributed runs compared below (validation holds out data: the same in all).
RUN = dict(val_every=2, val_batch_count=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One 2-rank run of 10 steps, the reference of the resume and the curve tests (its first
    6 steps are what a 6-step run computes: the schedule is constant)."""
    from test_train import make_model_dir, synthetic_text

    root = tmp_path_factory.mktemp("uninterrupted")
    (root / "data.txt").write_text(synthetic_text())
    model = make_model_dir(root / "tiny")
    e = {**env(), "GPT2_CACHE": str(root / "cache")}
    ok(run(torchrun_cmd(args(root / "data.txt", model, max_steps=10, **RUN)), cwd=root, env=e,
           timeout=120))
    return root / "checkpoint" / "run1"


def test_torchrun_run_resume_and_checkpoint(tmp_path, data, model_dir, uninterrupted):
    from test_train_parts import write_eval_files

    hellaswag, lambada = write_eval_files(tmp_path)  # 7 and 9 rows: uneven shares
    out = ok(torchrun(args(data, model_dir, max_steps=3, eval_every=3,
                           eval_tasks=f"hellaswag={hellaswag},lambada={lambada}", **RUN),
                      tmp_path))
    assert "effective batch 2 x 2 ranks x 1 accumulation = 4 windows = 128 tokens" in out
    assert "not scaled" in out
    assert out.count("Saving") == 1 and out.count("Training...") == 1  # rank 0 alone prints
    run_dir = tmp_path / "checkpoint" / "run1"
    assert [m["step"] for m in metrics(run_dir)] == [0, 1, 2, 3]  # one line per step
    from gpt2.files.paths import follow_run_dir

    state = json.loads((follow_run_dir(run_dir) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    model = load_model(run_dir)
    assert sum(p.numel() for p in model.parameters()) > 0
    evals_equal_gpt2_evaluate(run_dir, 3, hellaswag, lambada)

    ok(torchrun(args(data, model_dir, max_steps=6, restore_from="latest", **RUN), tmp_path))
    assert (run_dir / "counter").read_text() == "6\n"
    assert [m["step"] for m in metrics(run_dir)] == [0, 1, 2, 3, 4, 5, 6]
    resumed = losses(run_dir)

    # the same 6 steps without the stop: a resumed distributed run continues exactly
    assert losses(uninterrupted)[:6] == pytest.approx(resumed, abs=1e-6)


def test_two_processes_follow_one_process_curve(tmp_path, data, model_dir, uninterrupted):
    steps = 10  # 2 ranks x batch 2 (the reference run) against 1 process x batch 4
    assert train_main(args(data, model_dir, max_steps=steps, batch_size=4, **RUN)) == 0
    one, dist_ = losses(tmp_path / "checkpoint" / "run1"), losses(uninterrupted)
    assert len(one) == len(dist_) == steps
    assert one[0] == pytest.approx(dist_[0], abs=CURVE_TOL)  # same start weights
    assert max(abs(a - b) for a, b in zip(one, dist_)) < CURVE_TOL, (one, dist_)
    assert dist_[-1] < dist_[0] - 0.3  # and it learns


def test_fsdp_run_saves_a_whole_model_and_resumes(tmp_path, data, model_dir):
    from test_train_parts import write_eval_files

    hellaswag, lambada = write_eval_files(tmp_path)  # every rank scores every row under FSDP
    out = ok(torchrun(args(data, model_dir, "--fsdp", max_steps=2, accumulate_gradients=2,
                           val_every=1, val_batch_count=3, loss_chunk=9, eval_every=2,
                           eval_tasks=f"hellaswag={hellaswag},lambada={lambada}"), tmp_path))
    assert "FSDP" in out
    run_dir = tmp_path / "checkpoint" / "run1"
    evals_equal_gpt2_evaluate(run_dir, 2, hellaswag, lambada)
    model = load_model(run_dir)  # consolidated: loads with no process group
    assert model.lm_head.weight is model.wte.weight
    from safetensors.torch import load_file

    from gpt2.files.paths import follow_run_dir

    opt = load_file(str(follow_run_dir(run_dir) / "optimizer.safetensors"))
    assert opt["wte.weight/exp_avg"].shape == model.wte.weight.shape  # full, not a shard
    out = ok(torchrun(args(data, model_dir, "--fsdp", max_steps=4, accumulate_gradients=2,
                           restore_from="latest"), tmp_path))
    assert "not restoring the optimizer state" not in out  # each rank took its shard of it
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == [1, 2, 3, 4]


def test_sigint_saves_once_and_workers_exit_0(tmp_path, data, model_dir):
    with Proc(torchrun_cmd(args(data, model_dir, print_every=1)), cwd=tmp_path, env=env(),
              merge=True) as proc:
        proc.wait_for(lambda line: line.startswith("[3 |"), timeout=90)
        proc.signal(signal.SIGINT, group=True)  # what Ctrl-C in the terminal does
        text = proc.finish(timeout=60).stdout
    # The workers save and exit 0; torchrun itself got the SIGINT too and reports that with a
    # non-zero status of its own (SignalException), so its status is not what is checked here.
    assert "worker failed" not in text.lower() and "exitcode: 1" not in text, text[-3000:]
    assert text.count("Saving") == 1 and "interrupted" in text, text[-3000:]
    run_dir = tmp_path / "checkpoint" / "run1"
    step = int((run_dir / "counter").read_text())
    assert step >= 3 and [p.name for p in run_dir.glob("model-*")] == [f"model-{step}"]


def test_dead_rank_gives_one_line_error(tmp_path, data, model_dir):
    """Rank 1 is killed mid-run; rank 0 must exit 1 with a message, not hang."""
    port = free_port()
    cmd = [sys.executable, str(REPO / "train.py"), *args(data, model_dir, "--dist_timeout", "0.5",
                                                        print_every=1)]
    envs = [dict(env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for rank in (0, 1)]
    with Proc(cmd, cwd=tmp_path, env=envs[0]) as zero, Proc(cmd, cwd=tmp_path, env=envs[1]) as one:
        zero.wait_for(lambda line: line.startswith("[2 |"), timeout=90)
        one.popen.kill()
        done = zero.finish(timeout=90)
    err = done.stderr
    assert done.returncode == 1, err[-2000:]
    assert "error: rank 0: lost contact with other ranks" in err
    assert "Traceback" not in err


# --- mpirun --------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="mpirun not installed (apt-get install openmpi-bin; .ci/run does it)")
def test_mpirun_train_horovod(tmp_path, data, model_dir):
    e = env()
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
           "-x", "OMPI_ALLOW_RUN_AS_ROOT=1", "-x", "MASTER_ADDR", "-x", "MASTER_PORT",
           "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "GPT2_CACHE",
           sys.executable, str(REPO / "train-horovod.py"), *args(data, model_dir, max_steps=3)]
    out = ok(run(cmd, cwd=tmp_path, env=e, timeout=120))
    assert "2 processes (openmpi" in out
    run_dir = tmp_path / "checkpoint" / "run1"
    assert (run_dir / "counter").read_text() == "3\n"
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3]
    load_model(run_dir)


# --- two hosts: two network namespaces joined by a veth pair -------------------------------------

@pytest.fixture
def two_hosts():
    """Namespaces gpt2a-<pid> (10.77.<n>.1 on veth va) and gpt2b-<pid> (10.77.<n>.2, vb)."""
    tag = str(os.getpid())
    names, net = (f"gpt2a-{tag}", f"gpt2b-{tag}"), os.getpid() % 250
    cmds = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
            ["ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"],
            ["ip", "link", "set", f"va{tag}", "netns", names[0]],
            ["ip", "link", "set", f"vb{tag}", "netns", names[1]]]
    for i, (ns, dev) in enumerate(zip(names, (f"va{tag}", f"vb{tag}"))):
        cmds += [["ip", "-n", ns, "addr", "add", f"10.77.{net}.{i + 1}/24", "dev", dev],
                 ["ip", "-n", ns, "link", "set", dev, "up"], ["ip", "-n", ns, "link", "set",
                                                                "lo", "up"]]
    try:
        for cmd in cmds:
            proc = run(cmd, timeout=30)
            if proc.returncode:
                pytest.skip(f"cannot make network namespaces here ({' '.join(cmd)}: "
                            f"{proc.stderr.strip()}): needs root and iproute2")
        yield [(ns, dev, f"10.77.{net}.{i + 1}")
               for i, (ns, dev) in enumerate(zip(names, (f"va{tag}", f"vb{tag}")))]
    finally:
        for ns in names:
            run(["ip", "netns", "del", ns], timeout=30)


def test_two_hosts_train_and_a_loopback_hostname_is_one_line(tmp_path, data, model_dir,
                                                             two_hosts):
    import socket as sock

    master = two_hosts[0][2]

    def both(interface: bool) -> list[subprocess.CompletedProcess]:
        port = free_port()
        procs = []
        for rank, (ns, dev, _) in enumerate(two_hosts):
            e = {**env(), "GPT2_CACHE": str(tmp_path / "cache")}
            if interface:
                e["GLOO_SOCKET_IFNAME"] = dev
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                   "--master_addr", master, "--master_port", str(port),
                   str(REPO / "train.py"), *args(data, model_dir, max_steps=2, dist_timeout=0.5)]
            procs.append(Proc(cmd, cwd=tmp_path, env=e))
        try:
            return [p.finish(timeout=120) for p in procs]
        finally:
            for p in procs:
                p.__exit__()

    loopback = sock.gethostbyname(sock.gethostname()).startswith("127.")
    if loopback:  # this machine's hostname is loopback: without an interface, one line
        t0 = time.time()
        for proc in both(interface=False):
            assert proc.returncode != 0
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
            assert len(lines) == 1 and "set GLOO_SOCKET_IFNAME" in lines[0], proc.stderr[-2000:]
        assert time.time() - t0 < 60
    for proc in both(interface=True):  # with the interface named, the two hosts train together
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoint/run1/model-2/model.safetensors").is_file()


def test_torchrun_trains_chats_on_two_ranks_and_resumes(tmp_path, model_dir):
    """Examples shared out by rank (every other one of an epoch's order), packed; validation
    split across ranks; a resumed run continues both ranks' streams."""
    from test_examples import sums, write_jsonl

    data = write_jsonl(tmp_path / "chat.jsonl", sums(80))
    flags = dict(batch_size=2, val_every=2, val_batch_count=2)
    ok(torchrun(args(data, model_dir, max_steps=2, **flags), tmp_path))
    out = ok(torchrun(args(data, model_dir, max_steps=4, **flags), tmp_path))
    assert "80 messages examples" in out and "holding out 4 of 80 examples" in out
    run_dir = tmp_path / "checkpoint" / "run1"
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == [1, 2, 3, 4]
    state = json.loads((run_dir / "model-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["sampler"]["position"] > 0
    assert (run_dir / "model-4" / "chat_template.jinja").is_file()


DPO_FLAGS = dict(objective="dpo", reference="precomputed", val_every=2, val_fraction=0.25,
                 batch_size=1)


def test_fsdp_dpo_with_stored_reference_log_probs_resumes(tmp_path, model_dir):
    """DPO under FSDP: the reference log-probs computed once (every rank runs the sharded
    forwards), kept in the checkpoint, read back on a resume."""
    from test_preference import upper_pairs, write_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", upper_pairs(24))
    ok(torchrun(args(data, model_dir, "--fsdp", max_steps=2, **DPO_FLAGS), tmp_path))
    out = ok(torchrun(args(data, model_dir, "--fsdp", max_steps=4, **DPO_FLAGS), tmp_path))
    assert "Computing the reference" not in out
    run_dir = tmp_path / "checkpoint" / "run1"
    assert (run_dir / "model-4" / "reference_logps.safetensors").is_file()
    steps = [m for m in metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(m["rewards/margins"]) for m in steps)


@pytest.mark.slow  # (a third two-rank launch; the default suite's time is short)
def test_fsdp_refuses_a_whole_reference_copy_with_one_line(tmp_path, model_dir):
    from test_preference import upper_pairs, write_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", upper_pairs(8))
    refused = torchrun(args(data, model_dir, "--fsdp", max_steps=1, run_name="copy",
                            **{**DPO_FLAGS, "reference": "copy"}), tmp_path)
    assert refused.returncode != 0 and "--reference copy: a whole copy" in refused.stderr


def test_grpo_on_two_ranks_samples_each_ranks_own_prompts(tmp_path, model_dir):
    """Each rank draws its own prompts and samples their groups; rewards and the loss are
    averaged across ranks; a resumed run continues both ranks' streams."""
    from test_preference import UPPER, write_jsonl

    (tmp_path / "upper_reward.py").write_text(UPPER)
    data = write_jsonl(tmp_path / "prompts.jsonl",
                       [{"prompt": f"upper {w}:"} for w in ("cat", "dog", "sun", "owl") * 4])
    flags = dict(objective="grpo", reward="upper_reward:upper", num_generations=2,
                 max_completion_length=4, batch_size=1)
    ok(torchrun(args(data, model_dir, max_steps=2, **flags), tmp_path))
    ok(torchrun(args(data, model_dir, max_steps=3, **flags), tmp_path))
    run_dir = tmp_path / "checkpoint" / "run1"
    steps = [m for m in metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(0 <= m["reward"] <= 1 and m["completions/mean_length"] > 0 for m in steps)
    state = json.loads((run_dir / "model-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["sampler"]["position"] == 3
