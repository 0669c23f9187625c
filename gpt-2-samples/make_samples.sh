#!/usr/bin/env bash
# Regenerates every sample file in this folder from the README's main job, the quickstart model
# (a small GPT-2 trained from scratch on Python's pydoc topics by `python -m gpt2.quickstart`),
# and rewrites README.md with the exact command that made each file.
#
#   gpt-2-samples/make_samples.sh          # trains the quickstart model first if it is missing
#
# QUICKSTART=dir: the quickstart's --out folder (default: quickstart); PYTHON: the interpreter.
# The same seed gives the same samples on the same machine and torch version.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
QS=${QUICKSTART:-quickstart}
MODEL=$QS/checkpoint/quickstart
OUT=gpt-2-samples
INDEX=$OUT/README.md

if [ ! -f "$MODEL/model.safetensors" ]; then
    echo "No quickstart model in $MODEL: training it (python -m gpt2.quickstart --out $QS)"
    "$PY" -m gpt2.quickstart --out "$QS"
fi

cat > "$INDEX" <<HEADER
# Samples from the quickstart model

Made by \`gpt-2-samples/make_samples.sh\` from \`$MODEL\`, the model that
\`python -m gpt2.quickstart --out $QS\` trains from scratch on CPU (a 4-layer, 128-wide GPT-2
with a 2,048-token BPE and a 128-token context, 400 steps on Python's pydoc topics). It is a
toy: expect pydoc-flavoured text, not sense. Conditional files use the prompts in
\`prompts.txt\` and include them. Every file was made by the command next to it:

HEADER

gen() {  # gen FILE FLAGS...: run gpt2 generate and record the command in README.md
    local file=$1
    shift
    "$PY" -m gpt2 generate "$MODEL" "$@" --out "$OUT/$file"
    printf -- '- `%s`: `python -m gpt2 generate %s %s --out %s`\n' \
        "$file" "$MODEL" "$*" "$OUT/$file" >> "$INDEX"
}

common=(--nsamples 3 --batch_size 3 --length 120 --seed 2024)
gen unconditional-temperature-1.txt   "${common[@]}" --temperature 1
gen unconditional-temperature-0.7.txt "${common[@]}" --temperature 0.7
gen unconditional-top_k-40.txt        "${common[@]}" --top_k 40
prompted=("${common[@]}" --prompts "$OUT/prompts.txt" --include_prompt)
gen conditional-temperature-1.txt     "${prompted[@]}" --temperature 1
gen conditional-temperature-0.7.txt   "${prompted[@]}" --temperature 0.7
gen conditional-top_k-40.txt          "${prompted[@]}" --top_k 40
gen conditional-top_k-40.jsonl        "${prompted[@]}" --top_k 40

printf '\nLoss of this model on the held-out test split (`python -m gpt2 evaluate %s --dataset %s`):\n\n```\n' \
    "$MODEL" "$QS/corpus" >> "$INDEX"
"$PY" -m gpt2 evaluate "$MODEL" --dataset "$QS/corpus" 2>/dev/null >> "$INDEX"
printf '```\n' >> "$INDEX"
echo "wrote $(ls "$OUT" | wc -l) files in $OUT/"
