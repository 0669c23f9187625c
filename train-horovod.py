#!/usr/bin/env python3
"""train.py for mpirun: Horovod when installed, else torch.distributed (see README.md)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
from gpt2.cli import run  # noqa: E402
from gpt2.commands.horovod import main  # noqa: E402

sys.exit(run(main, sys.argv[1:]))
