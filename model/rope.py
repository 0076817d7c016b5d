"""Rotary position embedding tables for the rope types a config may name.

The formulas follow the reference implementation's (transformers' modeling_rope_utils)
so that logits match it; each returns inverse frequencies and the attention factor
that scales cos and sin (only yarn uses one).
"""

from __future__ import annotations

import math

import torch

from mtpd.model.config import ModelConfig


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    p = cfg.rope_scaling
    base = cfg.rope_theta
    orig_ctx = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / orig_ctx

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_tables(cfg: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [max_positions, rotary_dim] in float32 (rotate-half layout);
    the rotary dimension is the whole head unless the model rotates only part of it."""
    dim = cfg.rotary_dim
    attention_factor = 1.0
    kind = cfg.rope_type
    if kind == "yarn":
        inv_freq, attention_factor = _yarn(cfg, dim)
    else:
        inv_freq = _default_inv_freq(cfg.rope_theta, dim)
        if kind == "linear":
            inv_freq = inv_freq / cfg.rope_scaling["factor"]
        elif kind == "llama3":
            inv_freq = _llama3(inv_freq, cfg.rope_scaling)
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor
