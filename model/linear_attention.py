"""Gated DeltaNet, the linear attention of Qwen3.5/3.6: a short causal convolution over
the q, k, v projections, then the gated delta rule (`delta_rule`) over each sequence's
recurrent state, then a gated RMSNorm and the output projection."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mtpd.model.config import ModelConfig
from mtpd.model.layers import Linear, _fused
from mtpd.model.linear_state import HybridCache, LinearStates
from mtpd.model.step_layout import BatchLayout


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's output, scaled by silu of the gate (weight not
    zero-centred, unlike the model's other norms)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return (self.weight * h * F.silu(gate.float())).to(x.dtype)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    # The reference's (and flash-linear-attention's) epsilon placement.
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, t: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        dims = cfg.linear_attention
        self.dims = dims
        # One matmul for the four input projections reads the input once.
        self.in_proj = Linear(
            _fused(t, [f"{prefix}.in_proj_{p}.weight" for p in ["qkv", "z", "b", "a"]])
        )
        self.split = [dims.conv_dim, dims.value_dim, dims.num_value_heads, dims.num_value_heads]
        # [C, 1, K] taps, in float32: the convolution accumulates in float32 whatever the
        # activations' dtype, as a convolution kernel does.
        self.conv = nn.Parameter(t[f"{prefix}.conv1d.weight"].float(), requires_grad=False)
        self.dt_bias = nn.Parameter(t[f"{prefix}.dt_bias"], requires_grad=False)
        # -exp(A_log) in float32, as the reference computes it at every step.
        self.neg_rate = nn.Parameter(-t[f"{prefix}.A_log"].float().exp(), requires_grad=False)
        self.norm = GatedRMSNorm(t[f"{prefix}.norm.weight"], cfg.rms_norm_eps)
        self.out = Linear(t[f"{prefix}.out_proj.weight"])

    def forward(
        self, x: torch.Tensor, layout: BatchLayout, cache: HybridCache, layer: int
    ) -> torch.Tensor:
        n = x.shape[0]
        dims = self.dims
        mixed, z, b, a = self.in_proj(x).split(self.split, dim=-1)
        beta = b.sigmoid().float()
        g = self.neg_rate * F.softplus(a.float() + self.dt_bias)
        core = torch.empty(
            n, dims.num_value_heads, dims.value_head_dim, dtype=torch.float32, device=x.device
        )
        offset = 0
        for slot, count in zip(layout.slots, layout.counts, strict=True):
            rows = slice(offset, offset + count)
            core[rows] = self._sequence(cache.linear, layer, slot, mixed[rows], g[rows], beta[rows])
            offset += count
        heads = z.view(n, dims.num_value_heads, dims.value_head_dim)
        return self.out(self.norm(core.to(x.dtype), heads).view(n, dims.value_dim))

    def _sequence(
        self,
        states: LinearStates,
        layer: int,
        slot: int,
        mixed: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
    ) -> torch.Tensor:
        """One sequence's T new positions: mixed [T, conv_dim] projections before the
        convolution, g and beta [T, value heads]. Returns the delta rule's outputs."""
        dims = self.dims
        window = states.conv_window(layer, slot)
        inputs = torch.cat([window, mixed.T.to(window.dtype)], dim=1)  # [C, K - 1 + T]
        # Depthwise: each channel's last `kernel` inputs times its own taps. Written out
        # rather than F.conv1d, whose oneDNN path costs milliseconds at these sizes on CPU.
        taps = inputs.unfold(1, self.conv.shape[-1], 1)  # [C, T, K]
        conv = F.silu((taps.float() * self.conv).sum(-1).to(inputs.dtype)).T
        q, k, v = conv.float().split([dims.key_dim, dims.key_dim, dims.value_dim], dim=-1)
        t = conv.shape[0]
        repeat = dims.num_value_heads // dims.num_key_heads
        q, k = (
            _l2norm(z.reshape(t, dims.num_key_heads, dims.key_head_dim)).repeat_interleave(
                repeat, dim=1
            )
            for z in (q, k)
        )
        q = q * dims.key_head_dim**-0.5
        v = v.reshape(t, dims.num_value_heads, dims.value_head_dim)
        return states.advance(layer, slot, inputs, q, k, v, g, beta)
