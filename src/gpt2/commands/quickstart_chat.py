"""``gpt2 quickstart --chat``: instruction tuning from scratch in a few CPU minutes, measured.

1. a synthetic instruction task, made on the fly: ``upper WORD`` -> ``WORD`` in capitals, for
   random lowercase words; 20,000 training chats (``--examples``), 200 held out for validation
   and 200 more words never seen in training for the test;
2. a byte-level tokenizer (256 bytes + ``<|endoftext|>``, GPT-2's format) and a small GPT-2
   (4 layers, 128 wide, 64-token context);
3. training from scratch on the answers only (chats through gpt2's chat template, packed);
4. greedy replies to the 200 held-out words: exact-match accuracy, and with ``--compare`` the
   same training with ``--train_on_prompt`` at equal steps, for the difference.

    python -m gpt2 quickstart --chat                  # everything under ./quickstart-chat/
    python -m gpt2 quickstart --chat --compare        # + the --train_on_prompt run
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from ..files.atomic import write_text

MODEL = {"n_ctx": 64, "n_embd": 128, "n_head": 4, "n_layer": 4}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def chat(word: str) -> dict:
    return {"messages": [{"role": "user", "content": f"upper {word}"},
                         {"role": "assistant", "content": word.upper()}]}


def write_task(out: Path, seed: int, n_train: int = 20000, n_held: int = 200) -> list[str]:
    """train/ and valid/ chats of distinct random words; the test words (seen nowhere)."""
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n_train + 2 * n_held:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    for split, part in (("train", words[:n_train]), ("valid", words[n_train:n_train + n_held])):
        write_text(out / split / f"{split}.jsonl",
                   "".join(json.dumps(chat(w)) + "\n" for w in part), durable=False)
    return words[n_train + n_held:]


def write_byte_level_model(out: Path, **hparams) -> None:
    """encoder.json with the 256 bytes and <|endoftext|>, no merges, and hparams.json (MODEL,
    with ``hparams`` changed)."""
    from ..tokenizer.bpe import bytes_to_unicode

    encoder = {c: b for b, c in bytes_to_unicode().items()}
    encoder["<|endoftext|>"] = 256
    write_text(out / "encoder.json", json.dumps(encoder), durable=False)
    write_text(out / "vocab.bpe", "#version: 0.2\n", durable=False)
    write_text(out / "hparams.json", json.dumps({"n_vocab": 257, **MODEL, **hparams}, indent=2)
               + "\n",
               durable=False)


def accuracy(run_dir: Path, words: list[str]) -> tuple[float, list[tuple[str, str]]]:
    """Exact-match accuracy of greedy replies to ``upper WORD``; a few (prompt, reply) pairs.
    Prompts of one length are decoded together (greedy: batching changes no reply)."""
    import torch

    from ..io.inference import load_for_inference
    from ..sampling import decode
    from ..tokenizer.chat import ChatTemplate

    model, enc, _, _ = load_for_inference(run_dir, "cpu")
    template = ChatTemplate.for_model(run_dir)
    prompts = {w: template.encode(chat(w)["messages"][:1], enc, add_generation_prompt=True)[0]
               for w in words}
    replies: dict[str, str] = {}
    for length in sorted({len(ids) for ids in prompts.values()}):
        group = [w for w in words if len(prompts[w]) == length]
        new = decode(model, torch.tensor([prompts[w] for w in group]), 12, temperature=0,
                     finished=lambda row, ids: ids[-1] == enc.eot_token)
        for w, ids in zip(group, new):
            ids = ids[:-1] if ids and ids[-1] == enc.eot_token else ids
            replies[w] = template.content_of(enc.decode(ids))
    shown = [(f"upper {w}", replies[w]) for w in words[:5]]
    return sum(replies[w] == w.upper() for w in words) / len(words), shown


def train_run(out: Path, name: str, steps: int, seed: int, *extra: str) -> int:
    from .train import main as train_main

    return train_main([
        "--dataset", str(out / "data"), "--model_dir", str(out / "model"), "--init", "fresh",
        "--restore_from", "fresh", "--overwrite", "--run_name", name,
        "--checkpoint_dir", str(out / "checkpoint"), "--samples_dir", str(out / "samples"),
        "--max_steps", str(steps), "--batch_size", "8", "--optimizer", "adamw",
        "--learning_rate", "1e-3", "--lr_schedule", "cosine", "--warmup_steps", "50",
        "--val_every", str(max(1, steps // 4)), "--val_batch_count", "8",
        "--sample_every", "0", "--save_every", "0", "--print_every", "100",
        "--seed", str(seed), *extra])


def chat_main(out: Path, steps: int, seed: int, compare: bool, examples: int = 20000) -> int:
    t0 = time.time()
    print(f"[1/4] Writing a synthetic instruction task to {out / 'data'}/: 'upper WORD' -> "
          "WORD in capitals")
    test_words = write_task(out / "data", seed, examples)
    print(f"      {examples:,} training chats, 200 for validation, {len(test_words)} held-out "
          "words for the test")
    print(f"[2/4] A byte-level tokenizer and a small GPT-2 {json.dumps(MODEL)} -> {out / 'model'}/")
    write_byte_level_model(out / "model")
    runs = [("answers", [])] + ([("prompts_too", ["--train_on_prompt"])] if compare else [])
    results = {}
    for name, extra in runs:
        what = "the answers only" if not extra else "everything (--train_on_prompt)"
        print(f"[3/4] Training from scratch on {what}, {steps} steps")
        code = train_run(out, name, steps, seed, *extra)
        if code:
            return code
        results[name] = accuracy(out / "checkpoint" / name, test_words)
    print("[4/4] Greedy replies to the held-out words (never seen in training)")
    for prompt, text in results["answers"][1]:
        print(f"      {prompt!r:>16} -> {text!r}")
    print(f"      exact-match accuracy, answers only: {results['answers'][0]:.1%}")
    if compare:
        print(f"      exact-match accuracy, --train_on_prompt: {results['prompts_too'][0]:.1%} "
              f"(equal steps)")
    run_dir = out / "checkpoint" / "answers"
    print(f"Done in {time.time() - t0:.0f} s.\n")
    print(f"""Next steps
  Talk to it:       python -m gpt2 chat {run_dir}      (try: upper hello)
  Serve it:         python -m gpt2 serve {run_dir}     (/v1/chat/completions, playground at /)
  Fine-tune 124M on your own chats (one {{"messages": [...]}} per line in chats.jsonl):
    python download_model.py 124M
    PYTHONPATH=src ./train.py --dataset chats.jsonl --model_name 124M --run_name mine \\
        --epochs 3 --val_every 100 --sample_every 100""")
    return 0
