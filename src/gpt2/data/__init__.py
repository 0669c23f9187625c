"""Training data: where text comes from, encoding it to tokens, and drawing training windows.

    from gpt2.data import load_dataset, Sampler, split_validation
    chunks = load_dataset("data/", encoder)              # list of 1-D token arrays
    batch = Sampler(chunks, seed=0).sample_batch(8, 1024)
"""
