"""``gpt2 quickstart --align``: preference and reward tuning after SFT, measured on the chat
quickstart's task (``upper WORD`` -> ``WORD``).

1. the chat quickstart's task, tokenizer and model (n_ctx 128, so that both chats of a pair
   fit one row); SFT (``--train_on_prompt``, which learns
   this task fastest) for ``--max_steps``: a deliberately short run, leaving something to learn;
2. from that checkpoint, for ``--align_steps`` steps each: DPO on preference pairs made for the
   task (chosen: the right answer; rejected: a plausible wrong one: the word unchanged, only
   its first letter up, or one letter lost), GRPO with the exact-match reward, and, as the
   control, SFT continued on the same chats;
3. greedy replies to 200 held-out words for each: exact match; DPO's held-out reward accuracy.

    python -m gpt2 quickstart --align          # everything under ./quickstart-align/
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from ..files.atomic import write_json, write_text
from .quickstart_chat import accuracy, chat, train_run, write_byte_level_model, write_task


def wrong(word: str, rng: random.Random) -> str:
    """A plausible wrong answer to ``upper word``."""
    kind = rng.randrange(3)
    if kind == 0:
        return word
    if kind == 1:
        return word.capitalize()
    i = rng.randrange(len(word))
    return (word[:i] + word[i + 1:]).upper()


def write_alignment_data(out: Path, seed: int) -> None:
    """prefs/ (pairs) and prompts/ (with the answer) from the task's train/ and valid/ chats."""
    rng = random.Random(seed + 1)
    for split in ("train", "valid"):
        words = [json.loads(line)["messages"][1]["content"].lower()
                 for line in (out / "data" / split / f"{split}.jsonl").read_text().splitlines()]
        pairs = [{"prompt": chat(w)["messages"][:1],
                  "chosen": [{"role": "assistant", "content": w.upper()}],
                  "rejected": [{"role": "assistant", "content": wrong(w, rng)}]} for w in words]
        prompts = [{"prompt": chat(w)["messages"][:1], "answer": w.upper()} for w in words]
        write_text(out / "prefs" / split / f"{split}.jsonl",
                   "".join(json.dumps(p) + "\n" for p in pairs), durable=False)
        write_text(out / "prompts" / split / f"{split}.jsonl",
                   "".join(json.dumps(p) + "\n" for p in prompts), durable=False)


def align_run(out: Path, name: str, data: str, steps: int, seed: int, *extra: str) -> int:
    from .train import main as train_main

    return train_main([
        "--dataset", str(out / data), "--model_dir", str(out / "checkpoint" / "sft"),
        "--restore_from", "fresh", "--overwrite", "--run_name", name,
        "--checkpoint_dir", str(out / "checkpoint"), "--samples_dir", str(out / "samples"),
        "--max_steps", str(steps), "--batch_size", "8", "--optimizer", "adamw",
        "--learning_rate", "1e-5", "--val_every", str(max(1, steps // 2)),
        "--val_batch_count", "4", "--sample_every", "0", "--save_every", "0",
        "--print_every", "50", "--seed", str(seed), *extra])


RUNS = (("sft_more", "data", "SFT continued (the control)", ("--train_on_prompt",)),
        ("dpo", "prefs", "DPO (sigmoid, beta 0.1, reference precomputed)",
         ("--objective", "dpo", "--reference", "precomputed")),
        ("grpo", "prompts", "GRPO (exact match, 8 completions a prompt at temperature 0.7)",
         ("--objective", "grpo", "--num_generations", "8", "--max_completion_length", "12",
          "--batch_size", "4", "--generation_temperature", "0.7")))


def align_main(out: Path, sft_steps: int, align_steps: int, seed: int,
               examples: int = 20000) -> int:
    t0 = time.time()
    print(f"[1/4] The chat quickstart's task and model under {out}/, SFT for {sft_steps} steps")
    test_words = write_task(out / "data", seed, examples)
    # n_ctx 128: a pair's chosen and rejected chats share one row (2 x ~36 tokens)
    write_byte_level_model(out / "model", n_ctx=128)
    write_alignment_data(out, seed)
    code = train_run(out, "sft", sft_steps, seed, "--train_on_prompt")
    if code:
        return code
    results = {"sft": {"exact_match": accuracy(out / "checkpoint" / "sft", test_words)[0]}}
    for i, (name, data, what, extra) in enumerate(RUNS):
        print(f"[{2 + (i > 0)}/4] From the SFT model, {align_steps} steps: {what}")
        code = align_run(out, name, data, align_steps, seed, *extra)
        if code:
            return code
        run_dir = out / "checkpoint" / name
        results[name] = {"exact_match": accuracy(run_dir, test_words)[0]}
        last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        val = [m for m in last if "val_rewards/accuracies" in m or "val_reward" in m]
        if val:
            results[name].update({k: v for k, v in val[-1].items()
                                  if k in ("val_rewards/accuracies", "val_rewards/margins",
                                           "val_reward")})
    print("[4/4] Greedy replies to 200 held-out words (never seen in training): exact match")
    for name, r in results.items():
        more = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "exact_match")
        print(f"      {name:>9}: {r['exact_match']:.1%}" + (f"  ({more})" if more else ""))
    write_json(out / "results.json", {"sft_steps": sft_steps, "align_steps": align_steps,
                                      "seed": seed, "results": results})
    print(f"Done in {time.time() - t0:.0f} s; the numbers are in {out / 'results.json'}.")
    return 0
