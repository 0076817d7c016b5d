"""The decoder: layers, KV cache, checkpoint loading, tokenizer, sampling.

The worker side (and the MTP head trainer) runs it. The daemon holds no tensors; it reads
the model's config and tokenizer through the checkpoint readers, and the torch-free
modules (config, errors, sampling parameters, tokenizer) at import.
"""
