#!/usr/bin/env python3
"""Thin wrapper kept from the original layout: same as `gpt2 train` (see README.md)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
from gpt2.cli import script  # noqa: E402

script("train")
