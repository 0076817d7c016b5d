"""Qwen3.5/3.6 hybrid decoders (Gated DeltaNet + gated attention, dense and MoE) against
the reference implementation in `transformers`, float32.

The reference reruns the whole sequence without a cache at every check, so any error
in the recurrent states, their rollback, the KV cache or the layer split shows up as a
logit difference. A pipeline of W workers is played here in one process: W shards,
each with only its layers and its own cache, the hidden states handed from one to the
next (the worker processes themselves are tested in test_qwen35_pipeline.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import write_tiny_model, write_tiny_multimodal_qwen3_5

from mtpd.daemon.split import layer_ranges
from mtpd.model import delta_rule
from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.config import ModelConfig
from mtpd.model.decoder import DecoderShard, ShardSpec
from mtpd.model.errors import ModelLoadError
from mtpd.model.layers import pack_for_inference
from mtpd.model.linear_state import ROLLBACK_POSITIONS

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
VOCAB = 96
FAMILIES = ["qwen3_5", "qwen3_5_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    """The reference and the checkpoint it wrote: 5 layers, full attention at the 2nd and
    5th, so splits put linear-attention and attention layers on either side."""
    path = tmp_path_factory.mktemp(request.param)
    kinds = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    ref = write_tiny_model(
        path, request.param, layers=5, vocab=VOCAB, layer_types=[*kinds, "full_attention"]
    )
    return ref, path


def load_shards(path, workers: int) -> list[DecoderShard]:
    ckpt = open_checkpoint(path)
    cfg = read_config(ckpt)
    shards = []
    for rank, (first, end) in enumerate(layer_ranges(cfg.num_layers, workers)):
        spec = ShardSpec(first, end, rank == 0, rank == workers - 1)
        shard = DecoderShard.load(ckpt, cfg, spec, torch.float32, max_context=256)
        pack_for_inference(shard)  # the layout workers run
        shards.append(shard)
    return shards


class Chain:
    """Shards run one after another on one step batch, each with its own cache."""

    def __init__(self, shards: list[DecoderShard], max_seqs: int) -> None:
        self.shards = shards
        self.caches = [s.new_cache(max_seqs, 256) for s in shards]

    @torch.inference_mode()
    def step(self, seqs: dict[str, tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        """seqs: id -> (keep, tokens). Returns each sequence's logits for its tokens."""
        x = torch.tensor([t for _, tokens in seqs.values() for t in tokens])
        counts = [len(tokens) for _, tokens in seqs.values()]
        for shard, cache in zip(self.shards, self.caches, strict=True):
            slots = [cache.slot(seq_id) for seq_id in seqs]
            for slot, (keep, _) in zip(slots, seqs.values(), strict=True):
                assert cache.keep_error(slot, keep) is None
                cache.truncate(slot, keep)
            x = shard(x, cache, slots, counts)
        logits = self.shards[-1].logits(x)
        return dict(zip(seqs, logits.split(counts), strict=True))


def reference_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_prefill_decode_and_verification_pattern(model, workers):
    """Two sequences in the same steps: a long prompt (chunked delta rule, over a chunk
    boundary) and a short one (recurrent), 8 decode steps, then the verification
    pattern — append 5, keep all but the last 3, append 4 — four times."""
    ref, path = model
    chain = Chain(load_shards(path, workers), max_seqs=2)
    g = torch.Generator().manual_seed(workers)
    seqs = {
        "long": torch.randint(0, VOCAB, (70,), generator=g).tolist(),
        "short": torch.randint(0, VOCAB, (6,), generator=g).tolist(),
    }

    def check(got: dict[str, torch.Tensor]) -> None:
        for seq_id, logits in got.items():
            want = reference_logits(ref, seqs[seq_id])[-logits.shape[0] :]
            assert (logits - want).abs().max() <= TOL, seq_id

    check(chain.step({k: (0, s) for k, s in seqs.items()}))
    for _ in range(8):
        new = {k: int(torch.randint(0, VOCAB, (1,), generator=g)) for k in seqs}
        steps = {k: (len(s), [new[k]]) for k, s in seqs.items()}
        for k in seqs:
            seqs[k].append(new[k])
        check(chain.step(steps))
    for _ in range(4):
        drafts = {k: torch.randint(0, VOCAB, (5,), generator=g).tolist() for k in seqs}
        got = chain.step({k: (len(s), drafts[k]) for k, s in seqs.items()})
        for k, logits in got.items():
            want = reference_logits(ref, seqs[k] + drafts[k])[-5:]
            assert (logits - want).abs().max() <= TOL
            seqs[k] += drafts[k][:2]  # the last 3 are rejected
        new = {k: torch.randint(0, VOCAB, (4,), generator=g).tolist() for k in seqs}
        steps = {k: (len(s), new[k]) for k, s in seqs.items()}
        for k in seqs:
            seqs[k] += new[k]
        check(chain.step(steps))


def test_rollback_replays_the_forward_pass_bit_for_bit(model):
    """Rolling back to every position of a step gives the state the step computed there:
    replaying all of a step's positions reproduces its final state exactly, and a
    rollback to n positions equals a fresh run over the n accepted tokens."""
    _, path = model
    (shard,) = load_shards(path, 1)
    cache = shard.new_cache(2, 256)
    states = cache.linear
    prompt, step = list(range(3, 40)), [7, 11, 13, 17, 19, 23]
    with torch.inference_mode():
        a = cache.slot("a")
        shard(torch.tensor(prompt), cache, [a], [len(prompt)])
        shard(torch.tensor(step), cache, [a], [len(step)])
        cur = states.current[a]
        after = states.state[:, a, cur].clone(), states.window[:, a, cur].clone()
        states.roll_back(a, len(step))  # replay all six positions from the pre-step state
        assert torch.equal(states.state[:, a, cur], after[0])
        assert torch.equal(states.window[:, a, cur], after[1])

        for n in range(len(step), 0, -1):
            cache.truncate(a, len(prompt) + n)
            b = cache.slot(f"fresh-{n}")
            shard(torch.tensor(prompt), cache, [b], [len(prompt)])
            shard(torch.tensor(step[:n]), cache, [b], [n])
            for buffers in (states.state, states.window):
                # Only rounding apart: the step's projections ran on 6 rows, not n.
                torch.testing.assert_close(
                    buffers[:, a, states.current[a]],
                    buffers[:, b, states.current[b]],
                    atol=1e-5,
                    rtol=1e-5,
                )
            cache.release(f"fresh-{n}")


def test_keep_outside_the_rollback_window_is_refused_by_every_shard(model):
    """A recurrent state can go back only within the last step (and not at all after a
    long prefill chunk): every shard refuses the same keeps, even one without a
    linear-attention layer, so pipeline stages stay in lockstep."""
    _, path = model
    chain = Chain(load_shards(path, 3), max_seqs=1)
    chain.step({"s": (0, list(range(30)))})  # a prefill longer than a rollback
    chain.step({"s": (30, [1, 2, 3])})
    assert chain.shards[-1].stack.num_linear == 0  # layer 5: full attention
    for cache in chain.caches:
        slot = cache.slot("s")
        for keep in (30, 31, 32, 33, 0):
            assert cache.keep_error(slot, keep) is None
        assert "beyond its 33 cached positions" in cache.keep_error(slot, 34)
        for keep in (29, 12):
            error = cache.keep_error(slot, keep)
            assert (
                "rolls back only within the last step's appended positions (positions 30..33)"
                in error
            )
    with pytest.raises(ValueError, match="cannot be served"):
        chain.caches[0].truncate(chain.caches[0].slot("s"), 29)
    # After a prefill chunk longer than ROLLBACK_POSITIONS, only its start can be kept.
    long = list(range(ROLLBACK_POSITIONS + 1))
    chain.step({"s": (33, long)})
    cache = chain.caches[0]
    slot = cache.slot("s")
    assert cache.keep_error(slot, 33) is None
    assert "at most 17 positions" in cache.keep_error(slot, 34)


def test_chunked_and_recurrent_forms_agree():
    """Prefill's chunked delta rule and decoding's recurrent one: the same outputs and the
    same final state, from a nonzero state, over a length that is not a chunk multiple."""
    g = torch.Generator().manual_seed(0)
    t, heads, dk, dv = 150, 4, 16, 8
    q, k = (
        torch.nn.functional.normalize(torch.randn(t, heads, dk, generator=g), dim=-1)
        for _ in range(2)
    )
    v = torch.randn(t, heads, dv, generator=g)
    decay = -torch.rand(t, heads, generator=g)
    beta = torch.rand(t, heads, generator=g)
    start = 0.1 * torch.randn(heads, dk, dv, generator=g)
    s1, s2 = start.clone(), start.clone()
    out1 = delta_rule.recurrent(s1, q * dk**-0.5, k, v, decay, beta)
    out2 = delta_rule.chunked(s2, q * dk**-0.5, k, v, decay, beta)
    assert out1.abs().max() > 0.1  # not a trivially small output
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=0)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=0)


def test_experts_are_read_by_the_worker_of_their_layer(model):
    """A middle shard reads its own layers' tensors (every expert of them) and nothing
    else."""
    _, path = model
    ckpt = open_checkpoint(path)
    cfg = read_config(ckpt)
    asked: list[str] = []
    read = ckpt.read
    ckpt.read = lambda names: asked.extend(names) or read(names)
    DecoderShard.load(ckpt, cfg, ShardSpec(1, 3, False, False), torch.float32, 64)
    assert {n.split(".")[2] for n in asked} == {"1", "2"}
    if cfg.moe is not None:
        experts = {n.split(".")[5] for n in asked if ".mlp.experts." in n}
        assert experts == {str(e) for e in range(cfg.moe.num_experts)}


def test_multimodal_checkpoint_serves_its_text_decoder(tmp_path):
    """The published layout: the decoder under model.language_model.*, a vision tower
    under model.visual.* (skipped), the config nested in text_config."""
    ref = write_tiny_multimodal_qwen3_5(tmp_path, vocab=VOCAB)
    ckpt = open_checkpoint(tmp_path)
    cfg = read_config(ckpt)
    assert cfg.architecture == "qwen3_5" and cfg.vision_tower_skipped
    assert not any(
        n.startswith(("model.visual.", "model.language_model.")) for n in ckpt.tensor_names()
    )
    chain = Chain(load_shards(tmp_path, 2), max_seqs=1)
    ids = torch.randint(0, VOCAB - 4, (20,), generator=torch.Generator().manual_seed(9)).tolist()
    got = chain.step({"s": (0, ids)})["s"]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
    assert (got - want).abs().max() <= TOL


TEXT_CONFIG = {  # the smallest valid Qwen3.5 text config
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"layer_types": ["linear_attention", "sliding_attention"]},
            "'sliding_attention' in layer_types",
        ),
        ({"layer_types": ["full_attention"]}, "one type for each of the 2 layers"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not implemented"),
        ({"linear_num_value_heads": 3}, "linear_num_value_heads=3 is not a multiple"),
        ({"linear_conv_kernel_dim": 0}, "linear_conv_kernel_dim must be a positive integer"),
    ],
)
def test_bad_hybrid_config_names_the_key(change, message):
    cfg = {"model_type": "qwen3_5_text", **TEXT_CONFIG}
    with pytest.raises(ModelLoadError, match="config.json: .*" + re.escape(message)):
        ModelConfig.from_hf({**cfg, **change}, source="config.json")


def test_a_quantized_multimodal_wrapper_is_refused_by_its_own_key():
    """Qwen3.5 FP8 checkpoints carry quantization_config beside text_config, not in it."""
    wrapper = {"model_type": "qwen3_5", "text_config": TEXT_CONFIG}
    assert ModelConfig.from_hf(wrapper).architecture == "qwen3_5"
    fp8 = {**wrapper, "quantization_config": {"quant_method": "fp8"}}
    with pytest.raises(ModelLoadError, match="quantization_config='fp8' is not implemented"):
        ModelConfig.from_hf(fp8)
