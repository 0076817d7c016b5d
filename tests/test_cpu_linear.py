"""The float32 AVX2 kernel behind CPU linear layers (model/cpu_linear.py): the same
products as F.linear, bit-identical for a row alone or among others, and what layers
and shards do with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import write_tiny_model

from mtpd.model import cpu_linear
from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.decoder import ShardSpec
from mtpd.model.layers import Linear
from mtpd.worker.engine import load_shard


def test_the_kernel_is_built_on_these_machines():
    # CI's machines and this project's are x86 with AVX2 and a C compiler: a fallback to
    # oneDNN there would be a silent 1.5x slowdown, so it fails here instead.
    assert cpu_linear.available_for(torch.zeros(4, 8))


@pytest.mark.parametrize("out_features", [1, 3, 4, 98, 3072])
@pytest.mark.parametrize("bias", [False, True])
def test_it_computes_what_f_linear_does(out_features, bias):
    g = torch.Generator().manual_seed(out_features)
    w = torch.randn(out_features, 576, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    for rows in (0, 1, 2, 3, 4, 5, 7, 8, 33):
        x = torch.randn(rows, 576, generator=g)
        torch.testing.assert_close(
            cpu_linear.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4
        )
    # Any leading shape, and inputs that are views.
    x = torch.randn(2, 5, 576, generator=g)
    torch.testing.assert_close(
        cpu_linear.linear(x[:, 1:4], w, b), F.linear(x[:, 1:4], w, b), rtol=1e-5, atol=1e-4
    )


def test_a_row_gets_the_same_bits_alone_or_in_a_step_of_many():
    # What lets a verification step of k+1 rows reproduce one-row decoding exactly.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 1536, generator=g)
    x = torch.randn(9, 1536, generator=g)
    together = cpu_linear.linear(x, w, None)
    for i in range(9):
        assert torch.equal(cpu_linear.linear(x[i : i + 1], w, None), together[i : i + 1])
    assert torch.equal(cpu_linear.linear(x[2:7], w, None), together[2:7])
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert torch.equal(cpu_linear.linear(x, w, None), together)
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
