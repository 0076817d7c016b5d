"""The sparse mixture-of-experts MLP of Qwen3.5-MoE: each token goes to its top-k
experts, weighted by its router probabilities renormalised over those k, plus a shared
expert scaled by a sigmoid gate. Each expert is an ordinary SwiGLU MLP."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mtpd.model.config import ModelConfig
from mtpd.model.layers import MLP, Linear


def moe_tensor_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    moe, h = cfg.moe, cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.gate.weight": (moe.num_experts, h),
        f"{prefix}.shared_expert_gate.weight": (1, h),
    }
    experts = [
        (f"{prefix}.experts.{e}", moe.expert_intermediate_size) for e in range(moe.num_experts)
    ]
    for p, size in [*experts, (f"{prefix}.shared_expert", moe.shared_expert_intermediate_size)]:
        shapes[f"{p}.gate_proj.weight"] = (size, h)
        shapes[f"{p}.up_proj.weight"] = (size, h)
        shapes[f"{p}.down_proj.weight"] = (h, size)
    return shapes


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, t: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.top_k = cfg.moe.experts_per_token
        # Routing decides which experts run: kept exact under --quant.
        self.router = Linear(t[f"{prefix}.gate.weight"], quantizable=False)
        self.experts = nn.ModuleList(
            MLP(cfg, f"{prefix}.experts.{e}", t) for e in range(cfg.moe.num_experts)
        )
        self.shared_expert = MLP(cfg, f"{prefix}.shared_expert", t)
        self.shared_gate = Linear(t[f"{prefix}.shared_expert_gate.weight"], quantizable=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(logits.dtype)
        out = torch.zeros_like(x)
        # Experts in index order, each on the rows routed to it: the reference's order
        # of accumulation. (One host sync per layer: a GPU wants a grouped matmul here.)
        for e in chosen.unique().tolist():
            rows, rank = torch.where(chosen == e)
            y = self.experts[e](x[rows]) * weights[rows, rank, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out + torch.sigmoid(self.shared_gate(x)) * self.shared_expert(x)
