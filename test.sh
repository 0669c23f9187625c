#!/usr/bin/env bash
# Runs the test suite on a machine with nothing installed: makes .venv if needed, installs a CPU
# build of torch when no torch is importable (TORCH_SPEC overrides), the package and its test
# extras, then pytest. Extra arguments go to pytest (e.g. ./test.sh -m slow, ./test.sh -k encoder).
# Without them: the default suite, one test process per core (pytest-xdist), each with one
# torch thread, so that the processes do not fight over the cores.
set -euo pipefail
cd "$(dirname "$0")"
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
fi
"$py" -m pip install -q --disable-pip-version-check -e ".[test]"
if [ $# -eq 0 ]; then
    set -- -m "not slow" -n auto --dist loadgroup
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec "$py" -m pytest "$@"
