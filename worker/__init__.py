"""The compute side: a process that holds a shard of the model's layers and its KV cache."""
