"""Training data: where text comes from, encoding it to tokens, and drawing training windows.

    from gpt2.data.dataset import load_dataset
    from gpt2.data.sampler import Sampler
    from gpt2.data.splits import split_validation

    chunks = load_dataset("data/", encoder)              # TokenChunks: a sequence of 1-D token
                                                         # views over memory-mapped .bin files
    batch = Sampler(chunks, seed=0).sample_batch(8, 1024)   # int64 [8, 1024]
    train, valid, message = split_validation(chunks, 0.05)
    encode_to_bin("corpus/", "corpus.bin", encoder)      # gpt2.data.write: text -> .bin shards

The modules: ``sources`` (which files a path names, the documents of each file kind),
``encode`` (cutting text into pieces, the worker pool), ``write`` (``encode_to_bin``,
``encode_corpus``: text -> ``.bin`` + index), ``tokens`` (``.bin``/``.npz`` files as
``TokenChunks``), ``dataset`` (``load_dataset`` and its content-hash cache), ``sampler``
(training and validation windows), ``splits`` (train/valid/test folders, held-out tokens).
"""
