"""What differs between model families, chosen once from the config: the layers (and
their tensors) a stack is built from, and the RMSNorm the model's norms use."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mtpd.model.config import ModelConfig
from mtpd.model.hybrid import HybridLayerStack, ZeroCenteredRMSNorm, hybrid_layer_tensor_shapes
from mtpd.model.layers import LayerStack, RMSNorm, layer_tensor_shapes


def decoder_layer_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder layer at `prefix` needs, with its shape."""
    if cfg.is_hybrid:
        return hybrid_layer_tensor_shapes(cfg, prefix)
    return layer_tensor_shapes(cfg, prefix)


def layer_stack(
    cfg: ModelConfig,
    prefixes: list[str],
    t: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    max_context: int,
) -> LayerStack:
    cls = HybridLayerStack if cfg.is_hybrid else LayerStack
    return cls(cfg, prefixes, t, dtype, max_context)


def rms_norm(cfg: ModelConfig, weight: torch.Tensor) -> nn.Module:
    """A norm outside the layers (final, MTP): zero-centred in hybrid models."""
    cls = ZeroCenteredRMSNorm if cfg.is_hybrid else RMSNorm
    return cls(weight, cfg.rms_norm_eps)
