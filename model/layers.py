"""Decoder building blocks shared by the trunk and the MTP head.

Every block is built from already-loaded tensors (no random init, no copy), and runs
on a flat batch: the new tokens of all sequences in a step stacked as [N, hidden], so
each weight is read once per step whatever the batch holds.

Over 400 lines on purpose: the blocks (norm, linear, attention, MLP, layer, stack) pack
themselves for the CPU kernels together (`pack_for_inference`) and each builds on the
ones before it; apart, attention and the rest would import each other. A step's row
layouts are in `step_layout.py`, the kernels in `cpu_kernels.py`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mtpd.model import cpu_kernels
from mtpd.model.config import ModelConfig
from mtpd.model.kv_cache import KVCache, positions_held, vector_bytes
from mtpd.model.rope import rope_tables
from mtpd.model.step_layout import BatchLayout, PaddedLayout, padded_rows


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.on_kernel = False  # inference on cpu_kernels' RMSNorm

    def pack(self) -> None:
        self.on_kernel = cpu_kernels.available_for(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_kernel:
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 whatever the storage dtype and scale after casting back,
        # as the reference does; F.rms_norm does the normalising in one kernel.
        h = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return h.to(x.dtype) * self.weight


class Linear(nn.Module):
    """y = x W^T + b, with W stored as [out_features, in_features].

    On CPU, `pack()` puts a float32 layer on the AVX2 kernel of cpu_kernels.py (plain
    weights, read at the memory's bandwidth; a few rows cost little more than one), else
    reorders its weight into oneDNN's blocked layout once, at load: that streams weights
    ~1.5x faster than a plain matmul at one row.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        sources: tuple[str, ...] = (),
        quantizable: bool = True,
    ) -> None:
        super().__init__()
        # The checkpoint tensors the weight was built from (fused in this order): what
        # quantization reads exact blocks from, when the file stores them quantized.
        self.sources = sources
        self.quantizable = quantizable
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.packed = False  # in an inference-only layout (no gradients)
        self.matrix: cpu_kernels.Matrix | None = None  # packed for cpu_kernels, else oneDNN
        # Where quantized to int8 on the kernels: the rows packed in this order, so that
        # another layer can read the first of them (Int8Linear.leading).
        self.pack_order: torch.Tensor | None = None

    @property
    def on_kernel(self) -> bool:
        return self.matrix is not None

    def pack(self) -> None:
        if self.packed or self.weight.device.type != "cpu" or self.weight.dtype != torch.float32:
            return
        if cpu_kernels.available_for(self.weight):
            self.matrix = cpu_kernels.Matrix.f32(self.weight, self.bias)
            self.packed = True
        elif torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            del self.weight
            self.register_buffer("weight", packed, persistent=False)
            self.packed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            return self.matrix(x)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def pack_for_inference(module: nn.Module) -> None:
    """Put every block of `module` on its fastest inference path: linear layers in their
    fastest layout, and on CPU norms, attention, SwiGLU and whole decoder layers on
    cpu_kernels (inference only: packed weights take no gradients, and are not to be
    changed afterwards: the kernels hold pointers to them)."""
    # Parts before the blocks made of them: a module follows its parent in modules().
    for m in reversed(list(module.modules())):
        if isinstance(m, (Linear, RMSNorm, Attention, MLP, DecoderLayer)):
            m.pack()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x*cos + rotate_half(x)*sin, with rotate_half(x) = [-x2, x1]
    written as roll(x) * [-sin, sin] (bit-identical, fewer kernels).
    x: [N, heads, head_dim]; cos/sin_signed: [N, 1, head_dim]."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, -1), sin_signed)


def _fused(tensors: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor | None:
    parts = [tensors.get(n) for n in names]
    if all(p is None for p in parts):
        return None
    return torch.cat(parts, dim=0)


class Attention(nn.Module):
    norm_class: type[nn.Module] = RMSNorm  # of q_norm and k_norm

    def __init__(self, cfg: ModelConfig, prefix: str, t: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.rotary_dim = cfg.rotary_dim
        self.on_kernel = False  # float32 CPU steps attend on cpu_kernels' attention
        projections = [f"{prefix}.{p}_proj" for p in "qkv"]
        # One fused matmul for q, k and v reads the input once and amortises dispatch.
        weights = [f"{p}.weight" for p in projections]
        self.qkv = Linear(
            _fused(t, weights), _fused(t, [f"{p}.bias" for p in projections]), tuple(weights)
        )
        o = f"{prefix}.o_proj.weight"
        self.o = Linear(t[o], t.get(f"{prefix}.o_proj.bias"), (o,))
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = self.norm_class(t[f"{prefix}.q_norm.weight"], cfg.rms_norm_eps)
            self.k_norm = self.norm_class(t[f"{prefix}.k_norm.weight"], cfg.rms_norm_eps)

    def pack(self) -> None:
        # The kernel applies RoPE over whole heads, without q/k norms in between.
        self.on_kernel = (
            self.o.weight.device.type == "cpu"
            and self.q_norm is None
            and self.rotary_dim == self.head_dim
            and cpu_kernels.attention_available_for(self.head_dim)
        )

    def _project(
        self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [.., heads, d], k and v [.., kv_heads, d] for rows x [.., hidden], RoPE applied."""
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        lead = x.shape[:-1]
        qkv = self.qkv(x)
        q_size, kv_size = heads * d, kv_heads * d
        # q and k side by side in one view, so RoPE runs once over both.
        qk = qkv[..., : q_size + kv_size].view(*lead, heads + kv_heads, d)
        v = qkv[..., q_size + kv_size :].view(*lead, kv_heads, d)
        if self.q_norm is not None:
            qk = torch.cat(
                [self.q_norm(qk[..., :heads, :]), self.k_norm(qk[..., heads:, :])], dim=-2
            )
        qk = _apply_rope(qk, cos, sin_signed)
        return qk[..., :heads, :], qk[..., heads:, :], v

    def forward_causal(
        self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
    ) -> torch.Tensor:
        """Whole sequences without a cache (training): x [B, T, hidden], position i of
        every row at rotary position i."""
        b, t, _ = x.shape
        q, k, v = (z.transpose(1, 2) for z in self._project(x, cos, sin_signed))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(o.transpose(1, 2).reshape(b, t, -1))

    def forward(
        self, x: torch.Tensor, layout: BatchLayout, cache: KVCache, layer: int
    ) -> torch.Tensor:
        if (
            self.on_kernel
            and isinstance(layout, BatchLayout)
            and x.dtype == cache.k.dtype == torch.float32  # pack() saw CPU weights
        ):
            return self.o(self._attend_on_kernel(self.qkv(x), layout, cache, layer))
        q, k, v = self._project(x, layout.cos, layout.sin_signed)
        attend = self._attend_padded if isinstance(layout, PaddedLayout) else self._attend_rows
        return self.o(attend(q, k, v, layout, cache, layer))

    def _attend_padded(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: PaddedLayout,
        cache: KVCache,
        layer: int,
    ) -> torch.Tensor:
        """All sequences at once: write the new k/v at their positions, then attend over
        each slot's first `context` keys under the causal mask. [B * T, heads * d]"""
        b, t = layout.positions.shape
        heads, d = self.num_heads, self.head_dim
        layer_k, layer_v = cache.k[layer], cache.v[layer]  # [slots, kv_heads, context, d]
        rows = layout.slots[:, None].expand(b, t)
        # Advanced indices around a slice put their dims first: [B, T, kv_heads, d].
        layer_k[rows, :, layout.positions] = k.view(b, t, -1, d).to(layer_k.dtype)
        layer_v[rows, :, layout.positions] = v.view(b, t, -1, d).to(layer_v.dtype)
        o = F.scaled_dot_product_attention(
            q.view(b, t, heads, d).transpose(1, 2).to(layer_k.dtype),
            layer_k[layout.slots, :, : layout.context],
            layer_v[layout.slots, :, : layout.context],
            attn_mask=layout.mask,
            enable_gqa=True,
        )
        return o.transpose(1, 2).reshape(b * t, heads * d).to(k.dtype)

    def _attend_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: BatchLayout,
        cache: KVCache,
        layer: int,
    ) -> torch.Tensor:
        """Every sequence's rows attended over its own cache slot: [N, heads * head_dim]."""
        n = q.shape[0]
        q_size = self.num_heads * self.head_dim
        heads, d = self.num_heads, self.head_dim
        if len(layout.slots) == 1:
            o = self._attend(q, k, v, layout.slots[0], layout.starts[0], cache, layer)
            return o.transpose(0, 1).reshape(n, q_size)
        out = torch.empty(n, heads, d, dtype=q.dtype, device=q.device)
        offset = 0
        for slot, start, count in zip(layout.slots, layout.starts, layout.counts, strict=True):
            rows = slice(offset, offset + count)
            out[rows] = self._attend(
                q[rows], k[rows], v[rows], slot, start, cache, layer
            ).transpose(0, 1)
            offset += count
        return out.view(n, q_size)

    def _attend_on_kernel(
        self, qkv: torch.Tensor, layout: BatchLayout, cache: KVCache, layer: int
    ) -> torch.Tensor:
        """_project and _attend_rows in one kernel call per sequence: [N, heads * d]."""
        n = qkv.shape[0]
        out = torch.empty(n, self.num_heads * self.head_dim, dtype=torch.float32)
        cos, sin_signed = layout.cos.view(n, -1), layout.sin_signed.view(n, -1)
        offset = 0
        for slot, start, count in zip(layout.slots, layout.starts, layout.counts, strict=True):
            # One sequence (a decode step) takes the tensors whole: slicing costs more.
            rows = slice(offset, offset + count) if count < n else slice(None)
            cpu_kernels.attend(
                qkv[rows],
                cos[rows],
                sin_signed[rows],
                cache.k_slot(layer, slot),
                cache.v_slot(layer, slot),
                out[rows],
                start,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim**-0.5,
            )
            offset += count
        return out

    @staticmethod
    def _attend(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot: int,
        start: int,
        cache: KVCache,
        layer: int,
    ) -> torch.Tensor:
        """Append one sequence's new k/v to its cache slot and attend over the slot.
        q: [T, heads, d], k/v: [T, kv_heads, d]; returns [heads, T, d]."""
        count = q.shape[0]
        end = start + count
        slot_k, slot_v = cache.k_slot(layer, slot), cache.v_slot(layer, slot)
        q = q.to(slot_k.dtype)
        slot_k[:, start:end] = k.transpose(0, 1)
        slot_v[:, start:end] = v.transpose(0, 1)
        mask = None
        if count > 1:
            # New token j sits at position start + j and sees keys up to there.
            rows = torch.arange(start, end, device=q.device)[:, None]
            mask = torch.arange(end, device=q.device)[None, :] <= rows
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            slot_k[None, :, :end],
            slot_v[None, :, :end],
            attn_mask=mask,
            enable_gqa=True,
        )
        return o[0].to(k.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, t: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        # From the weights: the same block serves as an MoE expert or shared expert.
        self.intermediate = t[f"{prefix}.down_proj.weight"].shape[1]
        names = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        weights = [f"{p}.weight" for p in names]
        self.gate_up = Linear(
            _fused(t, weights), _fused(t, [f"{p}.bias" for p in names]), tuple(weights)
        )
        down = f"{prefix}.down_proj.weight"
        self.down = Linear(t[down], t.get(f"{prefix}.down_proj.bias"), (down,))
        self.on_kernel = False  # float32 CPU inputs take cpu_kernels' SwiGLU

    def pack(self) -> None:
        self.on_kernel = self.down.weight.device.type == "cpu" and cpu_kernels.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_kernel and x.dtype == torch.float32:  # pack() saw CPU weights
            return self.down(cpu_kernels.silu_mul(self.gate_up(x)))
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """A pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). `attn` is
    the token mixer (attention, or linear attention in hybrid models)."""

    def __init__(
        self, input_norm: nn.Module, attn: nn.Module, post_attn_norm: nn.Module, mlp: nn.Module
    ) -> None:
        super().__init__()
        self.input_norm, self.attn, self.post_attn_norm, self.mlp = (
            input_norm,
            attn,
            post_attn_norm,
            mlp,
        )
        self.kernel: cpu_kernels.Layer | None = None  # the whole layer as one kernel call

    @classmethod
    def load(cls, cfg: ModelConfig, prefix: str, t: Mapping[str, torch.Tensor]) -> DecoderLayer:
        eps = cfg.rms_norm_eps
        return cls(
            RMSNorm(t[f"{prefix}.input_layernorm.weight"], eps),
            Attention(cfg, f"{prefix}.self_attn", t),
            RMSNorm(t[f"{prefix}.post_attention_layernorm.weight"], eps),
            MLP(cfg, f"{prefix}.mlp", t),
        )

    def pack(self) -> None:
        # After its parts (pack_for_inference): on the kernels as a whole when each part
        # is. A layer call then costs one Python call instead of some twenty.
        attn, mlp, norms = self.attn, self.mlp, (self.input_norm, self.post_attn_norm)
        if not (
            type(attn) is Attention  # not a subclass with its own forward
            and type(mlp) is MLP
            and attn.on_kernel
            and mlp.on_kernel
            and all(type(n) is RMSNorm and n.on_kernel and n.eps == norms[0].eps for n in norms)
        ):
            return
        linears = (attn.qkv, attn.o, mlp.gate_up, mlp.down)
        if all(getattr(m, "matrix", None) is not None for m in linears):
            self.kernel = cpu_kernels.Layer.of(
                (norms[0].weight, norms[1].weight),
                norms[0].eps,
                tuple(m.matrix for m in linears),
                attn.num_heads,
                attn.num_kv_heads,
                attn.head_dim,
            )

    def forward(
        self, x: torch.Tensor, layout: BatchLayout, cache: KVCache, layer: int
    ) -> torch.Tensor:
        if (
            self.kernel is not None
            and isinstance(layout, BatchLayout)
            and x.dtype == cache.k.dtype == torch.float32
        ):
            alone = cpu_kernels.Layers([self.kernel])  # where the stack's others are not on kernels
            return cpu_kernels.decoder_layers(alone, layout.kernel_step(cache), layer, x)
        x = x + self.attn(self.input_norm(x), layout, cache, layer)
        return x + self.mlp(self.post_attn_norm(x))

    def forward_causal(
        self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn.forward_causal(self.input_norm(x), cos, sin_signed)
        return x + self.mlp(self.post_attn_norm(x))


def layer_tensor_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a decoder layer needs (optional biases included only when expected)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.input_layernorm.weight": (h,),
        f"{prefix}.post_attention_layernorm.weight": (h,),
        f"{prefix}.self_attn.q_proj.weight": (q, h),
        f"{prefix}.self_attn.k_proj.weight": (kv, h),
        f"{prefix}.self_attn.v_proj.weight": (kv, h),
        f"{prefix}.self_attn.o_proj.weight": (h, q),
        f"{prefix}.mlp.gate_proj.weight": (cfg.intermediate_size, h),
        f"{prefix}.mlp.up_proj.weight": (cfg.intermediate_size, h),
        f"{prefix}.mlp.down_proj.weight": (h, cfg.intermediate_size),
    }
    if cfg.attention_bias:
        for p, size in (("q", q), ("k", kv), ("v", kv)):
            shapes[f"{prefix}.self_attn.{p}_proj.bias"] = (size,)
    if cfg.o_proj_bias:
        shapes[f"{prefix}.self_attn.o_proj.bias"] = (h,)
    if cfg.mlp_bias:
        shapes[f"{prefix}.mlp.gate_proj.bias"] = (cfg.intermediate_size,)
        shapes[f"{prefix}.mlp.up_proj.bias"] = (cfg.intermediate_size,)
        shapes[f"{prefix}.mlp.down_proj.bias"] = (h,)
    if cfg.qk_norm:
        shapes[f"{prefix}.self_attn.q_norm.weight"] = (d,)
        shapes[f"{prefix}.self_attn.k_norm.weight"] = (d,)
    return shapes


class LayerStack(nn.Module):
    """Consecutive decoder layers with their rotary tables: the part of the trunk (or of
    the MTP head) that owns a KV cache."""

    def __init__(
        self,
        cfg: ModelConfig,
        prefixes: list[str],
        t: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        max_context: int,
    ) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.layers = nn.ModuleList(self.build_layer(cfg, p, t) for p in prefixes)
        device = next(iter(t.values())).device
        cos, sin = rope_tables(cfg, max_context)
        sin[:, : sin.shape[-1] // 2].neg_()  # the form _apply_rope takes
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin_signed", sin.to(device), persistent=False)
        self.kernel_cache: torch.dtype | None = None  # see use_kernel_cache
        # Stack-local layers whose input (the residual stream there) a step's output also
        # carries: the trunk features a fused MTP head reads (DecoderShard.set_taps).
        self.taps: tuple[int, ...] = ()
        self._one_call: cpu_kernels.Layers | None = None  # see one_call_layers

    @staticmethod
    def build_layer(cfg: ModelConfig, prefix: str, t: Mapping[str, torch.Tensor]) -> nn.Module:
        return DecoderLayer.load(cfg, prefix, t)

    @property
    def max_context(self) -> int:
        return self.cos.shape[0]

    @property
    def cache_dtype(self) -> torch.dtype:
        # Attention on CPU runs in float32 (SDPA is several times slower in bfloat16
        # there), over a float16 or int8 cache where the kernels run every layer.
        if self.kernel_cache is not None:
            return self.kernel_cache
        return torch.float32 if self.cos.device.type == "cpu" else self.dtype

    def use_kernel_cache(self, dtype: torch.dtype) -> bool:
        """Hold the KV cache in `dtype`, float16 or int8 (a float32 scale per KV_GROUP
        values beside it), if the CPU kernels run every layer (only they read it); returns
        whether they do. At 8 streams of 200 positions a float32 cache is 74 MB for
        SmolLM2, against its 95 MB of int4 weights: attention was half a step."""
        if all(getattr(layer, "kernel", None) is not None for layer in self.layers):
            self.kernel_cache = dtype
        return self.kernel_cache == dtype

    def cache_bytes_per_slot(self, max_context: int, snapshots: int = 0) -> int:
        """What one sequence's slot of `new_cache` holds. `snapshots` (saved recurrent
        states, for prefix caching) cost attention layers nothing: a KV cache is cut at
        any position."""
        cfg = self.cfg
        positions = positions_held(self.cache_dtype, max_context)
        vectors = len(self.layers) * 2 * cfg.num_kv_heads * positions
        return vectors * vector_bytes(self.cache_dtype, cfg.head_dim)

    def new_cache(
        self,
        max_seqs: int,
        max_context: int | None = None,
        scratch_slot: bool = False,
        snapshots: int = 0,
    ) -> KVCache:
        return KVCache(
            len(self.layers),
            max_seqs,
            max_context or self.max_context,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            self.cache_dtype,
            self.cos.device,
            scratch_slot,
        )

    def forward_causal(self, h: torch.Tensor) -> torch.Tensor:
        """Whole sequences h [B, T, hidden] without a cache (training)."""
        t = h.shape[1]
        cos, sin = self.cos[:t, None].to(h.dtype), self.sin_signed[:t, None].to(h.dtype)
        for layer in self.layers:
            h = layer.forward_causal(h, cos, sin)
        return h

    def forward(
        self, h: torch.Tensor, cache: KVCache, slots: list[int], counts: list[int]
    ) -> torch.Tensor:
        # On a GPU the per-sequence path launches an attention call per sequence per
        # layer, which bounds a step of many sequences (train-mtp continues 256 at once);
        # the padded step makes it one per layer. The CPU keeps the per-sequence path,
        # which is as fast there (docs/gpu.md).
        if h.device.type == "cuda" and len(slots) > 1:
            padded = self.forward_as_padded(h, cache, slots, counts)
            if padded is not None:
                return padded
        layout = BatchLayout.build(cache, slots, counts, self.cos, self.sin_signed, self.dtype)
        h = self.run_layers(h, layout, cache)
        cache.commit(layout.slots, layout.starts, layout.counts)
        return h

    def forward_as_padded(
        self, h: torch.Tensor, cache: KVCache, slots: list[int], counts: list[int]
    ) -> torch.Tensor | None:
        """forward() run as one padded step (PaddedLayout): every sequence padded to the
        most rows any brings. None when a sequence's padding rows would not fit its slot."""
        rows = max(counts)
        starts = [cache.reserve(s, c) for s, c in zip(slots, counts, strict=True)]
        if max(starts) + rows > cache.max_context:
            return None
        device = h.device
        layout = PaddedLayout.build(
            torch.tensor(slots, device=device),
            torch.tensor(starts, device=device),
            rows,
            max(starts) + rows,
            self.cos,
            self.sin_signed,
            self.dtype,
        )
        real = None
        if min(counts) < rows:
            real = padded_rows(counts, rows, device)
            h = h.new_zeros(len(slots) * rows, *h.shape[1:]).index_copy_(0, real, h)
        h = self.run_layers(h, layout, cache)
        cache.commit(slots, starts, counts)
        return h if real is None else h.index_select(0, real)

    def one_call_layers(self, dtype: torch.dtype, cache: KVCache) -> cpu_kernels.Layers | None:
        """The layers' kernels where a flat step of `dtype` rows over `cache` runs every
        layer in one kernel call (cpu_kernels.decoder_layers), else None."""
        if dtype != torch.float32 or cache.k.dtype not in cpu_kernels.KV_FORMATS:
            return None
        kernels = [getattr(layer, "kernel", None) for layer in self.layers]
        if any(k is None for k in kernels):
            return None
        held = self._one_call
        if (
            held is None
            or len(held.layers) != len(kernels)
            or any(a is not b for a, b in zip(held.layers, kernels, strict=True))
        ):
            held = self._one_call = cpu_kernels.Layers(kernels)  # made again if one changed
        return held

    def run_layers(
        self, h: torch.Tensor, layout: BatchLayout | PaddedLayout, cache: KVCache
    ) -> torch.Tensor:
        """The layers' output, followed (with `taps`) by the residual stream going into
        each tapped layer, side by side: [rows, hidden * (1 + len(taps))]."""
        kernels = self.one_call_layers(h.dtype, cache) if isinstance(layout, BatchLayout) else None
        if kernels is not None:
            return cpu_kernels.decoder_layers(kernels, layout.kernel_step(cache), 0, h, self.taps)
        tapped = []
        for i, layer in enumerate(self.layers):
            if i in self.taps:
                tapped.append(h)
            h = layer(h, layout, cache, i)
        return torch.cat([h, *tapped], -1) if tapped else h
