#!/usr/bin/env bash
# The whole pipeline on a CPU in a few minutes, with nothing to download but Python packages:
# a corpus shipped with Python, a tokenizer trained on it, a small GPT-2 trained from scratch,
# a sample, and the commands to fine-tune the real 124M model on your own text.
#
#   ./quickstart.sh                 # extra arguments go to python -m gpt2 quickstart
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv"
    "$PYTHON" -m venv .venv
fi
# Installing torch is the slow part: skip it when any torch is importable already (a CUDA build
# the user installed must not be replaced by the CPU wheel).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "Installing torch==2.13.0"
    .venv/bin/python -m pip install -q torch==2.13.0
fi
if ! .venv/bin/python -c "import gpt2.commands.quickstart, jinja2" 2>/dev/null; then
    echo "Installing gpt2 (pip install -e .)"
    .venv/bin/python -m pip install -q -e .
fi
exec .venv/bin/python -m gpt2 quickstart "$@"
