"""gpt2: fine-tune, train and sample GPT-2 with PyTorch.

    import gpt2
    model = gpt2.load_model("models/124M")            # release, Hugging Face or our own layout
    enc = gpt2.get_encoder("124M", models_dir="models")
    context = torch.tensor([enc.encode("Hello, my name is")])
    out = gpt2.sample_sequence(model, length=40, context=context, top_k=40, seed=0)
    print(enc.decode(out[0, context.size(1):].tolist()))

The public API is what this package exports (``gpt2.__all__``), and it keeps its names and
signatures from release to release:

- models: ``GPT``, ``GPTConfig``, ``load_model``, ``save_model``, ``load_config``,
  ``resolve_model_dir``, ``download_model``, ``export_huggingface``, ``export_release``;
- tokenizers: ``get_encoder``, ``load_encoder``, ``Encoder``;
- sampling: ``sample_sequence``, ``generate_batch``;
- data: ``load_dataset``, ``Sampler``;
- training and evaluation: ``TrainConfig``, ``train``, ``evaluate``;
- errors: ``UserError`` (bad input, shown as one line by the commands).

Everything else is reached through its module (``gpt2.model.token_loss``,
``gpt2.runtime.pick_device``, ...; the map is DEVELOPERS.md) and may change between releases.
"""

from .errors import UserError

__version__ = "0.1.0"

# Heavier pieces are imported on first use so `import gpt2` stays cheap.
_LAZY = {
    "GPT": "gpt2.model",
    "GPTConfig": "gpt2.model",
    "load_model": "gpt2.io.model_dir",
    "save_model": "gpt2.io.model_dir",
    "load_config": "gpt2.io.model_dir",
    "resolve_model_dir": "gpt2.files.paths",
    "get_encoder": "gpt2.tokenizer.files",
    "load_encoder": "gpt2.tokenizer.files",
    "Encoder": "gpt2.tokenizer.bpe",
    "sample_sequence": "gpt2.sampling",
    "generate_batch": "gpt2.sampling",
    "load_dataset": "gpt2.data.dataset",
    "Sampler": "gpt2.data.sampler",
    "evaluate": "gpt2.perplexity",
    "TrainConfig": "gpt2.training.config",
    "train": "gpt2.training.loop",
    "download_model": "gpt2.files.download",
    "export_huggingface": "gpt2.io.hf",
    "export_release": "gpt2.io.release",
}

__all__ = ["UserError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpt2' has no attribute {name!r}")
