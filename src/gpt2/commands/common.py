"""What several commands share: the sampling flags and their checks, the --dtype flag, a
random stream for sampling. Loading the model is :mod:`gpt2.io.inference`."""

from __future__ import annotations

import argparse

import torch

from ..errors import UserError
from ..runtime import WEIGHT_DTYPES
from ..sampling import sampling_problem


def check_sampling_flags(args: argparse.Namespace) -> None:
    """--temperature, --top_k, --top_p: the checks of :func:`gpt2.sampling.check_params`."""
    problem = sampling_problem(args.temperature, args.top_k, args.top_p)
    if problem:
        raise UserError(f"--{problem}")


def add_dtype_argument(p: argparse.ArgumentParser, *names: str, dest: str = "dtype") -> None:
    """``--dtype``: the weights' type when sampling or scoring, int8 included."""
    p.add_argument(*(names or ("--dtype",)), dest=dest, choices=WEIGHT_DTYPES, default="fp32",
                   help="the weights' type: fp32, bf16, fp16, or int8 (per-channel int8 "
                        "weights of the blocks and head, PyTorch's int8 kernels; gpt2.quant)")


def generator_for(device: torch.device, seed: int | None) -> torch.Generator:
    """A random stream on ``device``: seeded, or from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


def add_speculation_arguments(p: argparse.ArgumentParser) -> None:
    """``--prompt_lookup N`` and ``--draft MODEL_DIR`` (``--draft_tokens K``): speculative
    decoding (:mod:`gpt2.speculative`)."""
    p.add_argument("--prompt_lookup", type=int, default=0, metavar="N",
                   help="guess up to N tokens from earlier text (n-gram lookup) and check them "
                        "in one forward: faster where the output quotes the prompt; greedy "
                        "output unchanged, samples keep the model's distribution (0: off)")
    p.add_argument("--draft", default=None, metavar="MODEL_DIR",
                   help="a smaller model with the same tokenizer that guesses tokens for this "
                        "one to check (speculative decoding)")
    p.add_argument("--draft_tokens", type=int, default=4, metavar="K",
                   help="tokens the --draft model guesses per step")


def speculator_for(args: argparse.Namespace, model, enc, device):
    """The speculator the flags ask for (None: plain decoding); one-line errors for flags
    that cannot work (a draft of another vocabulary, negative counts, both at once)."""
    from ..speculative import DraftModel, PromptLookup

    if args.prompt_lookup < 0:
        raise UserError(f"--prompt_lookup must be >= 0, got {args.prompt_lookup}")
    if args.draft_tokens < 1:
        raise UserError(f"--draft_tokens must be >= 1, got {args.draft_tokens}")
    if args.draft and args.prompt_lookup:
        raise UserError("--draft and --prompt_lookup: choose one way to guess tokens")
    if args.prompt_lookup:
        return PromptLookup(args.prompt_lookup)
    if not args.draft:
        return None
    from ..io.inference import load_for_inference

    draft, draft_enc, _, draft_dir = load_for_inference(args.draft, str(device),
                                                        getattr(args, "dtype", None))
    probe = "Speculative decoding: the same tokens, 1234 ünïcode \n<|endoftext|>"
    if (draft.config.n_vocab != model.config.n_vocab or draft_enc.eot_token != enc.eot_token
            or draft_enc.encode(probe) != enc.encode(probe)):
        raise UserError(f"--draft {draft_dir}: its tokenizer or vocabulary differs from the "
                        "model's (a draft must share them)")
    return DraftModel(draft, args.draft_tokens)
