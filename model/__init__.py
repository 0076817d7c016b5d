"""The decoder: layers, KV cache, checkpoint loading, tokenizer, sampling.

Imported by the worker side (and the MTP head trainer) only; the daemon stays light.
"""
