"""The float32 AVX2 kernels behind CPU steps (model/cpu_kernels.py): linear layers,
RMSNorm, SwiGLU and attention compute what PyTorch's ops do, a row gets the same bits
alone or among others, and layers and shards run on them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_models import write_tiny_model

from mtpd.model import cpu_kernels, kernel_library
from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.decoder import ShardSpec
from mtpd.model.kv_cache import KV_BLOCK, KV_GROUP
from mtpd.model.layers import Attention, Linear, _apply_rope
from mtpd.model.quant import Int8Linear
from mtpd.worker.shard_loading import load_shard


def test_the_kernels_are_built_on_these_machines():
    # CI's machines and this project's are x86 with AVX2 and a C compiler: a fallback to
    # oneDNN there would be a silent 1.5x slowdown, so it fails here instead.
    assert cpu_kernels.available_for(torch.zeros(4, 8))
    assert cpu_kernels.attention_available_for(64)


@pytest.mark.parametrize("out_features", [1, 3, 4, 98, 3072])
@pytest.mark.parametrize("bias", [False, True])
def test_it_computes_what_f_linear_does(out_features, bias):
    g = torch.Generator().manual_seed(out_features)
    w = torch.randn(out_features, 576, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    for rows in (0, 1, 2, 3, 4, 5, 7, 8, 33):
        x = torch.randn(rows, 576, generator=g)
        torch.testing.assert_close(
            cpu_kernels.Matrix.f32(w, b)(x), F.linear(x, w, b), rtol=1e-5, atol=1e-4
        )
    # Any leading shape, and inputs that are views.
    x = torch.randn(2, 5, 576, generator=g)
    torch.testing.assert_close(
        cpu_kernels.Matrix.f32(w, b)(x[:, 1:4]), F.linear(x[:, 1:4], w, b), rtol=1e-5, atol=1e-4
    )


def test_a_row_gets_the_same_bits_alone_or_in_a_step_of_many():
    # What lets a verification step of k+1 rows reproduce one-row decoding exactly.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 1536, generator=g)
    x = torch.randn(9, 1536, generator=g)
    linear = cpu_kernels.Matrix.f32(w)
    together = linear(x)
    for i in range(9):
        assert torch.equal(linear(x[i : i + 1]), together[i : i + 1])
    assert torch.equal(linear(x[2:7]), together[2:7])
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert torch.equal(linear(x), together)
    finally:
        torch.set_num_threads(threads)


def test_layers_pack_onto_the_kernel_or_onednn():
    layer = Linear(torch.randn(16, 64))
    layer.pack()
    assert layer.on_kernel and layer.packed
    w = torch.randn(16, 60)
    odd = Linear(w.clone())  # inputs not a multiple of 8: oneDNN's layout
    odd.pack()
    assert odd.packed and not odd.on_kernel
    x = torch.randn(3, 60)
    torch.testing.assert_close(odd(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="float32"):
        layer(torch.randn(1, 64, dtype=torch.bfloat16))


def test_a_tied_lm_head_shares_the_embedding(tmp_path):
    write_tiny_model(tmp_path, "llama", tied=True)
    ckpt = open_checkpoint(tmp_path)
    cfg = read_config(ckpt)
    shard, _ = load_shard(ckpt, cfg, ShardSpec.whole(cfg), torch.float32, 32, torch.device("cpu"))
    assert shard.lm_head.on_kernel
    assert shard.lm_head.weight.data_ptr() == shard.embedding.data_ptr()


def test_rms_norm_and_swiglu_compute_what_pytorch_does():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(576, generator=g)
    for rows in (1, 3, 17):
        x = torch.randn(rows, 576, generator=g) * 3
        expected = F.rms_norm(x, (576,), None, 1e-5) * w
        torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5), expected)
        # Widths that are not a multiple of 8 take the padded tail of the vector exp.
        gate_up = torch.randn(rows, 2 * 1541, generator=g) * 4
        gate, up = gate_up.split(1541, dim=-1)
        torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate) * up)


@pytest.fixture(params=["native", "avx2"])
def kernel_build(request, monkeypatch):
    """This CPU's kernels, then AVX2's build, which takes queries two at a time (AVX-512's
    three): the build machines without AVX-512 run."""
    if request.param == "avx2":
        compiler = shutil.which(os.environ.get("CC", "cc"))
        built = kernel_library.build_avx2(compiler, kernel_library.openmp_runtime())
        library = kernel_library.load(built)
        monkeypatch.setattr(cpu_kernels, "kernels", lambda: library)
    return request.param


@pytest.mark.usefixtures("kernel_build")
@pytest.mark.parametrize(
    ("heads", "kv_heads", "start", "rows"),
    # Keys 64 at a time: one chunk, several (the last one partial), and more than 16 rows
    # of a sequence, which take their chunks one task per row; groups of 1-4 query heads.
    [(9, 3, 0, 1), (9, 3, 37, 4), (4, 4, 5, 1), (8, 2, 0, 13), (9, 3, 150, 3), (4, 2, 90, 40)],
)
def test_attention_computes_what_rope_and_sdpa_do(heads, kv_heads, start, rows):
    d, context = 64, max(64, start + rows + 5)
    g = torch.Generator().manual_seed(start + rows)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g)
    cos_table, sin_table = _rope(context, d)
    cos, sin_signed = cos_table[start : start + rows], sin_table[start : start + rows]
    slot_k = torch.randn(kv_heads, context, d, generator=g)
    slot_v = torch.randn(kv_heads, context, d, generator=g)
    before_k, before_v = slot_k.clone(), slot_v.clone()
    out = torch.empty(rows, heads * d)
    cpu_kernels.attend(qkv, cos, sin_signed, slot_k, slot_v, out, start, heads, kv_heads, d**-0.5)

    q, k, v = qkv.view(rows, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
    q = _apply_rope(q, cos[:, None], sin_signed[:, None])
    k = _apply_rope(k, cos[:, None], sin_signed[:, None])
    end = start + rows
    torch.testing.assert_close(slot_k[:, start:end], k.transpose(0, 1))
    assert torch.equal(slot_v[:, start:end], v.transpose(0, 1))
    # Nothing else in the slot was touched.
    assert torch.equal(slot_k[:, :start], before_k[:, :start])
    assert torch.equal(slot_k[:, end:], before_k[:, end:])
    assert torch.equal(slot_v[:, end:], before_v[:, end:])
    mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        slot_k[None, :, :end],
        slot_v[None, :, :end],
        attn_mask=mask,
        enable_gqa=True,
    )[0].transpose(0, 1)
    torch.testing.assert_close(out, expected.reshape(rows, heads * d))


@pytest.mark.usefixtures("kernel_build")
@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(6, 2, 40), (8, 2, 64), (5, 1, 72)])
def test_a_query_head_gets_the_same_attention_bits_alone_as_in_its_group(heads, kv_heads, d):
    """The heads sharing a kv head run together (in threes or twos, the rest alone); each
    one's result is the one it gets alone, over keys of a decoding step (split chunks)
    and a prompt's (every chunk in one task), and what RoPE and SDPA compute."""
    group, context = heads // kv_heads, 150
    g = torch.Generator().manual_seed(heads * d)
    prompt = torch.randn(context - 2, (heads + 2 * kv_heads) * d, generator=g)
    step = torch.randn(2, (heads + 2 * kv_heads) * d, generator=g)
    cos, sin_signed = _rope(context, d)

    def attend(rows: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
        slot_k, slot_v = torch.zeros(kv_heads, context, d), torch.zeros(kv_heads, context, d)
        out = torch.empty(len(prompt), heads * d)
        args = (slot_k, slot_v, out, 0, heads, kv_heads, d**-0.5)
        cpu_kernels.attend(rows[0], cos[: len(prompt)], sin_signed[: len(prompt)], *args)
        after = torch.empty(2, heads * d)
        rope = cos[len(prompt) :], sin_signed[len(prompt) :]
        cpu_kernels.attend(
            rows[1], *rope, slot_k, slot_v, after, len(prompt), heads, kv_heads, d**-0.5
        )
        return torch.cat([out, after])

    def split(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return rows.view(len(rows), -1, d).split([heads, kv_heads, kv_heads], dim=1)

    together = attend((prompt, step), heads, kv_heads).view(context, heads, d)
    for h in range(heads):
        kv = h // group
        alone = []
        for rows in (prompt, step):
            q, k, v = split(rows)
            alone.append(torch.cat([q[:, h], k[:, kv], v[:, kv]], -1).contiguous())
        assert torch.equal(attend(alone, 1, 1), together[:, h]), h
    q, k, v = (t.transpose(0, 1) for t in split(torch.cat([prompt, step])))
    rope = cos[:, None], sin_signed[:, None]
    q = _apply_rope(q.transpose(0, 1), *rope).transpose(0, 1)
    k = _apply_rope(k.transpose(0, 1), *rope).transpose(0, 1)
    mask = torch.ones(context, context, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, enable_gqa=True
    )
    torch.testing.assert_close(together, expected[0].transpose(0, 1))


@pytest.mark.usefixtures("kernel_build")
def test_a_row_gets_the_same_attention_bits_in_a_prompt_as_in_a_decoding_step():
    """A prompt's rows (many: a task per row) and a decoding step's (a task per chunk of
    keys) fold the same partials in the same order."""
    heads, kv_heads, d, rows = 6, 2, 64, 150
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g)
    cos, sin_signed = _rope(rows, d)
    slot_k, slot_v = torch.zeros(kv_heads, rows, d), torch.zeros(kv_heads, rows, d)
    prompt = torch.empty(rows, heads * d)
    cpu_kernels.attend(qkv, cos, sin_signed, slot_k, slot_v, prompt, 0, heads, kv_heads, 0.125)
    for last in (rows - 2, rows - 1):  # 3 chunks; the last one holds 22 keys, then 23
        alone = torch.empty(1, heads * d)
        rope = cos[last : last + 1], sin_signed[last : last + 1]
        cpu_kernels.attend(
            qkv[last : last + 1], *rope, slot_k, slot_v, alone, last, heads, kv_heads, 0.125
        )
        assert torch.equal(alone, prompt[last : last + 1])


def test_attention_refuses_what_would_read_or_write_beyond_a_tensor():
    slot = torch.zeros(1, 8, 16)
    rows, cos = torch.zeros(2, 48), torch.zeros(2, 16)
    with pytest.raises(ValueError, match="overrun"):
        cpu_kernels.attend(rows, cos, cos, slot, slot.clone(), torch.zeros(2, 16), 7, 1, 1, 0.25)
    with pytest.raises(ValueError, match="shapes do not fit"):  # 2 heads need a wider qkv
        cpu_kernels.attend(rows, cos, cos, slot, slot.clone(), torch.zeros(2, 32), 0, 2, 1, 0.25)
    with pytest.raises(ValueError, match="shapes do not fit"):  # rotary tables for 1 row
        cpu_kernels.attend(
            rows, cos[:1], cos, slot, slot.clone(), torch.zeros(2, 16), 0, 1, 1, 0.25
        )
    with pytest.raises(ValueError, match="wide"):
        cpu_kernels.Matrix.f32(torch.zeros(4, 8))(torch.zeros(1, 16))


def _rope(context: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin_signed [context, d] for rotate-half RoPE with theta 10000."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(context).float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos()] * 2, -1), torch.cat([-angles.sin(), angles.sin()], -1)


@pytest.mark.usefixtures("kernel_build")
@pytest.mark.parametrize(
    ("kv_cache", "head_dim"),
    # int8 caches' scale groups: part of one (16), and one whole and a part (40).
    [("auto", 16), ("float16", 16), ("int8", 16), ("int8", 40)],
)
def test_a_shard_runs_on_the_kernels_and_a_row_gets_the_same_bits_in_a_verification_step(
    tmp_path, kv_cache, head_dim
):
    write_tiny_model(tmp_path, "llama", head_dim=head_dim)
    ckpt = open_checkpoint(tmp_path)
    cfg = read_config(ckpt)
    shard, _ = load_shard(
        ckpt, cfg, ShardSpec.whole(cfg), torch.float32, 64, torch.device("cpu"), kv_cache=kv_cache
    )
    attention = [m for m in shard.modules() if isinstance(m, Attention)]
    assert attention and all(a.on_kernel for a in attention)
    assert all(layer.kernel is not None for layer in shard.stack.layers)  # whole layers
    cache = shard.new_cache(2, 64)
    prompt, drafts = torch.tensor([3, 14, 15, 9, 2, 6]), torch.tensor([5, 35, 8])
    with torch.inference_mode():
        for slot in (0, 1):
            shard(prompt, cache, [slot], [len(prompt)])
        together = shard(drafts, cache, [0], [3])
        alone = torch.cat([shard(drafts[i : i + 1], cache, [1], [1]) for i in range(3)])
    assert torch.equal(together, alone)


def _int8_keys(k: torch.Tensor, k_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 cache's keys and their scales, a vector to a row as its values are: the
    kernels hold them KV_BLOCK keys to a block of d / 4 runs of 64 bytes (run t: values
    4 t..4 t + 3 of each key, each + 128), the scales [groups][KV_BLOCK] per block."""
    *outer, positions, d = k.shape
    blocks = k.view(torch.uint8).view(*outer, positions // KV_BLOCK, d // 4, KV_BLOCK, 4)
    keys = blocks.transpose(-3, -2).reshape(*outer, positions, d).to(torch.int16) - 128
    groups = k_scale.shape[-1]
    scales = k_scale.view(*outer, positions // KV_BLOCK, groups, KV_BLOCK).transpose(-2, -1)
    return keys.to(torch.int8), scales.reshape(*outer, positions, groups)


def _per_value(scales: torch.Tensor, d: int) -> torch.Tensor:
    """Each group of KV_GROUP values' scale, for each of a vector's d values."""
    return scales.repeat_interleave(KV_GROUP, -1)[..., :d]


@pytest.mark.usefixtures("kernel_build")
@pytest.mark.parametrize(
    ("quant", "kv_cache", "dtype", "head_dim", "error"),
    # error: how far the outputs may stray from the float32 cache's, relative (int8: its
    # rounding is up to half a step of 1/127 of a group's largest value). Head sizes 16
    # and 40: an int8 vector is part of a scale group, or a whole one and a part.
    [
        ("int4", "auto", torch.float16, 16, 3e-3),
        ("int8", "auto", torch.float16, 16, 3e-3),
        ("int4", "int8", torch.int8, 16, 3e-2),
        ("none", "int8", torch.int8, 16, 3e-2),
        ("none", "int8", torch.int8, 40, 3e-2),
        ("none", "float16", torch.float16, 16, 3e-3),
    ],
)
def test_a_smaller_cache_holds_the_float32_values_rounded_and_attends_over_them(
    tmp_path, quant, kv_cache, dtype, head_dim, error
):
    """The kernels' float16 cache (the default with the weights quantized) holds the
    float32 cache's values rounded to nearest; their int8 cache (--kv-cache int8) holds
    them within half a step of each group of 32 values' scale, its largest magnitude /
    127 (70 positions: two chunks of keys). The step's outputs stay close to the float32
    cache's. Close, not within the cache's rounding: the quantized kernels round their
    inputs to 8 bits, and a nudged input can land on the next step."""
    write_tiny_model(tmp_path, "llama", intermediate_size=128, layers=1, head_dim=head_dim)
    ckpt = open_checkpoint(tmp_path)
    cfg = read_config(ckpt)
    shard, _ = load_shard(
        ckpt,
        cfg,
        ShardSpec.whole(cfg),
        torch.float32,
        128,
        torch.device("cpu"),
        quant=quant,
        kv_cache=kv_cache,
    )
    assert shard.stack.kernel_cache == dtype
    small, small_bytes = shard.new_cache(1, 128), shard.stack.cache_bytes_per_slot(128)
    shard.stack.kernel_cache = None
    full = shard.new_cache(1, 128)
    assert (small.k.dtype, full.k.dtype) == (dtype, torch.float32)
    assert small.nbytes == small_bytes < full.nbytes
    prompt = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = [shard(prompt, cache, [0], [70]) for cache in (small, full)]
        # The only layer's keys and values come from the same rows either way.
        held_keys = (small.k, small.k_scale)
        if dtype == torch.int8:
            held_keys = _int8_keys(small.k, small.k_scale)
        for values, scales, exact in (
            (*held_keys, full.k),
            (small.v, small.v_scale, full.v),
        ):
            held, exact = values[:, 0, :, :70].float(), exact[:, 0, :, :70]
            if scales is None:
                assert torch.equal(held, exact.half().float())
                continue
            d = exact.shape[-1]
            padded = F.pad(exact.abs(), (0, -d % KV_GROUP))
            step = padded.unflatten(-1, (-1, KV_GROUP)).amax(-1) / 127
            assert torch.equal(scales[:, 0, :, :70], step)
            held = held * _per_value(step, d)
            assert ((held - exact).abs() <= _per_value(step, d) * (0.5 + 1e-5)).all()
            assert not torch.equal(held, exact)
        assert (out[0] - out[1]).norm() <= error * out[1].norm()
        out = [shard(torch.tensor([5, 7]), cache, [0], [2]) for cache in (small, full)]
        assert (out[0] - out[1]).norm() <= error * out[1].norm()
    assert not torch.equal(out[0], out[1])  # the smaller cache was read


def test_an_int8_cache_is_refused_where_the_kernels_do_not_run_every_layer(tmp_path):
    write_tiny_model(tmp_path, "llama", intermediate_size=128, layers=1)
    ckpt = open_checkpoint(tmp_path)
    cfg = read_config(ckpt)
    args = (ckpt, cfg, ShardSpec.whole(cfg), torch.bfloat16, 128, torch.device("cpu"))
    with pytest.raises(
        ValueError, match="--kv-cache int8 needs the CPU kernels to run every layer"
    ):
        load_shard(*args, kv_cache="int8")
    with pytest.raises(ValueError, match="unknown KV cache type 'int4'"):
        load_shard(*args, kv_cache="int4")


def test_the_cache_keeps_the_last_builds_only(tmp_path, monkeypatch):
    # Every kernel source or compiler leaves a library: without pruning the cache grows
    # for good. The one just built or used is kept, whatever the others' ages.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "mtpd"
    folder.mkdir(mode=0o700)
    old = [folder / f"mtpd-cpu-kernels-{i:016x}.so" for i in range(kernel_library.KEPT_BUILDS)]
    for age, path in enumerate(old):
        path.write_bytes(b"")
        os.utime(path, (1e9 - age, 1e9 - age))  # old[0] the most recent of them
    compiler = shutil.which(os.environ.get("CC", "cc"))
    scalar_exp = ["-DMTPD_SCALAR_EXP", "-lm"]
    built = kernel_library.build(compiler, kernel_library.openmp_runtime(), scalar_exp, ())
    assert set(folder.glob("mtpd-cpu-kernels-*.so")) == {built, *old[:-1]}
    os.utime(built, (1e8, 1e8))  # long unused, then used again: it is the newest
    again = kernel_library.build(compiler, kernel_library.openmp_runtime(), scalar_exp, ())
    assert again == built
    assert built.stat().st_mtime > 1e9  # touched: the next build's pruning keeps it


def test_without_a_private_cache_a_process_builds_in_one_folder_it_removes():
    script = (
        "from mtpd.model import kernel_library as k\n"
        "k.private_cache_dir = lambda: None\n"
        "assert k.cache_dir() == k.cache_dir()\n"
        "print(k.cache_dir())\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    folder = Path(run.stdout.strip())
    assert folder.name.startswith("mtpd-kernel-")
    assert not folder.exists()


def test_the_kernels_build_with_scalar_exp_where_libmvec_does_not_link():
    # The fallback build_any takes when `-lmvec` fails: same results, lane by lane.
    compiler = shutil.which(os.environ.get("CC", "cc"))
    library = kernel_library.load(
        kernel_library.build(
            compiler, kernel_library.openmp_runtime(), ["-DMTPD_SCALAR_EXP", "-lm"], ()
        )
    )
    gate_up = torch.randn(3, 2 * 21, generator=torch.Generator().manual_seed(5)) * 4
    out = torch.empty(3, 21)
    library.mtpd_silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), 3, 21)
    gate, up = gate_up.split(21, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up)


@pytest.mark.parametrize(
    ("family", "quant"),
    [("llama", "none"), ("llama", "int4"), ("llama", "int8"), ("qwen2", "none")],
)  # qwen2: q, k and v biases
def test_a_decoder_layer_in_one_kernel_call_gives_the_bits_its_parts_give(tmp_path, family, quant):
    # The quantized layers' shapes fit the kernels' panels (whole groups of 32 inputs).
    write_tiny_model(tmp_path, family, intermediate_size=128)
    ckpt = open_checkpoint(tmp_path)
    cfg = read_config(ckpt)
    shard, _ = load_shard(
        ckpt, cfg, ShardSpec.whole(cfg), torch.float32, 64, torch.device("cpu"), quant=quant
    )
    shard.stack.kernel_cache = None  # the ops taken one by one read a float32 cache only
    layers = list(shard.stack.layers)
    kernels = [layer.kernel for layer in layers]
    assert all(k is not None for k in kernels)
    prompts = [torch.tensor([3, 14, 15, 9, 2, 6]), torch.tensor([27, 18, 28])]
    steps = [  # (slots, tokens): prompts, then a step of two sequences' verification rows
        ([0], prompts[0]),
        ([1], prompts[1]),
        ([0, 1], torch.tensor([5, 35, 8, 11])),
    ]

    def run(fused: bool | str) -> list[torch.Tensor]:
        # True: every layer in one call; "mixed": the first op by op, the others a call
        # each; False: op by op.
        for i, (layer, kernel) in enumerate(zip(layers, kernels, strict=True)):
            layer.kernel = kernel if fused is True or (fused == "mixed" and i) else None
        cache = shard.new_cache(2, 64)
        with torch.inference_mode():
            return [
                shard(ids, cache, slots, [3, 1] if len(slots) == 2 else [len(ids)])
                for slots, ids in steps
            ]

    for fused, mixed, parts in zip(run(True), run("mixed"), run(False), strict=True):
        assert torch.equal(fused, parts) and torch.equal(mixed, parts)

    # What would read or write beyond the cache or the rows is refused before C runs.
    cache = shard.new_cache(2, 8)
    cos, sin_signed = _rope(8, cfg.head_dim)
    with pytest.raises(ValueError, match="does not fit a cache"):  # no slot 2
        cpu_kernels.Step.of([2], [0], [1], cos[:1], sin_signed[:1], cache.k, cache.v)
    with pytest.raises(ValueError, match="does not fit a cache"):  # positions 7 and 8 of 8
        cpu_kernels.Step.of([0], [7], [2], cos, sin_signed, cache.k, cache.v)
    with pytest.raises(ValueError, match="rotary tables"):  # position 3 beyond the tables
        cpu_kernels.Step.of([0], [3], [1], cos[:3], sin_signed[:3], cache.k, cache.v)
    # An int8 cache: its scales, and whole blocks of positions.
    shard.stack.kernel_cache = torch.int8
    held = shard.new_cache(2, 8)
    assert held.k.shape[-2] == KV_BLOCK
    with pytest.raises(TypeError, match="needs float32 scales"):
        cpu_kernels.Step.of([0], [0], [1], cos[:1], sin_signed[:1], held.k, held.v)
    with pytest.raises(ValueError, match="does not fit a cache"):
        cut = (t[..., :8, :].contiguous() for t in (held.k, held.v, held.k_scale, held.v_scale))
        cpu_kernels.Step.of([0], [0], [1], cos[:1], sin_signed[:1], *cut)
    shard.stack.kernel_cache = None
    step = cpu_kernels.Step.of([0], [0], [1], cos[:1], sin_signed[:1], cache.k, cache.v)
    x = torch.zeros(1, cfg.hidden_size)
    first = cpu_kernels.Layers(kernels[:1])
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.decoder_layers(first, step, len(layers), x)  # no such layer
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.decoder_layers(first, step, 0, torch.zeros(2, cfg.hidden_size))
    assert cpu_kernels.decoder_layers(first, step, 0, x).shape == x.shape
    # The C sizes a step's buffers by the first layer: layers of other sizes are refused.
    k = kernels[1]
    other = SimpleNamespace(
        hidden=k.hidden, heads=k.heads // 2, kv_heads=k.kv_heads, head_dim=k.head_dim
    )
    with pytest.raises(ValueError, match="layers of different sizes"):
        cpu_kernels.Layers([kernels[0], other])
    with pytest.raises(ValueError, match="no layers"):
        cpu_kernels.Layers([])


@pytest.mark.usefixtures("kernel_build")
def test_an_int8_layer_packed_in_another_row_order_gives_the_same_bits_and_lends_its_first_rows():
    """An LM head packed with a draft vocabulary's rows first (worker/shard_loading.py)
    still writes each output to its own column, bit for bit, whatever the rows beside;
    its first rows, lent to a draft head, compute what a copy of them does. 90 rows and
    18 lent ones: both padded to whole panels. No layer takes a reordered product where
    a residual is added in column order."""
    g = torch.Generator().manual_seed(5)
    w, bias = torch.randn(90, 64, generator=g), torch.randn(90, generator=g)
    x = torch.randn(11, 64, generator=g)
    first = torch.randperm(90, generator=g)[:18]
    rest = torch.ones(90, dtype=torch.bool)
    rest[first] = False
    order = torch.cat([first, rest.nonzero().flatten()])
    plain, reordered = Int8Linear(w, bias), Int8Linear(w, bias, order=order)
    together = plain(x)
    assert torch.equal(reordered(x), together)
    for i in range(11):
        assert torch.equal(reordered(x[i : i + 1]), together[i : i + 1])
    lent = reordered.leading(18)
    assert lent.matrix.n == 32 and lent.out_features == 18
    assert torch.equal(lent(x), together[:, first])
    assert torch.equal(lent(x), Int8Linear(w[first], bias[first])(x))
    with pytest.raises(ValueError, match=r"each of 0\.\.89 once"):
        Int8Linear(w, bias, order=torch.cat([first, first, rest.nonzero().flatten()[:54]]))
    with pytest.raises(ValueError, match="leading rows"):
        plain.matrix.leading(18)
    with pytest.raises(ValueError, match="reordered already"):
        reordered.matrix.ordered(torch.arange(96))
    with pytest.raises(ValueError, match="packed in an order"):
        plain.leading(18)
    hidden, fc = 32, torch.randn(32, 64, generator=g)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_kernels.MTPInput.of(
            (torch.ones(hidden), torch.ones(hidden)),
            [],
            1e-5,
            None,
            Int8Linear(fc, None, order=torch.randperm(hidden, generator=g)).matrix,
        )
