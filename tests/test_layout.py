"""The package's shape, checked: sizes, imports, and that every writer goes through one helper.

These are the rules DEVELOPERS.md states; a change that breaks one fails here with the place.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gpt2"
MAX_FUNCTION, MAX_CLASS, MAX_MODULE = 80, 300, 500


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import, also inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level \
                else node.module
            found.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return found


def test_sizes():
    too_big = []
    for name, path in modules().items():
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines > MAX_MODULE:
            too_big.append(f"{name}: module of {lines} lines")
        for node in ast.walk(tree(path)):
            span = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and span > MAX_FUNCTION:
                too_big.append(f"{name}.{node.name}: function of {span} lines")
            if isinstance(node, ast.ClassDef) and span > MAX_CLASS:
                too_big.append(f"{name}.{node.name}: class of {span} lines")
    assert not too_big, "\n".join(too_big)


def test_no_private_names_imported_across_modules():
    mods = modules()
    bad = []
    for name, path in mods.items():
        for target, names, line in imports(name, path):
            if target in mods:
                bad += [f"{path.name}:{line}: {target}.{n}" for n in names
                        if n.startswith("_") and n != "__version__"]
        # module._private through an imported module object
        aliases = {}
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.ImportFrom) and node.level:
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree(path)):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    graph = {}
    for name, path in mods.items():
        # A module's own packages are already importing when it runs: not edges.
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        deps = set()
        for target, names, _ in imports(name, path):
            # a submodule import runs every package __init__ on the way
            parts = target.split(".")
            candidates = [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
            candidates += [f"{target}.{n}" for n in names]
            deps |= {t for t in candidates if t in mods and t != name and t not in ancestors}
        graph[name] = deps

    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


# The package's layers, bottom first (DEVELOPERS.md shows the same order and says why): a module
# may import from its own top-level name and from the names before it, never from later ones.
LAYERS = [
    "errors", "gpt2", "flags",           # bad input; the root (its public names load lazily)
    "files",                             # atomic writes, paths, checksums, TF bundles, downloads
    "runtime", "model", "kernels", "attention", "quant", "capture",  # devices; the model;
                                         # kernels, document masks, int8
                                         # and the compiled decode step, applied from outside
    "data",                              # records, text and token files, encoding, windows
    "tokenizer",                         # BPE, sentencepiece, chat templates, tokenizer training
    "io",                                # model formats, exports, loading a model to run it
    "decoder", "sampling", "speculative",    # the KV cache of rows; decoding; guesses checked
    "conversation",                      # chats
    "perplexity", "evaluate",            # loss over a dataset (evaluate: its old name)
    "tasks", "lora",                     # benchmarks; adapters
    "training", "train",                 # the training loop (train: its old name)
    "serve", "lm_eval",                  # the server; the harness backend
    "commands", "cli", "__main__",       # command-line tools on top
]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gpt2"


def test_layers_import_downwards_only():
    """Every import of the package (lazy ones and importlib.import_module of a literal name
    included) goes to the importer's own layer or one below it."""
    mods = modules()
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = [f"{name}: {_layer(name)!r} is not in LAYERS (tests/test_layout.py)"
           for name in mods if _layer(name) not in rank]
    for name, path in mods.items():
        targets = [(t, line) for t, names, line in imports(name, path)]
        # (`from .. import training` imports the module gpt2.training)
        targets += [(f"{t}.{n}", line) for t, names, line in imports(name, path)
                    for n in names if f"{t}.{n}" in mods]
        targets += [(n.args[0].value, n.lineno) for n in ast.walk(tree(path))
                    if isinstance(n, ast.Call) and n.args
                    and "import_module" in (getattr(n.func, "attr", None),
                                            getattr(n.func, "id", None))
                    and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)]
        for target, line in targets:
            if not (target == "gpt2" or target.startswith("gpt2.")) or _layer(target) not in rank:
                continue
            if rank[_layer(target)] > rank.get(_layer(name), -1):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {_layer(name)} imports "
                           f"{target}, a layer above it")
    assert not bad, "\n".join(bad)


def test_package_names_do_not_hide_public_names():
    """``import gpt2.x`` sets ``gpt2.x``: no module may be named like a public function (the
    two old names that were are callable aliases that call it)."""
    import gpt2

    clash = {name for name in modules() if name.count(".") == 1} & \
        {f"gpt2.{n}" for n in gpt2.__all__}
    assert clash == {"gpt2.train", "gpt2.evaluate"}
    for name in clash:
        module = importlib.import_module(name)
        assert callable(module)


def _calls(path: Path, dotted: str) -> list[int]:
    mod, _, attr = dotted.rpartition(".")
    return [n.lineno for n in ast.walk(tree(path)) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == attr
            and isinstance(n.func.value, ast.Name) and n.func.value.id == mod]


@pytest.mark.parametrize("call", ["tempfile.mkstemp", "tempfile.mkdtemp", "os._exit"])
def test_one_way_to_write_a_file(call):
    """Temporary files and renames come from gpt2.files.atomic; nothing leaves the process by
    os._exit (a distributed run's Gloo threads are freed before exit instead, see
    gpt2.training.distributed.shutdown)."""
    found = [f"{name}:{line}" for name, path in modules().items()
             for line in _calls(path, call)]
    assert not found, f"{call} in " + ", ".join(found)


def test_renames_only_in_the_atomic_helpers():
    allowed = {"gpt2.files.atomic", "gpt2.files.download", "gpt2.training.run_dir"}
    found = [f"{name}:{line}" for name, path in modules().items() if name not in allowed
             for line in _calls(path, "os.replace") + _calls(path, "os.rename")]
    assert not found, "os.replace outside gpt2.files.atomic: " + ", ".join(found)


TESTS = Path(__file__).resolve().parent
# What starts a process, or waits on a process or thread, and how it must be called in tests.
_STARTS = {"Popen", "call", "check_call", "check_output", "start_processes", "Process"}
_WAITS = {"join", "wait", "communicate"}


def _unbounded(path: Path) -> list[str]:
    found = []
    for n in ast.walk(tree(path)):
        if not isinstance(n, ast.Call) or not isinstance(n.func, ast.Attribute):
            continue
        attr, keywords = n.func.attr, {k.arg for k in n.keywords}
        owner = n.func.value.id if isinstance(n.func.value, ast.Name) else ""
        if attr in _STARTS and owner in ("subprocess", "mp", "multiprocessing"):
            found.append(f"{path.name}:{n.lineno}: {owner}.{attr} (use bounded.Proc/spawn)")
        elif attr == "run" and owner == "subprocess" and (
                "timeout" not in keywords or keywords & {"capture_output", "stdout", "stderr"}):
            # a grandchild holding a captured pipe outlives subprocess.run's timeout
            found.append(f"{path.name}:{n.lineno}: subprocess.run (use bounded.run)")
        elif attr in _WAITS and not n.args and "timeout" not in keywords:
            found.append(f"{path.name}:{n.lineno}: .{attr}() without a timeout")
    return found


def test_tests_never_wait_without_a_deadline():
    """Every test that starts processes or threads waits through tests/bounded.py (or with a
    timeout of its own): a stuck worker fails its test with its stack printed, and the suite
    still ends; nothing relies on pytest-timeout."""
    found = [line for path in sorted(TESTS.glob("*.py")) if path.name != "bounded.py"
             for line in _unbounded(path)]
    assert not found, "\n".join(found)


DEVICE_WORDS = {"cuda", "xpu", "mps", "tpu", "nccl", "xccl"}  # (gloo: its own network check)
DEVICE_MODULES = {"cuda", "xpu", "mps", "tpu"}


def test_every_device_choice_is_in_runtime():
    """Device names (as values) and torch's per-device modules appear in gpt2.runtime only:
    elsewhere the code asks runtime (its Backend table, torch.accelerator)."""
    found = []
    for name, path in modules().items():
        if name == "gpt2.runtime":
            continue
        for n in ast.walk(tree(path)):
            if isinstance(n, ast.Constant) and n.value in DEVICE_WORDS:
                found.append(f"{name}:{n.lineno}: {n.value!r}")
            elif isinstance(n, ast.Attribute) and n.attr in DEVICE_MODULES and \
                    isinstance(n.value, ast.Name) and n.value.id == "torch":
                found.append(f"{name}:{n.lineno}: torch.{n.attr}")
    assert not found, "\n".join(found)


def test_docstring_examples_import():
    """Every ``from gpt2... import ...`` / ``import gpt2...`` line in a module's docstring runs
    (a stale example is the first thing a newcomer copies)."""
    import importlib
    import re

    bad = []
    for name, path in modules().items():
        doc = ast.get_docstring(tree(path)) or ""
        for line in doc.splitlines():
            m = re.match(r"\s*from (gpt2[\w.]*) import ([\w, ]+)$", line.split("#")[0].rstrip())
            if not m:
                continue
            try:
                module = importlib.import_module(m.group(1))
            except ImportError:
                bad.append(f"{name}: {line.strip()}")
                continue
            bad += [f"{name}: {line.strip()}" for n in m.group(2).split(",")
                    if not hasattr(module, n.strip())]
    assert not bad, "\n".join(bad)


def test_the_public_api_is_what_the_docstring_says():
    import re

    import gpt2

    doc = gpt2.__doc__.split("The public API", 1)[1].split("Everything else", 1)[0]
    listed = set(re.findall(r"``(\w+)``", doc)) - {"gpt2", "__all__"}
    assert listed == set(gpt2.__all__)
    for name in gpt2.__all__:
        assert getattr(gpt2, name) is not None
