"""gpt2: fine-tune, train and sample GPT-2 with PyTorch.

    import gpt2
    model = gpt2.load_model("models/124M")            # release, Hugging Face or our own layout
    enc = gpt2.get_encoder("124M", models_dir="models")
    context = torch.tensor([enc.encode("Hello, my name is")])
    out = gpt2.sample_sequence(model, length=40, context=context, top_k=40, seed=0)
    print(enc.decode(out[0, context.size(1):].tolist()))
"""

from .errors import UserError

__version__ = "0.1.0"

# Heavier pieces are imported on first use so `import gpt2` stays cheap.
_LAZY = {
    "GPT": "gpt2.model",
    "GPTConfig": "gpt2.model",
    "load_model": "gpt2.checkpoint",
    "save_model": "gpt2.checkpoint",
    "resolve_model_dir": "gpt2.checkpoint",
    "get_encoder": "gpt2.encoder",
    "load_encoder": "gpt2.encoder",
    "Encoder": "gpt2.encoder",
    "sample_sequence": "gpt2.sample",
}

__all__ = ["UserError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpt2' has no attribute {name!r}")
