"""Model formats, above the model and the tokenizers: model directories of every layout (ours,
Hugging Face's, OpenAI's release), the exports other engines run (GGUF, ONNX), and the one way
to load a model for inference.

    from gpt2.io.model_dir import load_model, save_model
    from gpt2.io.inference import load_for_inference
    from gpt2.io.hf import export_huggingface
"""
