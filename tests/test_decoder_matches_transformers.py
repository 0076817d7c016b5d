"""The decoder's logits equal the reference implementation's on the same files (float32).

The reference runs the whole sequence without a cache at every check, so any error in
our cache handling (append, rollback, batching) shows up as a logit difference.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import write_tiny_model

from mtpd.model.checkpoint import open_checkpoint
from mtpd.model.config import ModelConfig
from mtpd.model.decoder import DecoderShard, ShardSpec
from mtpd.model.layers import pack_for_inference

TOL = 1e-4
VOCAB = 96


def load(path) -> DecoderShard:
    ckpt = open_checkpoint(path)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    shard = DecoderShard.load(ckpt, cfg, ShardSpec.whole(cfg), torch.float32, max_context=256)
    pack_for_inference(shard)  # the layout workers run
    return shard


def reference_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


def step(model: DecoderShard, cache, slot: int, keep: int, tokens: list[int]) -> torch.Tensor:
    cache.truncate(slot, keep)
    h = model(torch.tensor(tokens), cache, [slot], [len(tokens)])
    return model.logits(h)


CASES = [
    (f, tied, gqa)
    for f in ("llama", "qwen2", "qwen3")
    for tied in (False, True)
    for gqa in (1, 2, 4)
]


@pytest.mark.parametrize(("family", "tied", "gqa"), CASES)
def test_prefill_decode_and_verification_pattern(tmp_path, family, tied, gqa):
    ref = write_tiny_model(tmp_path, family, tied=tied, gqa=gqa, vocab=VOCAB)
    model = load(tmp_path)
    cache = model.new_cache(max_seqs=2, max_context=256)
    slot = cache.slot("s")
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, VOCAB, (11,), generator=g).tolist()

    # Prefill: every prompt position.
    got = step(model, cache, slot, 0, seq)
    assert (got - reference_logits(ref, seq)).abs().max() <= TOL

    # 20 single-token decode steps.
    for _ in range(20):
        seq.append(int(torch.randint(0, VOCAB, (1,), generator=g)))
        got = step(model, cache, slot, len(seq) - 1, seq[-1:])
        assert (got[-1] - reference_logits(ref, seq)[-1]).abs().max() <= TOL

    # Verification pattern: append 5, keep all but the last 3, append 4 — repeated.
    for _ in range(4):
        new = torch.randint(0, VOCAB, (5,), generator=g).tolist()
        got = step(model, cache, slot, len(seq), new)
        assert (got - reference_logits(ref, seq + new)[-5:]).abs().max() <= TOL
        seq = seq + new[:2]
        new = torch.randint(0, VOCAB, (4,), generator=g).tolist()
        got = step(model, cache, slot, len(seq), new)
        seq = seq + new
        assert (got - reference_logits(ref, seq)[-4:]).abs().max() <= TOL
    assert cache.lengths[slot] == len(seq)


def test_batched_sequences_with_different_cache_lengths(tmp_path):
    ref = write_tiny_model(tmp_path, "qwen3", gqa=2, vocab=VOCAB)
    model = load(tmp_path)
    cache = model.new_cache(max_seqs=4, max_context=256)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 17, 9)]
    slots = [cache.slot(str(i)) for i in range(3)]
    for slot, s in zip(slots, seqs, strict=True):
        step(model, cache, slot, 0, s)
    # One step mixing a 1-token decode, a 4-token verification and a 2-token append.
    new = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 4, 2)]
    flat = torch.tensor([t for part in new for t in part])
    logits = model.logits(model(flat, cache, slots, [len(p) for p in new]))
    offset = 0
    for s, part in zip(seqs, new, strict=True):
        want = reference_logits(ref, s + part)[-len(part) :]
        assert (logits[offset : offset + len(part)] - want).abs().max() <= TOL
        offset += len(part)


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scalings(tmp_path, variant):
    rope = {"rope_theta": 10000.0, **ROPE_VARIANTS[variant]}
    ref = write_tiny_model(tmp_path, "llama", vocab=VOCAB, rope_parameters=rope)
    model = load(tmp_path)
    assert model.cfg.rope_type == variant
    cache = model.new_cache(max_seqs=1, max_context=256)
    ids = torch.randint(0, VOCAB, (80,), generator=torch.Generator().manual_seed(3)).tolist()
    got = step(model, cache, cache.slot("s"), 0, ids)
    assert (got - reference_logits(ref, ids)).abs().max() <= TOL


def test_sharded_checkpoint_and_partial_reads(tmp_path):
    ref = write_tiny_model(tmp_path, "qwen2", vocab=VOCAB, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model = load(tmp_path)
    cache = model.new_cache(max_seqs=1, max_context=256)
    ids = list(range(5, 30))
    assert (
        step(model, cache, cache.slot("s"), 0, ids) - reference_logits(ref, ids)
    ).abs().max() <= TOL

    # A middle shard reads its own layers and nothing else.
    ckpt = open_checkpoint(tmp_path)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    asked: list[str] = []
    read = ckpt.read
    ckpt.read = lambda names: asked.extend(names) or read(names)
    middle = DecoderShard.load(ckpt, cfg, ShardSpec(1, 3, False, False), torch.float32, 64)
    assert {n.split(".")[2] for n in asked} == {"1", "2"}
    assert middle.embedding is None and middle.lm_head is None and len(middle.stack.layers) == 2
