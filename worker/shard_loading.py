"""Loading one worker's shard: its layers' tensors from the checkpoint, quantized and
packed for the kernels, and on the tail the MTP head."""

from __future__ import annotations

from pathlib import Path

import torch

from mtpd.model.checkpoint import Checkpoint
from mtpd.model.config import ModelConfig
from mtpd.model.decoder import DecoderShard, ShardSpec
from mtpd.model.layers import pack_for_inference
from mtpd.model.mtp import MTPHead, check_head_base, read_checkpoint_head, read_head_file
from mtpd.model.quant import Int8Linear, quantize_head, quantize_linears

# The KV cache's element types beside "auto" (the CPU kernels read float16 and int8).
KV_CACHE_DTYPES = {"float16": torch.float16, "int8": torch.int8}
KV_CACHE_CHOICES = ("auto", *KV_CACHE_DTYPES)


def load_shard(
    ckpt: Checkpoint,
    cfg: ModelConfig,
    spec: ShardSpec,
    dtype: torch.dtype,
    max_context: int,
    device: torch.device,
    mtp_head: Path | None = None,
    checkpoint_mtp: bool = False,
    quant: str = "none",
    kv_cache: str = "auto",
) -> tuple[DecoderShard, MTPHead | None]:
    """Load a shard in its fastest inference layout (its linear layers quantized with
    `quant`, its KV cache held as `kv_cache` says), and on the tail an MTP head: from
    `mtp_head`, else with `checkpoint_mtp` the checkpoint's own MTP layer if any."""
    if kv_cache not in KV_CACHE_CHOICES:
        raise ValueError(
            f"unknown KV cache type {kv_cache!r}: one of {', '.join(KV_CACHE_CHOICES)}"
        )
    max_context = min(max_context, cfg.max_position_embeddings)
    shard = DecoderShard.load(ckpt, cfg, spec, dtype, max_context, device)
    tensors = None
    if mtp_head is not None:
        tensors, metadata = read_head_file(mtp_head)
        check_head_base(metadata, shard.fingerprint, mtp_head)
    elif checkpoint_mtp:
        tensors = read_checkpoint_head(ckpt, cfg)
    mtp = None
    if tensors is not None:
        # Built before packing: the draft head copies rows of the dense LM head.
        mtp = MTPHead(cfg, tensors, shard.embedding, shard.lm_head, max_context, dtype)
        shard.set_taps(mtp.tap_layers)
    dense_head = shard.lm_head
    if mtp is not None and mtp.draft_ids is not None:
        dense_head.pack_order = draft_rows_first(mtp.draft_ids.cpu(), dense_head.weight.shape[0])
    quantize_linears(shard, quant, ckpt.int4_blocks, ckpt.stored_at_8_bits)
    if mtp is not None and mtp.draft_head is dense_head:
        mtp.draft_head = shard.lm_head  # drafting over the full vocabulary: the trunk's head
    elif mtp is not None and isinstance(shard.lm_head, Int8Linear) and shard.lm_head.lends_rows:
        # Quantization packed the LM head on the int8 kernel in that order (float32 on the
        # CPU, under --quant int8, or int4 where the LM head stays at 8 bits): the head's
        # draft rows, read where the LM head holds them, not a copy of its own
        # (4.7 MB for the default model's 8,192 rows). The same bits: a row's int8
        # rounding does not depend on the other rows, and the LM head still writes each
        # token's logit to its own column.
        mtp.draft_head = shard.lm_head.leading(mtp.draft_vocab_size)
    pack_for_inference(shard)
    if kv_cache == "auto":
        if quant != "none":  # the weights already trade exactness: the cache follows llama.cpp's
            shard.stack.use_kernel_cache(torch.float16)
    elif not shard.stack.use_kernel_cache(KV_CACHE_DTYPES[kv_cache]):
        raise ValueError(
            f"--kv-cache {kv_cache} needs the CPU kernels to run every layer (a CPU worker, "
            "float32 activations, attention layers only)"
        )
    if mtp is not None:
        quantize_head(mtp)
        pack_for_inference(mtp)
        if shard.stack.kernel_cache is not None:
            # The head's cache as the trunk's: its drafts only move the speed, and at
            # 16 sequences of 2,048 positions a float32 one took 50 MB beside 9 MB of head.
            mtp.stack.use_kernel_cache(shard.stack.kernel_cache)
    return shard, mtp


def draft_rows_first(draft_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """An LM head's row order with the draft vocabulary's rows first, the rest after in
    their own order."""
    rest = torch.ones(rows, dtype=torch.bool)
    rest[draft_ids] = False
    return torch.cat([draft_ids, rest.nonzero().flatten()])
