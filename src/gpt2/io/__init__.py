"""Files in and out: model directories of every layout, atomic writes, downloads.

    from gpt2.io.model_dir import load_model, save_model
    from gpt2.io.atomic import atomic_write
"""
