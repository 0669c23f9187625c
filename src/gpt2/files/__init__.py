"""Files, the bottom layer: writing atomically, where model directories are, checksums,
TensorFlow's tensor-bundle checkpoint format, and resumable downloads. It imports nothing of
the package but :mod:`gpt2.errors` (and no torch), so every other layer can use it.

    from gpt2.files.atomic import atomic_write, write_text
    from gpt2.files.paths import find_model_dir
    from gpt2.files.download import download_model
"""
