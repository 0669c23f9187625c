#!/usr/bin/env python3
"""Continue prompts typed at ``Model prompt >>>``.

    python3 src/interactive_conditional_samples.py --model_name 124M --top_k 40

Flags as in OpenAI's script (``--model_name --models_dir --seed --nsamples --batch_size --length
--temperature --top_k --top_p``) plus ``--model_dir`` and ``--device``; see ``--help``. Ctrl-D or
Ctrl-C quits. Runs from the source tree without PYTHONPATH: Python puts this file's folder, src/,
first on sys.path.
"""

import sys

from gpt2.cli import run
from gpt2.commands.sample import interactive_main

if __name__ == "__main__":
    sys.exit(run(interactive_main, sys.argv[1:]))
