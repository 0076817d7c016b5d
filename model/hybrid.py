"""The Qwen3.5/3.6 decoder layers: Gated DeltaNet (linear attention) or gated full
attention as the token mixer, a dense or mixture-of-experts MLP, zero-centred RMSNorms
(the scale is 1 + weight), and rotary embedding on part of each head.

The layer stack runs on the same flat step batch as the other families; its cache is
a `HybridCache`: KV for the attention layers, recurrent states for the others.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mtpd.model.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig
from mtpd.model.kv_cache import positions_held, vector_bytes
from mtpd.model.layers import MLP, Attention, DecoderLayer, LayerStack, _apply_rope
from mtpd.model.linear_attention import GatedDeltaNet
from mtpd.model.linear_state import HybridCache, LinearStates
from mtpd.model.moe import SparseMoE, moe_tensor_shapes
from mtpd.model.step_layout import BatchLayout


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm scaled by (1 + weight), computed in float32 as the reference does. The
    scale is kept in float32: 1 + a small weight would lose its digits in bfloat16."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(1.0 + weight.float(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), None, self.eps) * self.scale).to(x.dtype)


class GatedAttention(Attention):
    """Full attention whose q projection also yields a per-channel output gate:
    out = o_proj(attention * sigmoid(gate)); rotary on the first rotary_dim channels."""

    norm_class = ZeroCenteredRMSNorm

    def __init__(self, cfg: ModelConfig, prefix: str, t: Mapping[str, torch.Tensor]) -> None:
        super().__init__(cfg, prefix, t)
        self.rotary_dim = cfg.rotary_dim

    def forward(
        self, x: torch.Tensor, layout: BatchLayout, cache: HybridCache, layer: int
    ) -> torch.Tensor:
        n = x.shape[0]
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)
        # Per head, the query then its gate.
        q_gate = qkv[:, : 2 * heads * d].view(n, heads, 2 * d)
        q, gate = q_gate[..., :d], q_gate[..., d:]
        k = qkv[:, 2 * heads * d : (2 * heads + kv_heads) * d].view(n, kv_heads, d)
        v = qkv[:, (2 * heads + kv_heads) * d :].view(n, kv_heads, d)
        qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        r = self.rotary_dim
        qk = torch.cat(
            [_apply_rope(qk[..., :r], layout.cos, layout.sin_signed), qk[..., r:]], dim=-1
        )
        o = self._attend_rows(qk[:, :heads], qk[:, heads:], v, layout, cache, layer)
        return self.o(o * torch.sigmoid(gate.reshape(n, heads * d)))


def layer_kind(cfg: ModelConfig, prefix: str) -> str:
    """A trunk layer's type from the config; the MTP layer of Qwen3.5 is full attention."""
    trunk = re.fullmatch(r"model\.layers\.(\d+)", prefix)
    return cfg.layer_types[int(trunk.group(1))] if trunk else FULL_ATTENTION


def hybrid_layer_tensor_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.input_layernorm.weight": (h,),
        f"{prefix}.post_attention_layernorm.weight": (h,),
    }
    if layer_kind(cfg, prefix) == LINEAR_ATTENTION:
        la, p = cfg.linear_attention, f"{prefix}.linear_attn"
        heads = la.num_value_heads
        shapes |= {
            f"{p}.in_proj_qkv.weight": (la.conv_dim, h),
            f"{p}.in_proj_z.weight": (la.value_dim, h),
            f"{p}.in_proj_b.weight": (heads, h),
            f"{p}.in_proj_a.weight": (heads, h),
            f"{p}.conv1d.weight": (la.conv_dim, 1, la.conv_kernel),
            f"{p}.dt_bias": (heads,),
            f"{p}.A_log": (heads,),
            f"{p}.norm.weight": (la.value_head_dim,),
            f"{p}.out_proj.weight": (h, la.value_dim),
        }
    else:
        p = f"{prefix}.self_attn"
        q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
        shapes |= {
            f"{p}.q_proj.weight": (2 * q, h),  # the query and its output gate
            f"{p}.k_proj.weight": (kv, h),
            f"{p}.v_proj.weight": (kv, h),
            f"{p}.o_proj.weight": (h, q),
            f"{p}.q_norm.weight": (d,),
            f"{p}.k_norm.weight": (d,),
        }
        if cfg.attention_bias:
            for name, size in (("q", 2 * q), ("k", kv), ("v", kv), ("o", h)):
                shapes[f"{p}.{name}_proj.bias"] = (size,)
    if cfg.moe is not None:
        shapes |= moe_tensor_shapes(cfg, f"{prefix}.mlp")
    else:
        size = cfg.intermediate_size
        shapes |= {
            f"{prefix}.mlp.gate_proj.weight": (size, h),
            f"{prefix}.mlp.up_proj.weight": (size, h),
            f"{prefix}.mlp.down_proj.weight": (h, size),
        }
    return shapes


class HybridLayerStack(LayerStack):
    def __init__(
        self,
        cfg: ModelConfig,
        prefixes: list[str],
        t: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        max_context: int,
    ) -> None:
        super().__init__(cfg, prefixes, t, dtype, max_context)
        # Each layer's index into its kind's cache: attention layers into the KV cache,
        # linear-attention layers into the recurrent states.
        kinds = [layer_kind(cfg, p) for p in prefixes]
        self.num_linear = kinds.count(LINEAR_ATTENTION)
        self.num_attention = len(kinds) - self.num_linear
        seen = {LINEAR_ATTENTION: 0, FULL_ATTENTION: 0}
        self.cache_index = []
        for kind in kinds:
            self.cache_index.append(seen[kind])
            seen[kind] += 1

    @staticmethod
    def build_layer(cfg: ModelConfig, prefix: str, t: Mapping[str, torch.Tensor]) -> nn.Module:
        eps = cfg.rms_norm_eps
        if layer_kind(cfg, prefix) == LINEAR_ATTENTION:
            mixer = GatedDeltaNet(cfg, f"{prefix}.linear_attn", t)
        else:
            mixer = GatedAttention(cfg, f"{prefix}.self_attn", t)
        mlp = SparseMoE(cfg, f"{prefix}.mlp", t) if cfg.moe else MLP(cfg, f"{prefix}.mlp", t)
        return DecoderLayer(
            ZeroCenteredRMSNorm(t[f"{prefix}.input_layernorm.weight"], eps),
            mixer,
            ZeroCenteredRMSNorm(t[f"{prefix}.post_attention_layernorm.weight"], eps),
            mlp,
        )

    def cache_bytes_per_slot(self, max_context: int, snapshots: int = 0) -> int:
        cfg = self.cfg
        positions = positions_held(self.cache_dtype, max_context)
        vectors = self.num_attention * 2 * cfg.num_kv_heads * positions
        linear = LinearStates.bytes_per_slot(
            self.num_linear, cfg.linear_attention, self.dtype, snapshots
        )
        return vectors * vector_bytes(self.cache_dtype, cfg.head_dim) + linear

    def new_cache(
        self,
        max_seqs: int,
        max_context: int | None = None,
        scratch_slot: bool = False,
        snapshots: int = 0,
    ) -> HybridCache:
        if scratch_slot:
            raise ValueError("padded steps (CUDA graphs) cover attention-only layer stacks")
        device = self.cos.device
        linear = None
        if self.num_linear:
            # The convolution window in the activations' dtype, as the reference keeps it.
            dims = self.cfg.linear_attention
            linear = LinearStates(self.num_linear, max_seqs, dims, self.dtype, device, snapshots)
        return HybridCache(
            self.num_attention,
            linear,
            max_seqs,
            max_context or self.max_context,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            self.cache_dtype,
            device,
            snapshots,
        )

    def forward_causal(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("training an MTP head is not supported for hybrid models")

    def forward(
        self, h: torch.Tensor, cache: HybridCache, slots: list[int], counts: list[int]
    ) -> torch.Tensor:
        layout = BatchLayout.build(cache, slots, counts, self.cos, self.sin_signed, self.dtype)
        for layer, index in zip(self.layers, self.cache_index, strict=True):
            h = layer(h, layout, cache, index)
        cache.commit(layout.slots, layout.starts, layout.counts)
        cache.finish_step(layout.slots, layout.starts, layout.counts)
        return h
