"""``gpt2 lm-eval MODEL_DIR --tasks ...``: any lm-evaluation-harness task on one of our models.

    gpt2 lm-eval checkpoint/run1 --tasks lambada_openai,hellaswag --limit 500 --out lm.json
    gpt2 lm-eval models/124M --tasks my_task --include_path my_tasks/ --dtype bf16

The model answers the harness through :class:`gpt2.lm_eval.GPT2LM` (no conversion); the
harness itself (``pip install 'gpt2[eval]'``) fetches its tasks' data from the Hugging Face Hub
unless ``--include_path`` tasks read local files.
"""

from __future__ import annotations

import json
import sys

from ..flags import ArgumentParser, HelpFormatter
from ..errors import UserError
from .common import add_dtype_argument


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gpt2 lm-eval", formatter_class=HelpFormatter,
                       description="Run lm-evaluation-harness tasks on a model directory.")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="model directory (ours, release or Hugging Face) or a released name")
    p.add_argument("--tasks", required=True,
                   help="comma-separated harness task (or group) names")
    p.add_argument("--include_path", default=None, metavar="DIR",
                   help="a folder of extra task YAMLs (e.g. copies reading local files)")
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per prompt")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (a fraction if < 1)")
    p.add_argument("--batch_size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--max_gen_toks", type=int, default=256,
                   help="generation tasks: tokens to generate unless the task says otherwise")
    p.add_argument("--apply_chat_template", action="store_true",
                   help="render prompts through the model's chat template")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    add_dtype_argument(p)
    p.add_argument("--seed", type=int, default=1234, help="torch/numpy seed of the harness")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the results (and the harness's config) as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("batch_size", "max_gen_toks"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit must be > 0, got {args.limit}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--tasks {args.tasks!r}: name at least one task (lm_eval --tasks list "
                        "shows them)")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise UserError("gpt2 lm-eval needs lm-evaluation-harness: pip install "
                        "'gpt2[eval]'") from None
    from ..lm_eval import GPT2LM

    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown task {unknown[0]!r} (lm_eval --tasks list shows "
                        "them; --include_path adds a folder of YAMLs)")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    model = GPT2LM(args.model_dir, device=args.device, dtype=args.dtype,
                   batch_size=args.batch_size, max_gen_toks=args.max_gen_toks)
    results = lm_eval.simple_evaluate(
        model=model, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
        task_manager=manager, apply_chat_template=args.apply_chat_template,
        log_samples=False, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    print(make_table(results))
    if "groups" in results:  # aggregates (e.g. MMLU's overall score), as the harness prints
        print(make_table(results, "groups"))
    if args.out:
        from ..files.atomic import write_json

        keep = {k: results[k] for k in ("results", "groups", "versions", "n-shot",
                                        "higher_is_better", "n-samples", "configs")
                if k in results}
        keep["model"], keep["dtype"] = str(model.model_dir), args.dtype
        write_json(args.out, json.loads(json.dumps(keep, default=str)))
    print(f"tasks: {', '.join(tasks)}", file=sys.stderr)
    return 0
