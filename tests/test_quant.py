"""Weight-only quantization: the packed int8/int4 layers compute what their dequantized
weights do, GGUF Q4 blocks are repacked exactly, and a quantized pipeline matches the
quantized single-process engine."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from reference import solo_run
from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.daemon.draft_policy import DraftPolicy
from mtpd.daemon.pipeline import Pipeline, PipelineConfig
from mtpd.daemon.scheduler import Scheduler
from mtpd.model import cpu_kernels, kernel_library
from mtpd.model.compare import compare_tokens
from mtpd.model.default_model import default_model_path
from mtpd.model.errors import ModelLoadError
from mtpd.model.gguf_checkpoint import GGUFCheckpoint
from mtpd.model.layers import Linear
from mtpd.model.quant import (
    Int4Linear,
    Int4Weight,
    Int8Linear,
    int8_rows,
    quantize_linears,
    requantization_error,
)
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine


def test_int4_groups_round_to_nearest_within_half_a_step():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    q = Int4Weight.from_float(w)
    step = q.scale.repeat_interleave(32, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert q.q.max() == 15 and q.q.min() == 0
    # Scales and minimums are float16 values, as GGUF's Q4_1 holds them.
    for v in (q.scale, q.zero - 8 * q.scale):
        assert torch.equal(v, v.half().float())
    with pytest.raises(ModelLoadError, match="float16's range"):
        Int4Weight.from_float(torch.full((16, 32), 1e5))


@pytest.mark.parametrize("use_kernel", [True, False], ids=["mtpd-kernel", "pytorch-op"])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_packed_layers_compute_their_dequantized_weights(rows, use_kernel):
    g = torch.Generator().manual_seed(rows)
    w, bias, x = torch.randn(64, 128, generator=g), torch.randn(64), torch.randn(rows, 128)
    q4 = Int4Weight.from_float(w)
    int4 = Int4Linear(q4, bias, torch.float32, use_kernel=use_kernel)
    assert int4.on_kernel == use_kernel  # float32 on CPU: the kernel unless told otherwise
    exact = x @ q4.dequantize().t() + bias
    # mtpd's kernel rounds each group of 32 inputs to 8 bits first, as llama.cpp does.
    inputs = _rounded_to_8_bits_per_group(x) if use_kernel else x
    torch.testing.assert_close(int4(x), inputs @ q4.dequantize().t() + bias, atol=1e-4, rtol=1e-4)
    assert (int4(x) - exact).norm() < 0.01 * exact.norm()
    int8 = Int8Linear(w, bias, use_kernel=use_kernel)
    assert int8.on_kernel == use_kernel
    torch.testing.assert_close(int8(x), inputs @ _int8_dense(w).t() + bias, atol=1e-4, rtol=1e-4)
    assert (int8(x) - x @ w.t() - bias).norm() < 0.01 * exact.norm()
    # Leading dimensions are kept, as nn.Linear keeps them.
    assert int4(x[None]).shape == (1, rows, 64)
    assert int8(x[None]).shape == (1, rows, 64)


def _int8_dense(w: torch.Tensor) -> torch.Tensor:
    q, scale = int8_rows(w)
    return q.float() * scale[:, None]


def _rounded_to_8_bits_per_group(x: torch.Tensor) -> torch.Tensor:
    """x as the int4 kernel reads it: each group of 32 scaled by max |x| / 127 and
    rounded to nearest (ties to even), the same float32 operations as the C code."""
    groups = x.reshape(*x.shape[:-1], -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(groups * inverse) * scale).reshape(x.shape)


def test_quantized_kernels_give_a_row_the_same_bits_alone_or_among_others():
    g = torch.Generator().manual_seed(3)
    # 17 rows: two whole tiles of the widest build (8 rows) and a last row.
    w, x = torch.randn(112, 576, generator=g), torch.randn(17, 576, generator=g)
    for layer in (Int4Linear(Int4Weight.from_float(w), None, torch.float32), Int8Linear(w, None)):
        together = layer(x)
        for i in range(17):
            assert torch.equal(layer(x[i : i + 1]), together[i : i + 1])


def test_gguf_q4_blocks_are_repacked_exactly():
    ckpt = GGUFCheckpoint(default_model_path())
    layer = "model.layers.7"
    for names in [
        (f"{layer}.self_attn.q_proj.weight",),  # rows permuted for llama.cpp's RoPE
        tuple(f"{layer}.self_attn.{p}_proj.weight" for p in "qkv"),  # fused as the layer does
        (f"{layer}.mlp.down_proj.weight",),
    ]:
        blocks = ckpt.int4_blocks(names)
        floats = torch.cat(list(ckpt.read(names).values()))
        assert torch.equal(blocks.dequantize(), floats), names
    # The tied embedding is stored as Q8_0: no int4 groups, kept at 8 bits.
    assert ckpt.int4_blocks(("model.embed_tokens.weight",)) is None
    assert ckpt.stored_at_8_bits(("model.embed_tokens.weight",))
    assert (
        0
        < requantization_error(
            ckpt.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        )
        < 0.05
    )


def test_quantize_linears_uses_exact_blocks_and_keeps_8_bit_tensors():
    layers = torch.nn.ModuleDict(
        {
            "a": Linear(torch.randn(16, 64), sources=("a.weight",)),
            "b": Linear(torch.randn(16, 64), sources=("b.weight",)),
            "c": Linear(torch.randn(16, 48), sources=("c.weight",)),  # not whole groups
            "d": Linear(torch.randn(8, 64), sources=("d.weight",)),  # not whole tiles
        }
    )
    exact = Int4Weight.from_float(torch.randn(16, 64))
    quantize_linears(
        layers,
        "int4",
        lambda names: exact if names == ("a.weight",) else None,
        lambda names: names == ("b.weight",),
    )
    assert isinstance(layers["a"], Int4Linear) and isinstance(layers["b"], Int8Linear)
    assert isinstance(layers["c"], Int8Linear) and isinstance(layers["d"], Int8Linear)
    x = torch.randn(2, 64)
    inputs = _rounded_to_8_bits_per_group(x)  # as the int4 kernel reads them
    torch.testing.assert_close(
        layers["a"](x), inputs @ exact.dequantize().t(), atol=1e-4, rtol=1e-4
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "model"
    write_tiny_model(path, "qwen3", layers=4, vocab=96)
    write_char_tokenizer(path)
    return path


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_engine_stays_close_to_float(tiny, quant):
    prompt = list(range(3, 40))
    full = Engine.load(tiny, max_context=128).forward("s", 0, prompt, all_logits=True)
    engine = Engine.load(tiny, max_context=128, quant=quant)
    assert not any(isinstance(m, Linear) for m in engine.shard.modules())
    logits = engine.forward("s", 0, prompt, all_logits=True)
    assert (logits.argmax(-1) == full.argmax(-1)).float().mean() > 0.8
    assert (logits - full).abs().max() < 0.5 * full.abs().max()


def test_a_quantized_pipeline_equals_the_quantized_engine(tiny):
    engine = Engine.load(tiny, max_context=128, quant="int4")
    prompt = list(range(5, 30))
    expected, logits = solo_run(engine, prompt, 16)
    pipeline = Pipeline.start(
        PipelineConfig(
            model=str(tiny),
            num_layers=4,
            workers=2,
            device="cpu",
            max_seqs=2,
            max_context=128,
            cache_memory=16 << 20,
            threads=1,
            quant="int4",
        )
    )
    with pipeline:
        scheduler = Scheduler(pipeline, eos_ids=set(), policy=DraftPolicy(0))
        result = scheduler.submit(prompt, SamplingParams(), 16, ignore_eos=True).result(120)
        scheduler.close()
    assert compare_tokens(expected, logits, result.token_ids).ok


@pytest.mark.parametrize("width", [32, 96, 288, 576])
def test_the_kernels_cover_odd_group_counts_and_tails(width):
    # int4 and int8 at 1, 3, 9 and 18 groups, in panels of 16 outputs; inputs not whole
    # groups take PyTorch's int8 operator, unrounded.
    g = torch.Generator().manual_seed(width)
    w, x = torch.randn(48, width, generator=g), torch.randn(3, width, generator=g)
    rounded = _rounded_to_8_bits_per_group(x)
    q4 = Int4Weight.from_float(w)
    torch.testing.assert_close(
        Int4Linear(q4, None, torch.float32)(x), rounded @ q4.dequantize().t(), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        Int8Linear(w, None)(x), rounded @ _int8_dense(w).t(), atol=1e-4, rtol=1e-4
    )
    # 40 outputs: int8 pads them to whole panels and drops the padding (int4 takes only
    # whole panels: quantize_linears keeps such layers at int8).
    w40, bias = torch.randn(40, width, generator=g), torch.randn(40, generator=g)
    int8 = Int8Linear(w40, bias)
    assert int8.on_kernel and int8(x).shape == (3, 40)
    torch.testing.assert_close(int8(x), rounded @ _int8_dense(w40).t() + bias, atol=1e-4, rtol=1e-4)
    w8, x8 = torch.randn(40, width + 8, generator=g), torch.randn(3, width + 8, generator=g)
    int8 = Int8Linear(w8, None)
    assert not int8.on_kernel
    torch.testing.assert_close(int8(x8), x8 @ _int8_dense(w8).t(), atol=1e-4, rtol=1e-4)


def test_int4_rounding_is_to_nearest_even_and_non_finite_inputs_stay_non_finite():
    w = torch.zeros(16, 32)
    w[0, :4] = 1.875  # 15 steps of 0.125: exact in int4 with a float16 scale
    layer = Int4Linear(Int4Weight.from_float(w), None, torch.float32)
    x = torch.zeros(1, 32)
    x[0, :5] = torch.tensor([0.5, 1.5, 2.5, -0.5, 127.0])  # max 127: scale exactly 1
    # Rounded to 0, 2, 2, -0 (ties to even), times 1.875.
    torch.testing.assert_close(layer(x)[0, 0], torch.tensor(7.5), atol=1e-5, rtol=0)
    for bad in (float("nan"), float("inf")):
        x[0, 7] = bad
        assert not torch.isfinite(layer(x)[0, 0])


def test_the_linear_kernels_are_right_for_avx2_alone_and_for_this_cpus_avx512():
    # The library is built for the machine's CPU; AVX2's build is what runs elsewhere.
    compiler, runtime = shutil.which(os.environ.get("CC", "cc")), kernel_library.openmp_runtime()
    libraries = [kernel_library.build_avx2(compiler, runtime)]
    isa = kernel_library.cpu_isa()  # what this machine's kernels are built for
    if isa and _compiles(compiler, [*isa, "-lmvec"]):  # a kernel that fails to build fails
        libraries.append(kernel_library.build(compiler, runtime, ["-lmvec"], isa))
    g = torch.Generator().manual_seed(11)
    # int4 and int8: 1, 3, 9, 18 and 48 groups, three panels, in both builds the same bits
    # (an output's sum runs in the same order); float32 (+ 24): a last 8 after steps of
    # 16, and of 32 then 16.
    for width in (32, 96, 288, 576, 1536):
        w, bias = torch.randn(48, width, generator=g), torch.randn(48, generator=g)
        q4 = Int4Weight.from_float(w)
        w8 = torch.randn(48, width + 24, generator=g)
        x, x8 = torch.randn(17, width, generator=g), torch.randn(17, width + 24, generator=g)
        rounded = _rounded_to_8_bits_per_group(x)
        cases = [  # (matrix, inputs, expected)
            (Int4Linear(q4, bias, torch.float32).matrix, x, rounded @ q4.dequantize().t() + bias),
            (cpu_kernels.Matrix.f32(w8, bias), x8, x8 @ w8.t() + bias),
            (Int8Linear(w, bias).matrix, x, rounded @ _int8_dense(w).t() + bias),
        ]
        quantized = {cpu_kernels.Matrix.Q4: [], cpu_kernels.Matrix.Q8: []}
        for built in libraries:
            library = kernel_library.load(built)
            for matrix, inputs, expected in cases:

                def product(rows: torch.Tensor, library=library, matrix=matrix) -> torch.Tensor:
                    out = torch.empty(rows.shape[0], 48)
                    status = library.mtpd_linear(
                        ctypes.byref(matrix), rows.data_ptr(), out.data_ptr(), rows.shape[0], 2
                    )
                    assert status == 0
                    return out

                together = product(inputs)
                torch.testing.assert_close(together, expected, atol=1e-4, rtol=1e-4)
                # A row's bits alone, and in tiles of every size (up to 8 rows) and tails.
                for i in range(17):
                    alone = product(inputs[i : i + 1].contiguous())
                    assert torch.equal(alone, together[i : i + 1])
                for rows in range(2, 17):
                    assert torch.equal(product(inputs[:rows].contiguous()), together[:rows])
                quantized.get(matrix.kind, []).append(together)
        for results in quantized.values():
            assert all(torch.equal(r, results[0]) for r in results)


def _compiles(compiler: str, flags: list[str]) -> bool:
    """Whether the compiler and linker take these flags at all (an empty program)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "empty.c"
        source.write_text("int main(void) { return 0; }\n")
        done = subprocess.run(
            [compiler, *flags, str(source), "-o", str(Path(tmp) / "empty")], capture_output=True
        )
    return done.returncode == 0
