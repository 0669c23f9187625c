"""README.md says what the code does: its flag tables for train.py list exactly the flags
TrainConfig declares, with the same defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from gpt2.training.config import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES = ("### Flags of the original `train.py`", "### Added flags",
          "### Instruction and chat fine-tuning", "### Preference tuning",
          "## Distributed training")


def train_flag_rows() -> list[tuple[str, str]]:
    """(flag, default cell) for every flag in README's train.py flag tables."""
    text = README.read_text(encoding="utf-8")
    rows = []
    for heading in TABLES:
        section = text[text.index(heading):]
        table = re.search(r"\n\| flag \| default \| meaning \|\n\|---\|---\|---\|\n((?:\|.*\n)+)",
                          section)
        assert table, f"no flag table under {heading!r}"
        for line in table.group(1).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            flags = re.findall(r"`--([\w-]+)", cells[0])
            defaults = [d.strip() for d in cells[1].split(" / ")]
            if len(defaults) != len(flags):  # --compile / --no-compile: one flag, one default
                defaults = defaults * len(flags)
            rows += list(zip(flags, defaults))
    return rows


def test_readme_lists_every_train_flag_with_its_default():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    documented = {}
    for name, default in train_flag_rows():
        name = name.replace("-", "_")
        if name.startswith("no_") and name[3:] in fields:
            continue  # --no-compile is --compile's other half
        documented[name] = default.strip("`")
    assert set(documented) == set(fields) | {"config"}
    for name, cell in documented.items():
        if name == "config":
            assert cell == "none"
            continue
        f = fields[name]
        if f.default is None:
            assert cell == f.metadata["shown"], name
        elif f.default is False:
            assert cell == "off", name
        elif name == "dataset":
            assert cell == "required"
        elif isinstance(f.default, (int, float)):
            assert float(cell) == f.default, name
        else:
            assert cell == f.default, name
