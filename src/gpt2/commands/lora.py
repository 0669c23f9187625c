"""``gpt2 lora merge BASE_DIR ADAPTER_DIR OUT_DIR``: fold a LoRA adapter into a plain model.

The adapters themselves are :mod:`gpt2.lora`.
"""

from __future__ import annotations

from pathlib import Path

from ..flags import ArgumentParser
from ..io.model_dir import load_model, save_model
from ..files.paths import find_model_dir
from ..lora import ADAPTER_WEIGHTS, load_lora, merge_lora, read_lora_config


def _has_encoder(d: Path) -> bool:
    return any((d / f).is_file() for f in ("encoder.json", "vocab.json", "sp.model"))


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="gpt2 lora", description="LoRA adapter tools.")
    sub = p.add_subparsers(dest="action", required=True)
    m = sub.add_parser("merge", help="fold an adapter into its base model; write a plain model",
                       description="Load BASE_DIR, add the adapter in ADAPTER_DIR, fold it into "
                                   "the weights and write OUT_DIR as a plain model directory "
                                   "(hparams.json, model.safetensors, encoder files).")
    m.add_argument("base_dir", metavar="BASE_DIR", help="the model the adapter was trained on")
    m.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="holds lora.json and "
                                                              f"{ADAPTER_WEIGHTS}")
    m.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged model")
    args = p.parse_args(argv)

    base_dir, adapter_dir = find_model_dir(args.base_dir), Path(args.adapter_dir)
    read_lora_config(adapter_dir)  # fail on a wrong directory before loading a big model
    model = load_model(base_dir)
    model = merge_lora(load_lora(model, adapter_dir))
    encoder_dir = base_dir if _has_encoder(base_dir) else \
        adapter_dir if _has_encoder(adapter_dir) else None
    out = save_model(model, args.out_dir, encoder_dir=encoder_dir)
    print(f"merged {adapter_dir} into {base_dir} -> {out}")
    return 0
