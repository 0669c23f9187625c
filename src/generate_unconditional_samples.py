#!/usr/bin/env python3
"""Print samples that start from <|endoftext|>: ``python3 src/generate_unconditional_samples.py``.

Flags as in OpenAI's script (``--model_name --models_dir --seed --nsamples --batch_size --length
--temperature --top_k --top_p``) plus ``--model_dir`` and ``--device``; see ``--help``. Runs from
the source tree without PYTHONPATH: Python puts this file's folder, src/, first on sys.path.
"""

import sys

from gpt2.cli import run
from gpt2.commands.sample import unconditional_main

if __name__ == "__main__":
    sys.exit(run(unconditional_main, sys.argv[1:]))
