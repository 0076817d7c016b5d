"""Weight-only quantization of a shard's linear layers (`--quant int8|int4`): the bytes
read per token set decode speed, and these read 1 or 1/2 byte per weight instead of 4.

- int8: one scale per output channel (`_weight_int8pack_mm`).
- int4: groups of 32 input weights with a scale and a zero point
  (`_weight_int4pack_mm`; on CPU its `_for_cpu` twin), w = (q - 8) * scale + zero.

On GPU, and for bfloat16 on CPU, the layers run on those PyTorch packed-weight
operators (as gpt-fast does). For float32 on CPU they run on cpu_kernels' int4 and int8
kernels, 4–20x faster there at one row (`python benchmarks/quant_kernels.py`);
the int4 kernel reads groups as GGUF stores them and rounds each group of 32 inputs to
8 bits first, as llama.cpp does.

GGUF Q4_0 / Q4_1 blocks are exactly such groups, so their weights are repacked, not
dequantized and re-rounded (`GGUFCheckpoint.int4_blocks`); Q8_0's per-block scales do
not fit int8's one scale per row, so those weights are requantized per channel (the
error is what `requantization_error` reports). Activations, norms, attention and the
embedding lookup stay in the model dtype. The MTP head's linear layers take int8 on
float32 CPU whatever `--quant` says (`quantize_head`): a draft only proposes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtpd.model import cpu_kernels
from mtpd.model.errors import ModelLoadError
from mtpd.model.layers import Linear

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 32


def _inner_k_tiles(k: int) -> int:
    """The packed layout's tiling of the input dimension: gpt-fast's 8 where it divides
    (the CUDA kernel needs K to be a multiple of 16 x tiles), else fewer."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


F16_MAX = 65504.0


def _float16(x: torch.Tensor, direction: int) -> torch.Tensor:
    """x rounded to a float16 value, down (direction -1) or up (1)."""
    near = x.half()
    beyond = near.float() < x if direction > 0 else near.float() > x
    step = torch.nextafter(near, torch.full_like(near, direction * float("inf")))
    return torch.where(beyond, step, near).float()


@dataclass
class Int4Weight:
    """w[n, k] = (q[n, k] - 8) * scale[n, k // group] + zero[n, k // group]."""

    q: torch.Tensor  # uint8 in 0..15, [N, K]
    scale: torch.Tensor  # float32 [N, K // group]
    zero: torch.Tensor  # float32 [N, K // group]
    group: int = INT4_GROUP

    @classmethod
    def from_float(cls, w: torch.Tensor, group: int = INT4_GROUP) -> Int4Weight:
        """Round to nearest with each group's minimum and maximum as the ends. The
        minimum and the scale are float16 values, as GGUF's Q4_1 stores them (and the
        CPU kernel reads them)."""
        n, k = w.shape
        g = w.float().reshape(n, k // group, group)
        if not bool(g.abs().amax() <= F16_MAX / 2):  # so a group's span fits float16 too
            raise ModelLoadError("int4 takes weights within float16's range")
        # float16 ends that still hold the group: the minimum rounded down, the scale
        # (at least float16's smallest step) up.
        low = _float16(g.amin(-1), -1)
        scale = _float16(((g.amax(-1) - low) / 15).clamp(min=2**-24), 1)
        q = ((g - low[..., None]) / scale[..., None]).round().clamp(0, 15)
        return cls(q.to(torch.uint8).reshape(n, k), scale, low + 8 * scale, group)

    @classmethod
    def cat(cls, parts: list[Int4Weight]) -> Int4Weight:
        return cls(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            parts[0].group,
        )

    def to(self, device: torch.device) -> Int4Weight:
        return Int4Weight(
            self.q.to(device), self.scale.to(device), self.zero.to(device), self.group
        )

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        g = self.q.float().reshape(n, k // self.group, self.group) - 8
        return (g * self.scale[..., None] + self.zero[..., None]).reshape(n, k)


class Int4Linear(nn.Module):
    def __init__(
        self,
        weight: Int4Weight,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        use_kernel: bool = True,  # False: PyTorch's operator (benchmarks compare them)
    ) -> None:
        super().__init__()
        device = weight.q.device
        self.out_features, self.group = weight.q.shape[0], weight.group
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.matrix: cpu_kernels.Matrix | None = None
        if (
            use_kernel
            and device.type == "cpu"
            and dtype == torch.float32
            and weight.group == 32
            and cpu_kernels.panels_fit(*weight.q.shape)
            and cpu_kernels.available()
        ):
            scales, mins = weight.scale.float(), (weight.zero - 8 * weight.scale).float()
            self.matrix = cpu_kernels.Matrix.q4(weight.q, scales, mins, self.bias)
            self.register_buffer("weight", self.matrix.tensors[0], persistent=False)
            return
        q = weight.q.to(torch.int32)
        if device.type == "cuda":
            # The CUDA kernel takes two weights per byte and bfloat16 activations and scales.
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), _inner_k_tiles(q.shape[1])
            )
            self.compute_dtype = torch.bfloat16
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q, _inner_k_tiles(q.shape[1])
            )
            self.compute_dtype = dtype
        self.register_buffer("weight", packed, persistent=False)
        pairs = torch.stack([weight.scale.t(), weight.zero.t()], dim=-1)  # [K/g, N, 2]
        self.register_buffer("scales_and_zeros", pairs.to(self.compute_dtype).contiguous())

    @property
    def on_kernel(self) -> bool:
        return self.matrix is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            return self.matrix(x)
        rows = x.reshape(-1, x.shape[-1]).to(self.compute_dtype)
        matmul = (
            torch.ops.aten._weight_int4pack_mm
            if rows.is_cuda
            else torch.ops.aten._weight_int4pack_mm_for_cpu
        )
        y = matmul(rows, self.weight, self.group, self.scales_and_zeros).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] as int8 q [N, K] in -127..127 and one scale per output: w ~ q * scale."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """On the CPU kernel (float32 weights, shapes that fit its panels) the inputs are
    rounded to 8 bits per group of 32, as for int4; on PyTorch's operator they stay
    float."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        use_kernel: bool = True,
        order: torch.Tensor | None = None,
    ) -> None:
        """`order` (a permutation of the rows), on the kernel: the rows packed in that
        order, so that `leading` can lend the first of them to another layer; the outputs
        stay in their own columns."""
        super().__init__()
        if order is not None:
            cpu_kernels.check_order(order, weight.shape[0])
        q, scale = int8_rows(weight)
        self.register_buffer("scales", scale.to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features = q.shape[0]
        self.matrix: cpu_kernels.Matrix | None = None
        n, k = q.shape
        if (
            use_kernel
            and q.device.type == "cpu"
            and weight.dtype == torch.float32
            and cpu_kernels.panels_fit(cpu_kernels.PANEL, k)
            and cpu_kernels.available()
        ):
            # Outputs padded to whole panels with zero rows (a head's draft vocabulary
            # may have any size); forward drops them.
            pad = -n % cpu_kernels.PANEL
            bias = None if bias is None else F.pad(bias.detach().float(), (0, pad))
            padded, scales = F.pad(q, (0, 0, 0, pad)), F.pad(scale.float(), (0, pad), value=1.0)
            if order is not None:
                rows = torch.cat([order, torch.arange(n, n + pad)])
                padded, scales = padded[rows], scales[rows]
                bias = None if bias is None else bias[rows]
            self.matrix = cpu_kernels.Matrix.q8(padded, scales, bias)
            if order is not None:
                self.matrix = self.matrix.ordered(rows)
                self.register_buffer("order", self.matrix.tensors[-1], persistent=False)
            q = self.matrix.tensors[0]  # the panels: the plain rows are not kept
        self.register_buffer("weight", q)

    @property
    def on_kernel(self) -> bool:
        return self.matrix is not None

    @property
    def lends_rows(self) -> bool:
        """Whether it was packed in an `order` on the kernel, so `leading` can lend rows."""
        return self.matrix is not None and bool(self.matrix.order)

    def leading(self, count: int) -> LeadingRows:
        """The first `count` rows in its packed order, reading this layer's bytes."""
        if not self.lends_rows:
            raise ValueError("only a layer packed in an order on the int8 kernel lends its rows")
        return LeadingRows(self.matrix, count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            return _first_outputs(self.matrix(x), self.out_features)
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales.to(rows.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class LeadingRows(nn.Module):
    """The outputs of a packed layer's first `count` rows (`Int8Linear.leading`), in its
    packed order, from its bytes: an MTP head's draft vocabulary inside the trunk's LM
    head, which holds those rows first (worker/shard_loading.py)."""

    on_kernel = True  # what MTPHead asks of a draft head before its one-call pass

    def __init__(self, matrix: cpu_kernels.Matrix, count: int) -> None:
        super().__init__()
        self.matrix = matrix.leading(count + -count % cpu_kernels.PANEL)
        self.out_features = count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _first_outputs(self.matrix(x), self.out_features)


def _first_outputs(y: torch.Tensor, count: int) -> torch.Tensor:
    """A padded matrix's outputs without the padding's."""
    return y if y.shape[-1] == count else y[..., :count]


def requantization_error(w: torch.Tensor) -> float:
    """Relative RMS error of `w` through int8 with one scale per output channel."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    back = (w / scale).round().clamp(-127, 127) * scale
    return float((back - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt().clamp(min=1e-12))


def quantize_linears(
    module: nn.Module,
    mode: str,
    int4_source: Callable[[tuple[str, ...]], Int4Weight | None] = lambda names: None,
    keep_int8: Callable[[tuple[str, ...]], bool] = lambda names: False,
) -> None:
    """Replace every `Linear` of `module` (not of a head built on it) by its quantized
    form. `int4_source` gives exact int4 groups for a layer's checkpoint tensors when the
    checkpoint stores them so (GGUF Q4_0/Q4_1); `keep_int8(names)` keeps a layer at int8
    under int4 (weights stored at 8 bits: rounding them to 4 would lose what the file
    holds)."""
    if mode == "none":
        return
    if mode not in QUANT_MODES:
        raise ModelLoadError(f"unknown --quant {mode!r} (use one of {', '.join(QUANT_MODES)})")
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Linear) or child.packed or not child.quantizable:
                continue
            w, bias = child.weight.detach(), child.bias
            # The packed int4 layout tiles outputs by 16 and inputs by 32 (whole groups).
            fits = w.shape[0] % 16 == 0 and w.shape[1] % 32 == 0
            if mode == "int4" and fits and not keep_int8(child.sources):
                exact = int4_source(child.sources)
                weight = exact.to(w.device) if exact is not None else Int4Weight.from_float(w)
                setattr(parent, name, Int4Linear(weight, bias, w.dtype))
            else:
                setattr(parent, name, Int8Linear(w, bias, order=child.pack_order))


def quantize_head(mtp: nn.Module) -> None:
    """Hold an MTP head's linear layers, its draft-vocabulary rows among them, at int8
    where the int8 CPU kernel runs them. A draft only proposes: verification scores the
    trunk, so output is unchanged, while a draft pass reads a quarter of the bytes. The
    trunk's LM head, where the head drafts over the full vocabulary with it or lends it
    its draft rows (shard_loading.load_shard), is already packed by then and stays
    as the trunk holds it."""
    float_cpu = mtp.embedding.device.type == "cpu" and mtp.dtype == torch.float32
    if float_cpu and cpu_kernels.available():
        quantize_linears(mtp, "int8")
