"""Decoding on x86 CPUs through the C kernels of cpu_kernels.c (AVX2, and AVX-512 VNNI
where the CPU has it): float32, int8 and int4 weights.

Linear layers. Decoding multiplies each weight matrix by one row, verification by a
few: the step streams every weight once, so its speed is the speed at which weights are
read. On the 2-core AVX2 machines this project targets, oneDNN's packed layout (what
PyTorch offers) reads them at ~10 GB/s and MKL's plain matmul at ~10 GB/s, while the
memory delivers ~21 GB/s; a plain loop of 8-wide FMAs over four weight rows at a time,
threads splitting the rows, reads at that bandwidth and multiplies a few more rows
nearly for free (`python benchmarks/cpu_kernels.py`). It also keeps the weight in its
plain layout, so a tied LM head shares the embedding's memory instead of holding a
reordered copy.

What lies between them: RMSNorm, SwiGLU, and attention with RoPE and the cache write.
At a few rows each is a few microseconds of arithmetic behind ten or more PyTorch ops
of several microseconds' dispatch each; on CPU they took a third of a step once the
linear layers were fast. Here each is one call, and a whole decoder layer is one call
too (`Layer`; `decoder_layers` takes all of a shard's layers in one call): the twenty-odd
Python calls of a layer cost as much as its int4 arithmetic.

The kernels' library is built and loaded by `kernel_library.py`; without it (no
compiler, a CPU without AVX2, MTPD_CPU_KERNEL=0) layers keep PyTorch's ops.

Over 400 lines on purpose: the ctypes mirrors of the C structs (Matrix, Layer, Step)
sit beside the calls that fill them, so a change to the C side has one Python place.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from mtpd.model.kernel_library import C_FLOAT, C_INT, C_POINTER, available, kernels
from mtpd.model.kv_cache import KV_BLOCK, scale_groups

K_MULTIPLE = 8  # the kernels read 8 floats at a time
PANEL = 16  # outputs in an int4 or int8 panel (linear_q4, linear_q8)
MAX_HEAD_DIM = 256  # attention holds a query head in a fixed buffer
# A KV cache's element type, by its number in the kernels (KV_F32, KV_F16, KV_I8); an int8
# cache holds a float32 scale per KV_GROUP values of a vector beside it.
KV_FORMATS = (torch.float32, torch.float16, torch.int8)


def available_for(weight: torch.Tensor) -> bool:
    """Whether the kernels can serve this weight: a linear layer's [out, in] or a norm's
    [hidden], float32 on CPU, read in rows a multiple of 8 wide."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() in (1, 2)
        and weight.is_contiguous()
        and weight.shape[-1] % K_MULTIPLE == 0
        and available()
    )


def _check(name: str, *tensors: torch.Tensor) -> None:
    # What C would otherwise read through a wrong pointer (after a .to(), say).
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu:
            raise TypeError(f"the float32 CPU kernel {name} got {t.dtype} on {t.device}")


def _as_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x as contiguous [rows, width]: x itself when it already is (a step's flat batch)."""
    if x.dim() == 2 and x.is_contiguous():
        return x
    return x.reshape(-1, width).contiguous()


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _out_of_memory(status: int, name: str) -> None:
    if status:
        raise MemoryError(f"{name}: the kernel could not allocate its working memory")


class Matrix(ctypes.Structure):
    """A linear layer's weight as the kernels read it (mtpd_matrix in cpu_kernels.c),
    made once when the layer is packed; calling it computes x W^T + b. It holds the
    tensors it points into, so they live as long as it does."""

    F32, Q4, Q8 = 0, 1, 2
    _fields_ = [
        ("kind", C_INT),
        ("n", C_INT),
        ("k", C_INT),
        ("q", C_POINTER),
        ("s", C_POINTER),
        ("bias", C_POINTER),
        ("order", C_POINTER),
    ]

    @classmethod
    def _of(
        cls,
        kind: int,
        weight: torch.Tensor,
        n: int,
        k: int,
        bias: torch.Tensor | None,
        scales: torch.Tensor | None = None,
    ) -> Matrix:
        if bias is not None:
            _check("linear", bias)
            bias = bias.detach().contiguous()
            if bias.shape != (n,):
                raise ValueError(f"a bias of shape {list(bias.shape)} for {n} outputs")
        matrix = cls(kind, n, k, weight.data_ptr(), _pointer(scales), _pointer(bias), None)
        matrix.tensors = (weight, scales, bias)
        return matrix

    def ordered(self, order: torch.Tensor) -> Matrix:
        """This matrix writing row j's output to column order[j] (`order` a permutation
        of its rows): the weight packed with its rows reordered, computing what the
        weight in its own order does."""
        if self.order:
            raise ValueError("the matrix is reordered already")
        check_order(order, self.n)
        order = order.to(torch.int32).contiguous()
        matrix = type(self)(self.kind, self.n, self.k, self.q, self.s, self.bias, order.data_ptr())
        matrix.tensors = (*self.tensors, order)
        return matrix

    def leading(self, rows: int) -> Matrix:
        """The first `rows` rows as a matrix of their own, sharing this one's bytes, their
        outputs in row order (whatever this one's order)."""
        if not 0 < rows <= self.n or (self.kind != self.F32 and rows % PANEL):
            raise ValueError(f"{rows} leading rows of {self.n} in panels of {PANEL}")
        matrix = type(self)(self.kind, rows, self.k, self.q, self.s, self.bias, None)
        matrix.tensors = self.tensors
        return matrix

    @classmethod
    def f32(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Matrix:
        """A float32 [out, in] weight that `available_for` accepts (inference only: the
        kernel takes no gradients)."""
        if weight.dim() != 2 or not available_for(weight):
            raise TypeError("the float32 CPU kernel takes a contiguous float32 [out, in] weight")
        weight = weight.detach()
        return cls._of(cls.F32, weight, *weight.shape, bias)

    @classmethod
    def q4(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> Matrix:
        """W in groups of 32 inputs, W[n, 32 b + j] = q[n, 32 b + j] * scales[n, b] +
        mins[n, b], q [N, K] uint8 in 0..15: packed into the kernel's panels (linear_q4
        in cpu_kernels.c), which the matrix holds instead of q. The panels hold scales
        and mins as float16, as GGUF's Q4_1 does (Int4Weight's are float16 values)."""
        _check("linear_q4", scales, mins)
        if q.dtype is not torch.uint8 or q.dim() != 2 or not q.is_cpu:
            raise TypeError("the int4 CPU kernel takes uint8 [N, K] values in 0..15")
        n, k = _panel_shape(q)
        if scales.shape != (n, k // 32) or mins.shape != (n, k // 32):
            raise ValueError(f"int4 scales {list(scales.shape)} for a [{n}, {k}] weight")
        halves = q.reshape(n, k // 32, 2, 16)
        nibbles = _by_quads(halves[:, :, 0], 16) | _by_quads(halves[:, :, 1], 16) << 4
        per_panel = [
            t.half().reshape(n // PANEL, PANEL, -1).transpose(1, 2).contiguous()
            for t in (scales, mins)
        ]
        panels = torch.cat([nibbles, *(t.view(torch.uint8) for t in per_panel)], dim=-1)
        return cls._of(cls.Q4, panels.contiguous(), n, k, bias)

    @classmethod
    def q8(cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> Matrix:
        """W[n, k] = q[n, k] * scales[n]: q [N, K] int8 in -127..127, packed into the
        kernel's panels (linear_q8 in cpu_kernels.c), which the matrix holds instead."""
        _check("linear_q8", scales)
        if q.dtype is not torch.int8 or q.dim() != 2 or not q.is_cpu:
            raise TypeError("the int8 CPU kernel takes int8 [N, K] weights")
        n, k = _panel_shape(q)
        if scales.shape != (n,):
            raise ValueError(f"int8 scales {list(scales.shape)} for {n} outputs")
        panels = _by_quads((q.view(torch.uint8) ^ 0x80).reshape(n, k // 32, 32), 32)
        return cls._of(cls.Q8, panels.contiguous(), n, k, bias, scales.contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check("linear", x)
        if x.shape[-1] != self.k:
            raise ValueError(f"linear: inputs {x.shape[-1]} wide for a weight taking {self.k}")
        rows = _as_rows(x, self.k)
        out = torch.empty(rows.shape[0], self.n, dtype=torch.float32)
        if rows.shape[0]:
            status = kernels().mtpd_linear(
                ctypes.byref(self),
                rows.data_ptr(),
                out.data_ptr(),
                rows.shape[0],
                torch.get_num_threads(),
            )
            _out_of_memory(status, "linear")
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.n)


def check_order(order: torch.Tensor, rows: int) -> None:
    """Refuse anything but a permutation of 0..rows - 1 (the kernels write through it)."""
    if order.shape != (rows,) or not torch.equal(order.sort().values, torch.arange(rows)):
        raise ValueError(f"an order for {rows} rows must hold each of 0..{rows - 1} once")


def panels_fit(n: int, k: int) -> bool:
    """Whether an [n, k] int4 or int8 weight packs into the kernels' panels."""
    return n % PANEL == 0 and k % 32 == 0


def _panel_shape(q: torch.Tensor) -> tuple[int, int]:
    n, k = q.shape
    if not panels_fit(n, k):
        raise ValueError(f"panels of {PANEL} outputs x 32 inputs do not fit a [{n}, {k}] weight")
    return n, k


def _by_quads(q: torch.Tensor, width: int) -> torch.Tensor:
    """q [N, groups, width] bytes as the panels hold them: [N / 16, groups, width * 16],
    a group's inputs 4 at a time, each 4 as 16 outputs x 4 bytes (one dpbusd operand)."""
    n, groups = q.shape[:2]
    quads = q.reshape(n // PANEL, PANEL, groups, width // 4, 4).permute(0, 2, 3, 1, 4)
    return quads.reshape(n // PANEL, groups, width * PANEL)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    _check("rms_norm", x, weight)
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: inputs {x.shape[-1]} wide for a weight of {weight.shape[0]}")
    rows = _as_rows(x, weight.shape[0])
    out = torch.empty_like(rows)
    kernels().mtpd_rms_norm_f32(
        rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], rows.shape[1], eps
    )
    return out if x.dim() == 2 else out.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate and up side by side in the last dimension."""
    _check("silu_mul", gate_up)
    width = gate_up.shape[-1]
    rows = _as_rows(gate_up, width)
    out = torch.empty(rows.shape[0], width // 2, dtype=torch.float32)
    kernels().mtpd_silu_mul_f32(rows.data_ptr(), out.data_ptr(), rows.shape[0], width // 2)
    return out if gate_up.dim() == 2 else out.view(*gate_up.shape[:-1], width // 2)


def attention_available_for(head_dim: int) -> bool:
    """Whether `attend` can serve heads of this size (with a float32 cache)."""
    return head_dim % K_MULTIPLE == 0 and head_dim <= MAX_HEAD_DIM and available()


def attend(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    slot_k: torch.Tensor,
    slot_v: torch.Tensor,
    out: torch.Tensor,
    start: int,
    heads: int,
    kv_heads: int,
    scale: float,
) -> None:
    """One sequence's new rows: RoPE on q and k, k and v written into its cache slot at
    positions start.., and causal attention over the slot, into `out` [T, heads * d].
    qkv [T, (heads + 2 kv_heads) d] as the fused projection makes it; cos and
    sin_signed [T, d] (see layers._apply_rope); slot_k and slot_v [kv_heads, context, d].
    """
    _check("attend", qkv, cos, sin_signed, slot_k, slot_v, out)
    for t in (qkv, cos, sin_signed, slot_k, slot_v, out):
        if not t.is_contiguous():
            raise ValueError("the attention kernel takes contiguous tensors")
    groups, context, d = slot_k.shape
    rows = qkv.shape[0]
    if start + rows > context:
        raise ValueError(f"{rows} rows from position {start} overrun a context of {context}")
    # The C side trusts these: a mismatch would read or write beyond a tensor.
    if (
        not attention_available_for(d)
        or groups != kv_heads
        or heads % kv_heads
        or slot_v.shape != slot_k.shape
        or qkv.shape[1] != (heads + 2 * kv_heads) * d
        or cos.shape != (rows, d)
        or sin_signed.shape != (rows, d)
        or out.shape != (rows, heads * d)
    ):
        raise ValueError(
            f"attend: shapes do not fit {heads} heads over {kv_heads} kv heads of {d}: qkv "
            f"{list(qkv.shape)}, cos {list(cos.shape)}, slot {list(slot_k.shape)}, out "
            f"{list(out.shape)}"
        )
    status = kernels().mtpd_attend_f32(
        qkv.data_ptr(),
        cos.data_ptr(),
        sin_signed.data_ptr(),
        slot_k.data_ptr(),
        slot_v.data_ptr(),
        out.data_ptr(),
        rows,
        start,
        heads,
        kv_heads,
        d,
        context,
        scale,
        torch.get_num_threads(),
    )
    _out_of_memory(status, "attend")


class _Heads(ctypes.Structure):
    _fields_ = [("heads", C_INT), ("kv_heads", C_INT), ("d", C_INT), ("scale", C_FLOAT)]


class Layer(ctypes.Structure):
    """A pre-norm decoder layer with attention and a SwiGLU MLP (mtpd_layer in
    cpu_kernels.c): x + o(attention(qkv(norm(x)))), then + down(silu_mul(gate_up(norm(.)))),
    one kernel call per step instead of some twenty PyTorch and kernel calls."""

    _fields_ = [
        ("input_norm", C_POINTER),
        ("post_norm", C_POINTER),
        ("qkv", Matrix),
        ("o", Matrix),
        ("gate_up", Matrix),
        ("down", Matrix),
        ("attention", _Heads),
        ("eps", C_FLOAT),
    ]

    @classmethod
    def of(
        cls,
        norms: tuple[torch.Tensor, torch.Tensor],
        eps: float,
        linears: tuple[Matrix, Matrix, Matrix, Matrix],  # qkv, o, gate_up, down
        heads: int,
        kv_heads: int,
        head_dim: int,
    ) -> Layer:
        qkv, o, gate_up, down = linears
        hidden = o.n
        # The C side trusts these: a mismatch would read or write beyond a buffer.
        if not (
            all(available_for(w) and w.shape == (hidden,) for w in norms)
            and attention_available_for(head_dim)
            and heads % kv_heads == 0
            and qkv.k == gate_up.k == down.n == hidden
            and qkv.n == (heads + 2 * kv_heads) * head_dim
            and o.k == heads * head_dim
            and gate_up.n == 2 * down.k
            and not any(m.order for m in linears)  # o and down add a residual: in column order
        ):
            raise ValueError(
                f"a layer of {heads} heads over {kv_heads} kv heads of {head_dim} does not fit "
                f"its weights: qkv [{qkv.n}, {qkv.k}], o [{o.n}, {o.k}], gate_up "
                f"[{gate_up.n}, {gate_up.k}], down [{down.n}, {down.k}]"
            )
        norms = tuple(w.detach() for w in norms)
        layer = cls(
            norms[0].data_ptr(),
            norms[1].data_ptr(),
            qkv,
            o,
            gate_up,
            down,
            _Heads(heads, kv_heads, head_dim, head_dim**-0.5),
            eps,
        )
        layer.tensors = (norms, linears)  # what its pointers point into
        layer.hidden, layer.heads, layer.kv_heads, layer.head_dim = (
            hidden,
            heads,
            kv_heads,
            head_dim,
        )
        return layer


class Layers:
    """Layers of one size, as `decoder_layers` and `MTPPass` take them: their structs in
    one C array, and the sizes they share, checked once. A step made the array and
    checked every layer anew: 0.3 ms of Python a one-row int4 step on a Zen 1 EPYC, where
    the weights the step had just streamed left every cache cold for it (session 31)."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        if not layers:
            raise ValueError("no layers")
        first = layers[0]
        sizes = (first.hidden, first.heads, first.kv_heads, first.head_dim)
        if any((x.hidden, x.heads, x.kv_heads, x.head_dim) != sizes for x in layers):
            raise ValueError(
                "layers of different sizes: "
                f"{[(x.hidden, x.heads, x.kv_heads, x.head_dim) for x in layers]}"
            )
        self.hidden, self.heads, self.kv_heads, self.head_dim = sizes
        self.layers = tuple(layers)  # the structs' own tensors stay alive with them
        self.array = (Layer * len(layers))(*layers)  # copies of the structs

    def __len__(self) -> int:
        return len(self.layers)


class Step(ctypes.Structure):
    """Where a step's rows go (mtpd_step in cpu_kernels.c): sequence i's counts[i] rows,
    in order, at positions starts[i].. of cache slot slots[i], with the whole rotary
    tables cos and sin_signed [positions, d] (each row reads its position's: gathering
    the rows took PyTorch ops that cost a step about 0.1 ms); made once per step."""

    _fields_ = [
        ("rows", C_INT),
        ("sequences", C_INT),
        ("slots", C_POINTER),
        ("starts", C_POINTER),
        ("counts", C_POINTER),
        ("cos", C_POINTER),
        ("sin_signed", C_POINTER),
        ("k", C_POINTER),
        ("v", C_POINTER),
        ("k_scale", C_POINTER),
        ("v_scale", C_POINTER),
        ("slots_per_layer", C_INT),
        ("max_context", C_INT),
        ("kv_format", C_INT),
    ]

    @classmethod
    def of(
        cls,
        slots: list[int],
        starts: list[int],
        counts: list[int],
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> Step:
        """k and v: the caches [layers, slots, kv_heads, max_context, d], float32, float16,
        or int8 with float32 scales k_scale and v_scale [layers, slots, kv_heads,
        max_context, ceil(d / KV_GROUP)] (one per KV_GROUP values of a vector; laid out
        within blocks of KV_BLOCK positions as cpu_kernels.c says, so max_context is a
        multiple of KV_BLOCK); cos and sin_signed: the rotary tables [positions, d] from
        position 0."""
        rows, d = sum(counts), k.shape[-1]
        _check("decoder_layer", cos, sin_signed)
        if k.dtype not in KV_FORMATS or v.dtype != k.dtype:
            raise TypeError(f"the CPU kernels take float32, float16 or int8 caches, not {k.dtype}")
        scales = (k_scale, v_scale) if k.dtype == torch.int8 else ()
        if not all(t is not None and t.dtype == torch.float32 for t in scales):
            raise TypeError("an int8 cache needs float32 scales for its keys and values")
        if not all(t.is_cpu for t in (k, v, *scales)):
            raise TypeError(f"the CPU kernels take caches in CPU memory, not on {k.device}")
        layers, slot_count, kv_heads, context, _ = k.shape
        if (
            not all(t.is_contiguous() for t in (k, v, *scales))
            or any(t.shape != (*k.shape[:-1], scale_groups(d)) for t in scales)
            or (scales and context % KV_BLOCK)
            or v.shape != k.shape
            or not cos.is_contiguous()
            or not sin_signed.is_contiguous()
            or cos.shape != sin_signed.shape
            or cos.dim() != 2
            or cos.shape[1] != d
            or len(slots) != len(starts)
            or any(not 0 <= s < slot_count for s in slots)
            or any(
                s < 0 or c < 0 or s + c > min(context, cos.shape[0])
                for s, c in zip(starts, counts, strict=True)
            )
        ):
            raise ValueError(
                f"a step of {counts} rows at {starts} in slots {slots} does not fit a cache "
                f"{list(k.shape)} with rotary tables {list(cos.shape)}"
            )
        # A ctypes array, not a tensor: right after a trunk step a first torch op costs
        # 30-40 us (a step builds two of these where the head drafts).
        index = (ctypes.c_int64 * (3 * len(slots)))(*slots, *starts, *counts)
        at = ctypes.addressof(index)
        step = cls(
            rows,
            len(slots),
            *(at + 8 * len(slots) * i for i in range(3)),  # its rows
            cos.data_ptr(),
            sin_signed.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            *(t.data_ptr() for t in scales or (k, v)),  # unread but for int8
            slot_count,
            context,
            KV_FORMATS.index(k.dtype),
        )
        step.tensors = (index, cos, sin_signed, k, v, *scales)
        step.layers, step.kv_heads, step.head_dim = layers, kv_heads, d
        return step


def decoder_layers(
    layers: Layers, step: Step, first: int, x: torch.Tensor, taps: Sequence[int] = ()
) -> torch.Tensor:
    """Layers `layers` (numbers first.. of the step's caches), one after the other, on the
    step's rows x [rows, hidden] in one kernel call: the new rows, each layer's k and v
    written into the caches. With `taps` (indices into `layers`, increasing), the rows
    going into each of those layers follow the new rows: [rows, hidden * (1 + taps)]."""
    _check("decoder_layers", x)
    x = x.contiguous()
    if not 0 <= first <= first + len(layers) <= step.layers:
        raise ValueError(
            f"decoder_layers: layers {first}..{first + len(layers) - 1} do not fit a step "
            f"of {step.layers} layers"
        )
    if (
        layers.kv_heads != step.kv_heads
        or layers.head_dim != step.head_dim
        or x.shape != (step.rows, layers.hidden)
    ):
        raise ValueError(
            f"decoder_layers: rows {list(x.shape)} do not fit a step of {step.rows} "
            f"rows, {layers.hidden} wide, with {step.kv_heads} kv heads of "
            f"{step.head_dim} in its cache"
        )
    if list(taps) != sorted(set(taps)) or not all(0 <= t < len(layers) for t in taps):
        raise ValueError(f"decoder_layers: taps {list(taps)} are not layers 0..{len(layers) - 1}")
    out = torch.empty_like(x)
    tapped = torch.empty(len(taps), *x.shape) if taps else None
    status = kernels().mtpd_decoder_layers_f32(
        layers.array,
        len(layers),
        ctypes.byref(step),
        first,
        x.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
        (ctypes.c_int64 * len(taps))(*taps) if taps else None,
        len(taps),
        _pointer(tapped),
    )
    _out_of_memory(status, "decoder_layers")
    return torch.cat([out, *tapped], -1) if taps else out


class MTPInput(ctypes.Structure):
    """An MTP head's input stage (mtpd_mtp_input in cpu_kernels.c): its norms, fuse and fc
    as `mtp_input` runs them, made once from a packed head."""

    _fields_ = [
        ("hidden", C_INT),
        ("taps", C_INT),
        ("eps", C_FLOAT),
        ("norm_embedding", C_POINTER),
        ("norm_hidden", C_POINTER),
        ("norm_taps", C_POINTER),
        ("fuse", Matrix),
        ("fc", Matrix),
    ]

    @classmethod
    def of(
        cls,
        norms: tuple[torch.Tensor, torch.Tensor],  # the embedding's, the final state's
        tap_norms: Sequence[torch.Tensor],
        eps: float,
        fuse: Matrix | None,
        fc: Matrix,
    ) -> MTPInput:
        hidden, taps = fc.n, len(tap_norms)
        # The C side trusts these: a mismatch would read or write beyond a buffer.
        if not (
            all(available_for(w) and w.shape == (hidden,) for w in (*norms, *tap_norms))
            and fc.k == 2 * hidden
            and (fuse is None) == (taps == 0)
            and (fuse is None or (fuse.n, fuse.k) == (hidden, (1 + taps) * hidden))
            and not fc.order
            and (fuse is None or not fuse.order)
        ):
            raise ValueError(
                f"an MTP input of {hidden} with {taps} taps does not fit its weights: fc "
                f"[{fc.n}, {fc.k}]" + (f", fuse [{fuse.n}, {fuse.k}]" if fuse else "")
            )
        norm_taps = torch.stack([w.detach() for w in tap_norms]) if taps else None
        norms = tuple(w.detach() for w in norms)
        spec = cls(
            hidden,
            taps,
            eps,
            norms[0].data_ptr(),
            norms[1].data_ptr(),
            _pointer(norm_taps),
            fuse if fuse is not None else Matrix(),
            fc,
        )
        spec.tensors = (norms, norm_taps, fuse, fc)  # what its pointers point into
        return spec


def mtp_input(spec: MTPInput, embedded: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """fc(cat(norm_embedding(embedded), the state fc takes from `hidden`)) [rows, H], in
    one call: `hidden` [rows, H] (a state, normed) or [rows, H x (1 + taps)] (the trunk's
    final state and taps, normed and fused)."""
    _check("mtp_input", embedded, hidden)
    size = spec.hidden
    rows, width = hidden.shape[0], hidden.shape[-1]
    if (
        hidden.dim() != 2
        or embedded.shape != (rows, size)
        or width not in (size, (1 + spec.taps) * size)
    ):
        raise ValueError(
            f"mtp_input: rows {list(hidden.shape)} and embeddings {list(embedded.shape)} do "
            f"not fit a head of {size} with {spec.taps} taps"
        )
    embedded, hidden = embedded.contiguous(), hidden.contiguous()
    out = torch.empty(rows, size)
    if rows:
        status = kernels().mtpd_mtp_input_f32(
            ctypes.byref(spec),
            embedded.data_ptr(),
            hidden.data_ptr(),
            width,
            out.data_ptr(),
            rows,
            torch.get_num_threads(),
        )
        _out_of_memory(status, "mtp_input")
    return out


class MTPPass(ctypes.Structure):
    """An MTP head's whole pass (mtpd_mtp_pass in cpu_kernels.c): embedding, input stage,
    layers, final norm and greedy draft, as `mtp_pass` runs them; made once from a packed
    head."""

    _fields_ = [
        ("embedding", C_POINTER),
        ("vocab", C_INT),
        ("input", MTPInput),
        ("layers", C_POINTER),
        ("n_layers", C_INT),
        ("norm", C_POINTER),
        ("eps", C_FLOAT),
        ("draft_head", Matrix),
        ("draft_vocab", C_INT),
        ("draft_ids", C_POINTER),
    ]

    @classmethod
    def of(
        cls,
        embedding: torch.Tensor,
        head_input: MTPInput,
        layers: Layers,
        norm: torch.Tensor,
        eps: float,
        draft_head: Matrix,
        draft_vocab: int,
        draft_ids: torch.Tensor | None,
    ) -> MTPPass:
        """`draft_head` may have more rows than `draft_vocab` (padding: never drafted);
        `draft_ids` maps its rows to full-vocabulary ids (None: they are those ids)."""
        hidden = head_input.hidden
        # The C side trusts these: a mismatch would read or write beyond a buffer.
        if not (
            available_for(embedding)
            and embedding.dim() == 2
            and embedding.shape[1] == hidden
            and available_for(norm)
            and norm.shape == (hidden,)
            and layers.hidden == hidden
            and draft_head.k == hidden
            and 0 < draft_vocab <= draft_head.n
            and (draft_ids is None or draft_ids.shape == (draft_vocab,))
            # Drafts come back as next tokens: each must have an embedding row.
            and (draft_ids is not None or draft_vocab <= embedding.shape[0])
        ):
            raise ValueError(
                f"an MTP pass of {hidden} does not fit its parts: embedding "
                f"{list(embedding.shape)}, norm {list(norm.shape)}, draft head "
                f"[{draft_head.n}, {draft_head.k}] for {draft_vocab} tokens, layers of "
                f"{layers.hidden}"
            )
        embedding, norm = embedding.detach(), norm.detach()
        ids = None if draft_ids is None else draft_ids.to(torch.int64).contiguous()
        spec = cls(
            embedding.data_ptr(),
            embedding.shape[0],
            head_input,
            ctypes.addressof(layers.array),
            len(layers),
            norm.data_ptr(),
            eps,
            draft_head,
            draft_vocab,
            _pointer(ids),
        )
        spec.tensors = (embedding, head_input, layers, norm, draft_head, ids)
        spec.hidden, spec.layer_heads = hidden, (layers.kv_heads, layers.head_dim)
        return spec


def mtp_pass(
    spec: MTPPass,
    step: Step,
    next_tokens: torch.Tensor,
    hidden: torch.Tensor,
    draft_rows: list[int],
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """An MTP head's pass over the step's rows, in one call: `next_tokens` [rows] and
    `hidden` as `mtp_input` takes them; the head's cache entries written. Returns the
    normed states of `draft_rows` [len(draft_rows), H], their greedy drafts
    (full-vocabulary ids), and the seconds of the part that grows with the step's rows
    (input stage and layers)."""
    _check("mtp_pass", hidden)
    size, width = spec.hidden, hidden.shape[-1]
    m = step.rows
    if (
        hidden.dim() != 2
        or hidden.shape[0] != m
        or next_tokens.shape != (m,)
        or width not in (size, (1 + spec.input.taps) * size)
        or (step.kv_heads, step.head_dim) != spec.layer_heads
        or step.layers < spec.n_layers
        or any(not 0 <= r < m for r in draft_rows)
    ):
        raise ValueError(
            f"mtp_pass: rows {list(hidden.shape)}, tokens {list(next_tokens.shape)} and draft "
            f"rows {draft_rows} do not fit a step of {m} rows for a head of {size} with "
            f"{spec.input.taps} taps"
        )
    tokens, hidden = next_tokens.to(torch.int64).contiguous(), hidden.contiguous()
    states = torch.empty(len(draft_rows), size)
    drafts = torch.empty(len(draft_rows), dtype=torch.int64)
    rows_s = ctypes.c_double(0.0)
    if m:
        status = kernels().mtpd_mtp_pass_f32(
            ctypes.byref(spec),
            ctypes.byref(step),
            tokens.data_ptr(),
            hidden.data_ptr(),
            width,
            (ctypes.c_int64 * len(draft_rows))(*draft_rows) if draft_rows else None,
            len(draft_rows),
            states.data_ptr(),
            drafts.data_ptr(),
            ctypes.byref(rows_s),
            torch.get_num_threads(),
        )
        if status == -2:  # checked there: a pass over the tokens in Python cost 2 torch ops
            raise ValueError(f"mtp_pass: token ids outside the vocabulary of {spec.vocab}")
        _out_of_memory(status, "mtp_pass")
    return states, drafts, rows_s.value
