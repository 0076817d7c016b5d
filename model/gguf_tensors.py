"""A GGUF file's tensors decoded into torch: Q4_0/Q4_1 and Q8_0 blocks taken apart (or
repacked as int4 groups), anything else through gguf's dequantization. Apart from
`gguf_checkpoint` so that reading a GGUF file's metadata, tokenizer and stored bytes
(what the daemon does) imports no torch."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from mtpd.model.quant import Int4Weight

Q4_KINDS = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def _q4_blocks(
    data: np.ndarray, kind: GGMLQuantizationType
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Q4_0 / Q4_1 blocks taken apart: the 4-bit values q [rows, columns], and per block
    of 32 its scale d and, for Q4_1, its minimum m (float32). A block is d (float16), for
    Q4_1 m (float16), then 16 bytes of nibbles: element j in byte j's low half, element
    j + 16 in its high half."""
    header = 2 if kind == GGMLQuantizationType.Q4_0 else 4
    blocks = _blocks(data, header + 16)
    rows = blocks.shape[0]
    d = _float16_field(blocks, 0)
    nibbles = blocks[..., header:]
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(rows, -1)
    return q, d, None if kind == GGMLQuantizationType.Q4_0 else _float16_field(blocks, 2)


def _blocks(data: np.ndarray, size: int) -> torch.Tensor:
    """A quantized tensor's bytes [rows, bytes] as [rows, blocks, size]. They are the
    file's read-only mapping, which torch cannot mark so (it warns): only read here, and
    every result made from them is a new tensor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(data).view(data.shape[0], -1, size)


def _float16_field(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of every block, as float32 [rows, blocks]."""
    return blocks[..., at : at + 2].contiguous().view(torch.float16)[..., 0].float()


def q4_groups(data: np.ndarray, kind: GGMLQuantizationType) -> Int4Weight:
    """Q4_0 means (q - 8) * d; Q4_1 means q * d + m, which is (q - 8) * d + (m + 8d)."""
    q, d, m = _q4_blocks(data, kind)
    return Int4Weight(q, d, torch.zeros_like(d) if m is None else m + 8 * d)


def _q4_dequantized(data: np.ndarray, kind: GGMLQuantizationType) -> torch.Tensor:
    """gguf's dequantization with its very float32 operations (d * (q - 8) for Q4_0,
    d * q + m for Q4_1, each rounded on its own), but in torch: several times faster than
    gguf's numpy, which took half of a worker's load."""
    q, d, m = _q4_blocks(data, kind)
    rows = q.shape[0]
    values = q.reshape(rows, d.shape[1], -1).float()  # in place from here: fewer page faults
    if m is None:
        return values.sub_(8).mul_(d[..., None]).reshape(rows, -1)
    return values.mul_(d[..., None]).add_(m[..., None]).reshape(rows, -1)


def _q8_dequantized(data: np.ndarray) -> torch.Tensor:
    """Q8_0: blocks of a float16 scale d and 32 int8 values x, meaning d * x (as gguf)."""
    blocks = _blocks(data, 34)
    x = blocks[..., 2:].contiguous().view(torch.int8).float()
    return x.mul_(_float16_field(blocks, 0)[..., None]).reshape(blocks.shape[0], -1)


def dequantized(data: np.ndarray, kind: GGMLQuantizationType) -> torch.Tensor:
    """A tensor's stored data as float32 (its file layout: rows as llama.cpp keeps them)."""
    if data.ndim == 2 and kind in Q4_KINDS:
        return _q4_dequantized(data, kind)
    if data.ndim == 2 and kind == GGMLQuantizationType.Q8_0:
        return _q8_dequantized(data)
    array = dequantize(data, kind)
    # F32 data comes back as a view of the read-only mapping; torch wants its own copy.
    return torch.from_numpy(array if array.flags.writeable else array.copy()).float()
