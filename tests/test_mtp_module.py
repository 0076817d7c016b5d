"""The MTP module against a computation written out by hand from its definition."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tiny_models import random_head, write_tiny_model

from mtpd.model.checkpoint import open_checkpoint
from mtpd.model.config import ModelConfig
from mtpd.model.decoder import EMBEDDING, DecoderShard, ShardSpec
from mtpd.model.errors import ModelLoadError
from mtpd.model.layers import pack_for_inference
from mtpd.model.mtp import (
    DRAFT_VOCAB,
    MTPHead,
    from_deepseek_layout,
    read_head_file,
    save_head_file,
)
from mtpd.model.quant import Int8Linear, LeadingRows, quantize_head
from mtpd.worker import shard_loading
from mtpd.worker.memory import tensor_bytes
from mtpd.worker.shard_loading import load_shard

VOCAB = 96


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def hand_computed_logits(cfg, hf_cfg, head, embedding, hidden, next_tokens) -> torch.Tensor:
    eps = cfg.rms_norm_eps
    e = embedding[next_tokens]
    h = rms(hidden[:, : cfg.hidden_size], head["mtp.pre_fc_norm_hidden.weight"], eps)
    if "mtp.fuse.weight" in head:  # hidden: [final, tap 0, tap 1, ...], each normed, mixed
        taps = hidden[:, cfg.hidden_size :].split(cfg.hidden_size, -1)
        normed = [rms(t, head[f"mtp.pre_fc_norm_taps.{i}.weight"], eps) for i, t in enumerate(taps)]
        h = torch.cat([h, *normed], -1) @ head["mtp.fuse.weight"].T
    x = (
        torch.cat([rms(e, head["mtp.pre_fc_norm_embedding.weight"], eps), h], dim=-1)
        @ head["mtp.fc.weight"].T
    )
    # The decoder layer of the trunk's family, from the reference implementation.
    layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(hf_cfg, layer_idx=0).eval()
    layer.load_state_dict(
        {
            k.removeprefix("mtp.layers.0."): v
            for k, v in head.items()
            if k.startswith("mtp.layers.0.")
        }
    )
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    n = x.shape[0]
    positions = torch.arange(n)[None]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        y = layer(
            x[None],
            attention_mask=mask,
            position_ids=positions,
            position_embeddings=rotary(x[None], positions),
        )
    y = y[0] if isinstance(y, tuple) else y
    return rms(y[0], head["mtp.norm.weight"], eps) @ embedding.T


def build(tmp_path):
    ref = write_tiny_model(tmp_path, "llama", tied=True, vocab=VOCAB)
    ckpt = open_checkpoint(tmp_path)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    trunk = DecoderShard.load(ckpt, cfg, ShardSpec.whole(cfg), torch.float32, 128)
    return ref, ckpt, cfg, trunk


def run_head(mtp: MTPHead, hidden, next_tokens, chunks) -> torch.Tensor:
    """Feed the sequence in chunks (as verification steps would) and collect logits."""
    cache = mtp.new_cache(1, 128)
    slot = cache.slot("s")
    out, start = [], 0
    for c in chunks:
        states = mtp(hidden[start : start + c], next_tokens[start : start + c], cache, [slot], [c])
        out.append(mtp.draft_logits(states))
        start += c
    return torch.cat(out)


def test_mtp_head_matches_hand_computation(tmp_path):
    ref, _, cfg, trunk = build(tmp_path)
    head = random_head(cfg)
    mtp = MTPHead(cfg, head, trunk.embedding, trunk.lm_head, 128, torch.float32)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(9, cfg.hidden_size, generator=g)
    next_tokens = torch.randint(0, VOCAB, (9,), generator=g)
    want = hand_computed_logits(
        cfg, ref.config, head, trunk.embedding.detach(), hidden, next_tokens
    )
    assert (run_head(mtp, hidden, next_tokens, [9]) - want).abs().max() <= 1e-4
    # Incremental use through the head's own cache gives the same rows.
    assert (run_head(mtp, hidden, next_tokens, [4, 1, 3, 1]) - want).abs().max() <= 1e-4
    # A draft is the first largest logit, its probability the softmax there.
    cache = mtp.new_cache(1, 128)
    states = mtp(hidden, next_tokens, cache, [cache.slot("s")], [9])
    logits = mtp.draft_logits(states)
    ids, probs = mtp.draft(states, probabilities=True)
    assert ids.tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(probs, torch.softmax(logits, -1).amax(-1), rtol=1e-5)
    assert mtp.draft(states)[1] is None  # not asked for: not computed


def test_fused_head_matches_hand_computation(tmp_path):
    """A head of fused trunk features (EAGLE-3) mixes the normed final state and taps; on
    its own states (drafting on) it reads them as a plain head does."""
    ref, _, cfg, trunk = build(tmp_path)
    head = random_head(cfg, seed=2, taps=(1, 3))
    mtp = MTPHead(cfg, head, trunk.embedding, trunk.lm_head, 128, torch.float32)
    assert mtp.tap_layers == (1, 3)
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(9, 3 * cfg.hidden_size, generator=g)
    next_tokens = torch.randint(0, VOCAB, (9,), generator=g)
    want = hand_computed_logits(cfg, ref.config, head, trunk.embedding.detach(), rows, next_tokens)
    assert (run_head(mtp, rows, next_tokens, [9]) - want).abs().max() <= 1e-4
    assert (run_head(mtp, rows, next_tokens, [4, 1, 3, 1]) - want).abs().max() <= 1e-4
    # The taps count: other taps beside the same final states, other logits.
    other = torch.cat([rows[:, : cfg.hidden_size], rows[:, cfg.hidden_size :].flip(0)], -1)
    assert (run_head(mtp, other, next_tokens, [9]) - want).abs().max() > 1e-2
    plain = {k: v for k, v in head.items() if k != "mtp.fuse.weight"}
    states = rows[:, : cfg.hidden_size]
    assert torch.allclose(
        run_head(mtp, states, next_tokens, [9]),
        hand_computed_logits(cfg, ref.config, plain, trunk.embedding.detach(), states, next_tokens),
        atol=1e-4,
    )
    for bad, why in (
        ({"mtp.tap_layers": torch.tensor([3, 1])}, r"\[3, 1\] must increase"),
        ({"mtp.tap_layers": torch.tensor([1, 4])}, r"within 1\.\.3"),
        ({"mtp.tap_layers": torch.tensor([1.0, 3.0])}, "must list trunk layer numbers"),
        ({"mtp.tap_layers": torch.tensor([1])}, "mtp.fuse.weight' has shape"),
        ({DRAFT_VOCAB: torch.tensor([4, 9, 4])}, "distinct token ids below 96"),
        ({DRAFT_VOCAB: torch.tensor([4, 96])}, "distinct token ids below 96"),
    ):
        with pytest.raises(ModelLoadError, match=why):
            MTPHead(cfg, head | bad, trunk.embedding, trunk.lm_head, 128, torch.float32)


@pytest.mark.parametrize("int8", [False, True])
def test_a_packed_heads_input_is_one_kernel_call_with_the_per_op_bits(tmp_path, int8):
    """On the CPU kernels a head's norms, fuse and fc run as one call: the same kernels in
    the same order as op by op, so the same bits, and the hand computation's logits."""
    ref, _, cfg, trunk = build(tmp_path)
    head = random_head(cfg, seed=2, taps=(1, 3))
    mtp = MTPHead(cfg, head, trunk.embedding, trunk.lm_head, 128, torch.float32)
    if int8:
        quantize_head(mtp)
    pack_for_inference(mtp)
    assert mtp._input_on_kernel() is not None
    g = torch.Generator().manual_seed(6)
    rows = torch.randn(9, 3 * cfg.hidden_size, generator=g)
    next_tokens = torch.randint(0, VOCAB, (9,), generator=g)
    e = torch.nn.functional.embedding(next_tokens, mtp.embedding)
    for hidden in (rows, rows[:, : cfg.hidden_size]):  # trunk rows with taps; head states
        per_op = mtp.fc(torch.cat([mtp.norm_embedding(e), mtp._hidden(hidden)], -1))
        assert torch.equal(mtp._input(hidden, next_tokens), per_op)
    if not int8:
        want = hand_computed_logits(
            cfg, ref.config, head, trunk.embedding.detach(), rows, next_tokens
        )
        assert (run_head(mtp, rows, next_tokens, [4, 1, 3, 1]) - want).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="do not fit a head"):
        mtp._input(rows[:, : 2 * cfg.hidden_size], next_tokens)


@pytest.mark.parametrize(
    ("int8", "draft_vocab", "half_cache"), [(False, False, False), (True, True, True)]
)
def test_a_packed_heads_pass_and_drafts_are_one_kernel_call_with_the_per_op_bits(
    tmp_path, monkeypatch, int8, draft_vocab, half_cache
):
    """On the CPU kernels a head's whole pass (embedding, input, layer, norm, draft head,
    greedy pick) is one call: the same states, drafts and cache entries, bit for bit, as
    its calls one by one, over sequences of several rows and a recursive pass after."""
    # An intermediate size the int8 panels take (32 columns a group).
    write_tiny_model(tmp_path, "llama", tied=True, vocab=VOCAB, intermediate_size=128)
    ckpt = open_checkpoint(tmp_path)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    trunk = DecoderShard.load(ckpt, cfg, ShardSpec.whole(cfg), torch.float32, 128)
    head = random_head(cfg, seed=4, taps=(1, 3))
    if draft_vocab:
        head[DRAFT_VOCAB] = torch.tensor([5, 90, 17, 3, 64, 41, 8, 77])
    mtp = MTPHead(cfg, head, trunk.embedding, trunk.lm_head, 128, torch.float32)
    if int8:
        quantize_head(mtp)
    pack_for_inference(mtp)
    if half_cache:
        assert mtp.stack.use_kernel_cache(torch.float16)
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(7, 3 * cfg.hidden_size, generator=g)
    next_tokens = torch.randint(0, VOCAB, (7,), generator=g)
    caches = [mtp.new_cache(3, 64) for _ in range(2)]
    slots = [[c.slot(s) for s in ("a", "b")] for c in caches]
    per_op = mtp.forward(rows, next_tokens, caches[1], slots[1], [4, 3])[[3, 6]]
    per_op_drafts = mtp.draft(per_op)[0]

    def one_call(*args, **kwargs):  # the calls one by one must not run
        with monkeypatch.context() as m:
            m.setattr(MTPHead, "forward", None)
            m.setattr(MTPHead, "draft", None)
            return mtp.forward_and_draft(*args, **kwargs)

    states, drafts, probs, rows_s = one_call(rows, next_tokens, caches[0], slots[0], [4, 3], [3, 6])
    assert probs is None and rows_s > 0
    assert torch.equal(states, per_op) and torch.equal(drafts, per_op_drafts)
    if draft_vocab:
        assert set(drafts.tolist()) <= set(head[DRAFT_VOCAB].tolist())
    # Drafting on: the head's own states, one row per sequence (every row drafts).
    again, again_drafts, _, _ = one_call(states, drafts, caches[0], slots[0], [1, 1])
    per_op = mtp.forward(per_op, per_op_drafts, caches[1], slots[1], [1, 1])
    assert torch.equal(again, per_op) and torch.equal(again_drafts, mtp.draft(per_op)[0])
    # A pass that only catches the cache up drafts nothing.
    caught_up, no_drafts, _, _ = one_call(again, again_drafts, caches[0], slots[0], [1, 1], [])
    mtp.forward(per_op, again_drafts, caches[1], slots[1], [1, 1])
    assert caught_up.shape == (0, cfg.hidden_size) and no_drafts.numel() == 0
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert caches[0].lengths == caches[1].lengths == [6, 5, 0]
    # Asked for the drafts' probabilities, the pass runs op by op (the kernel gives none).
    _, _, probs, _ = mtp.forward_and_draft(
        states, drafts, caches[0], slots[0], [1, 1], [0, 1], probabilities=True
    )
    assert probs is not None and probs.shape == (2,)
    if not int8:  # a NaN logit is drafted as numpy's argmax takes it: the first NaN
        mtp.draft_head.weight.data[[11, 8]] = float("nan")
        _, nan_drafts, _, _ = one_call(states, drafts, caches[0], slots[0], [1, 1])
        assert nan_drafts.tolist() == [8, 8] == mtp.draft(states)[0].tolist()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mtp.forward_and_draft(rows, next_tokens + VOCAB, caches[0], slots[0], [4, 3], [3])
    with pytest.raises(ValueError, match="do not fit a step"):
        mtp.forward_and_draft(rows, next_tokens, caches[0], slots[0], [4, 3], [7])


def test_deepseek_layout_and_head_file_load_the_same_module(tmp_path):
    _, _, cfg, trunk = build(tmp_path)
    head = random_head(cfg, seed=3)
    renames = {
        "mtp.fc.weight": "eh_proj.weight",
        "mtp.pre_fc_norm_embedding.weight": "enorm.weight",
        "mtp.pre_fc_norm_hidden.weight": "hnorm.weight",
        "mtp.norm.weight": "shared_head.norm.weight",
    }
    n = cfg.num_layers
    deepseek = {
        f"model.layers.{n}." + (renames.get(k) or k.removeprefix("mtp.layers.0.")): v
        for k, v in head.items()
    }
    deepseek[f"model.layers.{n}.shared_head.head.weight"] = trunk.embedding.detach().clone()
    assert set(from_deepseek_layout(deepseek, n)) == set(head)

    file = tmp_path / "head.safetensors"
    save_file(head, file)
    from_file, _ = read_head_file(file)
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(5, cfg.hidden_size, generator=g)
    toks = torch.randint(0, VOCAB, (5,), generator=g)
    outs = [
        run_head(
            MTPHead(cfg, t, trunk.embedding, trunk.lm_head, 128, torch.float32), hidden, toks, [5]
        )
        for t in (head, from_deepseek_layout(deepseek, n), from_file)
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert EMBEDDING not in from_deepseek_layout(deepseek, n)


def test_head_inside_the_checkpoint_is_found(tmp_path):
    from safetensors.torch import load_file

    from mtpd.model.mtp import read_checkpoint_head

    _, ckpt, cfg, _ = build(tmp_path)
    assert read_checkpoint_head(ckpt, cfg) is None
    head = random_head(cfg, seed=4)
    file = tmp_path / "model.safetensors"
    save_file({**load_file(file), **head}, file, metadata={"format": "pt"})
    found = read_checkpoint_head(open_checkpoint(tmp_path), cfg)
    assert found is not None and set(found) == set(head)
    assert all(torch.equal(found[k], head[k]) for k in head)


@pytest.mark.parametrize("packed", [False, True])  # packed: the head's pass is one kernel call
def test_the_heads_cache_caught_up_lazily_drafts_as_if_kept_current(tmp_path, monkeypatch, packed):
    """Steps that draft nothing leave the head idle (their entries are kept back); the
    next step that drafts runs it over them all at once. Its drafts and its cache then
    equal those of a head that ran at every step, through a replay from position 0 and
    past MAX_DEFERRED held entries."""
    from mtpd.worker import drafter as drafter_module
    from mtpd.worker.drafter import Advance, Drafter, Rows

    monkeypatch.setattr(drafter_module, "MAX_DEFERRED", 16)  # reached within the test
    # Steps of up to 3 rows are held by reference, longer ones copied (this test
    # scribbles over those after each step: the held rows must be copies).
    monkeypatch.setattr(drafter_module, "_SHARE_ROWS", 3)
    _, _, cfg, trunk = build(tmp_path)
    mtp = MTPHead(cfg, random_head(cfg, seed=7), trunk.embedding, trunk.lm_head, 128, torch.float32)
    if packed:
        pack_for_inference(mtp)
        assert mtp._pass_on_kernel(mtp.new_cache(1, 8), torch.zeros(1, cfg.hidden_size))
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(128, cfg.hidden_size, generator=g)
    tokens = torch.randint(0, VOCAB, (129,), generator=g).tolist()
    # (keep, positions) per step: a prompt, decode and verification steps, positions sent
    # again, a replay from 0, and a stretch longer than MAX_DEFERRED.
    steps, p = [(0, 6)], 6
    for i in range(20):
        steps.append((p, 1 + i % 3))
        p += 1 + i % 3
        if i == 8:  # positions sent again while some are held back: cut, then re-added
            steps.append((p - 2, 3))
            p += 1
    steps.append((0, p))  # a replay of the whole history
    for _ in range(16 + 5):
        steps.append((p, 1))
        p += 1
    drafting = {5, 18, 22, len(steps) - 1}  # the steps where the lazy head drafts

    eager, lazy = Drafter(mtp, 1, 128), Drafter(mtp, 1, 128)
    for n, (keep, m) in enumerate(steps):
        items = []
        held_before = len(lazy._deferred["s"].tokens) if "s" in lazy._deferred else 0
        for drafter, want in ((eager, 2), (lazy, 2 if n in drafting else 0)):
            states = hidden[keep : keep + m].clone()  # the step's own tensor
            item = Advance(
                "s", keep, tokens[keep], Rows(states, 0, m), tokens[keep + 1 : keep + m + 1], want
            )
            drafter.advance([item])
            if m > 3:
                states.fill_(float("nan"))
            items.append(item)
        # The eager head never holds entries back, so it never catches up; the lazy one
        # does only over entries it held (time the cost model keeps off a draft's bill).
        assert eager.catch_up_s == 0.0
        assert lazy.catch_up_s == 0.0 or held_before > 0, n
        assert lazy.catch_up_s > 0 or n != 5  # its first draft, after 5 steps held back
        # The first pass's time (the cost model prices it apart) holds any catch-up.
        for drafter in (eager, lazy):
            assert (drafter.passes > 0) == (drafter.first_pass_s > 0), n
            assert drafter.first_pass_s >= drafter.catch_up_s
        held = len(lazy._deferred["s"].tokens) if "s" in lazy._deferred else 0  # bounded
        assert held < 16
        if n in drafting:
            assert items[1].drafts == items[0].drafts and items[0].drafts, n
            slot = eager.cache.slot("s")
            assert lazy.cache.lengths[slot] == eager.cache.lengths[slot] == keep + m
            for mine, theirs in ((lazy.cache.k, eager.cache.k), (lazy.cache.v, eager.cache.v)):
                length = keep + m
                torch.testing.assert_close(mine[:, slot, :, :length], theirs[:, slot, :, :length])


def test_held_rows_of_shared_steps_are_referenced_copied_and_merged(tmp_path, monkeypatch):
    """Two sequences step together, their rows in one tensor: a small step's rows are
    held by reference, a large one's copied (each sequence's at its own offset in one
    copy), and a sequence's blocks merged once it holds more than _MAX_BLOCKS; when both
    draft, the drafts and caches equal a head's that ran at every step."""
    from mtpd.worker import drafter as drafter_module
    from mtpd.worker.drafter import Advance, Drafter, Rows

    monkeypatch.setattr(drafter_module, "_SHARE_ROWS", 4)
    monkeypatch.setattr(drafter_module, "_MAX_BLOCKS", 3)
    _, _, cfg, trunk = build(tmp_path)
    mtp = MTPHead(cfg, random_head(cfg, seed=5), trunk.embedding, trunk.lm_head, 64, torch.float32)
    g = torch.Generator().manual_seed(3)
    hidden = {s: torch.randn(64, cfg.hidden_size, generator=g) for s in "ab"}
    tokens = {s: torch.randint(0, VOCAB, (65,), generator=g).tolist() for s in "ab"}
    # Rows per sequence per step: prompts of 6 and 5 (11 rows: copied), decode steps of
    # 1 + 1 (by reference), a verification of 3 + 2 (copied), decode steps again.
    steps = [{"a": 6, "b": 5}] + [{"a": 1, "b": 1}] * 3 + [{"a": 3, "b": 2}]
    steps += [{"a": 1, "b": 1}] * 5
    eager, lazy = Drafter(mtp, 2, 64), Drafter(mtp, 2, 64)
    at = {"a": 0, "b": 0}
    for n, rows in enumerate(steps):
        last = n == len(steps) - 1
        states = torch.cat([hidden[s][at[s] : at[s] + m] for s, m in rows.items()])
        drafted = []
        for drafter, want in ((eager, 2), (lazy, 2 if last else 0)):
            step = states.clone()
            items, first = [], 0
            for s, m in rows.items():
                keep = at[s]
                next_tokens = tokens[s][keep + 1 : keep + m + 1]
                items.append(
                    Advance(s, keep, tokens[s][keep], Rows(step, first, m), next_tokens, want)
                )
                first += m
            drafter.advance(items)
            if drafter is lazy and not last:
                for s in rows:
                    blocks = lazy._deferred[s].blocks
                    assert len(blocks) <= 3
                    # By reference exactly when the step is small and nothing was merged.
                    assert (blocks[-1].states is step) == (len(states) <= 4 and len(blocks) > 1)
            if len(states) > 4:
                step.fill_(float("nan"))  # a copied step's tensor is never read again
            drafted.append([item.drafts for item in items])
        for s, m in rows.items():
            at[s] += m
        assert drafted[0] == drafted[1] or not last, n
    assert all(d for d in drafted[1])
    for s in "ab":
        slot = eager.cache.slot(s)
        assert lazy.cache.slot(s) == slot and lazy.cache.lengths[slot] == at[s]
        for mine, theirs in ((lazy.cache.k, eager.cache.k), (lazy.cache.v, eager.cache.v)):
            torch.testing.assert_close(mine[:, slot, :, : at[s]], theirs[:, slot, :, : at[s]])


def test_held_entries_are_cut_across_and_within_their_row_blocks():
    from mtpd.worker.drafter import Rows, _Held

    def blocks() -> list[Rows]:  # rows 0..5 as three blocks of other tensors' rows
        return [
            Rows(torch.arange(4.0)[:, None], 0, 3),
            Rows(torch.tensor([[9.0], [3.0], [4.0]]), 1, 2),
            Rows(torch.tensor([[5.0]]), 0, 1),
        ]

    for n in (6, 7, 5, 4, 3, 2, 0):
        held = _Held(blocks(), list(range(6)))
        held.keep(n)
        kept = min(n, 6)
        assert held.tokens == list(range(kept))
        rows = torch.cat([b.tensor() for b in held.blocks]) if held.blocks else torch.empty(0, 1)
        assert torch.equal(rows, torch.arange(float(kept))[:, None]), n


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_head_drafts_from_the_lm_heads_own_rows_where_both_are_int8(tmp_path, monkeypatch, quant):
    """With the trunk's LM head at int8 on the kernels (--quant int8, and int4 for a head
    stored at 8 bits) the draft vocabulary's rows are the LM head's, not a copy: the same
    logits and drafts, bit for bit, as a load that copies them."""
    write_tiny_model(tmp_path, "llama", tied=True, vocab=VOCAB, intermediate_size=128)
    ckpt = open_checkpoint(tmp_path)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    head = random_head(cfg, seed=4)
    head[DRAFT_VOCAB] = torch.tensor(
        [5, 90, 17, 3, 64, 41, 8, 77, 30, 2, 51, 60, 11, 95, 70, 24, 6]
    )
    save_head_file(tmp_path / "head.safetensors", head, {})
    # Stored at 8 bits, as the default model's tied embedding is.
    monkeypatch.setattr(type(ckpt), "stored_at_8_bits", lambda self, names: names == (EMBEDDING,))

    def load():
        return load_shard(
            ckpt,
            cfg,
            ShardSpec.whole(cfg),
            torch.float32,
            64,
            torch.device("cpu"),
            mtp_head=tmp_path / "head.safetensors",
            quant=quant,
        )

    shard, mtp = load()
    with monkeypatch.context() as m:
        m.setattr(shard_loading, "draft_rows_first", lambda ids, rows: None)
        copied_shard, copied = load()
    assert isinstance(mtp.draft_head, LeadingRows) and isinstance(copied.draft_head, Int8Linear)
    assert mtp.draft_head.matrix.q == shard.lm_head.matrix.q  # the LM head's own bytes
    assert tensor_bytes(mtp, shard) < tensor_bytes(copied, copied_shard)
    g = torch.Generator().manual_seed(3)
    rows, next_tokens = torch.randn(5, cfg.hidden_size, generator=g), torch.randint(0, VOCAB, (5,))
    assert torch.equal(shard.logits(rows), copied_shard.logits(rows))
    passes = [
        head.forward_and_draft(rows, next_tokens, cache, [cache.slot("a")], [5])
        for head, cache in ((mtp, mtp.new_cache(1, 64)), (copied, copied.new_cache(1, 64)))
    ]
    assert torch.equal(passes[0].states, passes[1].states)
    assert torch.equal(passes[0].drafts, passes[1].drafts)
