"""GGUFCheckpoint presents a GGUF file exactly as transformers' own GGUF loading does.

The oracle is transformers on the same file: its config, its dequantized (and un-permuted)
state dict, its tokenizer. Tiny files written with gguf.GGUFWriter cover the error paths and the
metadata the real file lacks.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from mtpd.model.config import ModelConfig
from mtpd.model.default_model import default_model_path
from mtpd.model.errors import ModelLoadError
from mtpd.model.gguf_checkpoint import GGUFCheckpoint

TEXTS = [
    "Hello world",
    " leading space",
    "   three leading spaces and trailing ",
    "tabs\tand\nnewlines\n\nblank line",
    "Ünïcödé straße, naïve café",
    "日本語のテキストと中文",
    "Привет, мир!",
    "emoji 🚀🔥👍🏽 family 👨‍👩‍👧",
    "def square(x):\n    return x ** 2  # comment\n",
    'print(f"{a!r:>10}")  // && || -> => !=',
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b<repo_name>c",
    "numbers 3.14159 and 2024, -42, 1e10, 0x1F",
    "it's we're they'll I'd DON'T",
    "",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def checkpoint(gguf_path: Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(gguf_path)


@pytest.fixture(scope="module")
def hf_config(gguf_path: Path):
    return AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_state_dict(gguf_path: Path, hf_config) -> dict[str, torch.Tensor]:
    # from_pretrained(gguf_file=...) insists on accelerate, which is no test dependency; for a
    # llama file it fills the model from this very function, so this is the same oracle.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    return load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)[
        "tensors"
    ]


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: Path):
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def tokenizer(checkpoint: GGUFCheckpoint):
    return checkpoint.tokenizer()


def test_tensors_equal_transformers_dequantized_parameters(checkpoint, hf_state_dict):
    assert checkpoint.tensor_names() == set(hf_state_dict)
    assert "lm_head.weight" not in checkpoint.tensor_names()  # tied: the file has no output.weight
    ours = checkpoint.read(sorted(hf_state_dict))
    assert set(ours) == set(hf_state_dict)
    for name, expected in hf_state_dict.items():
        got = ours[name]
        assert got.dtype == torch.float32 and got.is_contiguous(), name
        torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6, msg=name)


def test_read_dequantizes_only_the_requested_tensors(checkpoint):
    names = ["model.layers.29.self_attn.k_proj.weight", "model.norm.weight"]
    out = checkpoint.read(names)
    assert set(out) == set(names)
    assert out[names[0]].shape == (3 * 64, 576)  # HF [out_features, in_features]


def test_config_matches_transformers(checkpoint, hf_config):
    cfg = checkpoint.hf_config
    for key in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "attention_bias",
        "mlp_bias",
    ):
        assert cfg[key] == getattr(hf_config, key), key
    assert cfg["rope_parameters"] == dict(hf_config.rope_parameters)
    # The engine's own parser takes it as it takes a config.json.
    assert ModelConfig.from_hf(cfg, str(checkpoint.path)).num_kv_heads == 3


def test_special_tokens_and_chat_template(checkpoint, tokenizer, hf_tokenizer):
    assert (checkpoint.bos_token_id, checkpoint.eos_token_id) == (1, 2)
    assert tokenizer.id_to_token(1) == hf_tokenizer.bos_token == "<|im_start|>"
    assert checkpoint.chat_template == hf_tokenizer.chat_template
    assert "<|im_start|>" in checkpoint.chat_template
    assert tokenizer.get_vocab_size() == checkpoint.hf_config["vocab_size"]
    added = tokenizer.get_added_tokens_decoder()
    assert {i for i, t in added.items() if t.special} == {
        i for i, t in hf_tokenizer.added_tokens_decoder.items() if t.special
    }


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert ids == hf_tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(
        ids, skip_special_tokens=True
    )


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("x  1", ["x", "ĠĠ", "1"]),
        ("[\n    1,\n    2]", ["[", "ĊĠĠĠĠ", "1", ",", "ĊĠĠĠĠ", "2", "]"]),
        ("year 2024", ["year", "Ġ", "2", "0", "2", "4"]),
    ],
)
def test_smollm_isolates_digits_before_splitting_like_llama_cpp(tokenizer, text, pieces):
    # llama.cpp's "smollm" pre-tokenizer cuts every digit out first, then applies the GPT-2 split,
    # so whitespace before a digit stays one run. transformers' GGUF tokenizer skips the digit
    # step and yields ["x", "Ġ", "Ġ", "1"] here: the one place we differ from it, on purpose.
    assert tokenizer.encode(text).tokens == pieces


# --- bad files ---------------------------------------------------------------------------------


def write_gguf(path: Path, arch: str = "llama", tensors=None, kinds=None, **metadata) -> Path:
    """A tiny GGUF file: the given architecture, minimal llama metadata, float32 tensors
    (or stored as `kinds` names them, quantized by gguf)."""
    writer = gguf.GGUFWriter(str(path), arch)
    if arch == "llama":
        writer.add_vocab_size(4)
        writer.add_block_count(1)
        writer.add_context_length(64)
        writer.add_embedding_length(8)
        writer.add_feed_forward_length(16)
        writer.add_head_count(2)
        writer.add_head_count_kv(1)
        writer.add_layer_norm_rms_eps(1e-5)
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    for name, array in (tensors or {"token_embd.weight": np.ones((4, 8), np.float32)}).items():
        kind = (kinds or {}).get(name)
        if kind is None:
            writer.add_tensor(name, array)
        else:
            stored = gguf.quants.quantize(array, kind)
            writer.add_tensor(name, stored, raw_shape=stored.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_load_error(path: Path, *fragments: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        GGUFCheckpoint(path)
    for fragment in (str(path), *fragments):
        assert fragment in str(caught.value)


def test_missing_file(tmp_path):
    assert_load_error(tmp_path / "absent.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama"}')
    assert_load_error(path)


@pytest.mark.parametrize("keep", ["header", "all but the last byte"])
def test_truncated_copy(tmp_path, gguf_path, keep):
    data = gguf_path.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:4096] if keep == "header" else data[:-1])
    assert_load_error(path)


def test_architecture_other_than_llama(tmp_path):
    assert_load_error(write_gguf(tmp_path / "qwen.gguf", arch="qwen2"), "'qwen2'")


def test_tensor_the_loader_cannot_represent(tmp_path):
    bias = {"blk.0.attn_q.bias": np.zeros(8, np.float32)}
    assert_load_error(write_gguf(tmp_path / "bias.gguf", tensors=bias), "blk.0.attn_q.bias")


def test_unknown_tensor_name(tmp_path):
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "tiny.gguf"))
    with pytest.raises(ModelLoadError, match=re.escape("model.layers.7.mlp.up_proj.weight")):
        ckpt.read(["model.layers.7.mlp.up_proj.weight"])


def test_corrupt_tensor_data_names_tensor_and_file(tmp_path):
    embedding = np.ones((4, 8), np.float32)
    embedding[2, 3] = np.nan
    path = write_gguf(tmp_path / "nan.gguf", tensors={"token_embd.weight": embedding})
    with pytest.raises(ModelLoadError) as caught:
        GGUFCheckpoint(path).read(["model.embed_tokens.weight"])
    assert str(path) in str(caught.value) and "token_embd.weight" in str(caught.value)


def test_quantized_tensors_are_dequantized_as_gguf_does_bit_for_bit(tmp_path):
    """The real file has Q4_1 and Q8_0 only; mtpd dequantizes in torch, gguf in numpy."""
    Q = gguf.GGMLQuantizationType
    stored = {"ffn_down": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_gate": Q.Q8_0}
    rng = np.random.default_rng(1)
    tensors = {f"blk.0.{n}.weight": rng.standard_normal((6, 96), np.float32) * 3 for n in stored}
    kinds = {f"blk.0.{n}.weight": kind for n, kind in stored.items()}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "q.gguf", tensors=tensors, kinds=kinds))
    ours = ckpt.read([f"model.layers.0.mlp.{p}_proj.weight" for p in ("down", "up", "gate")])
    for part, kind in stored.items():
        name = f"blk.0.{part}.weight"
        want = gguf.quants.dequantize(gguf.quants.quantize(tensors[name], kind), kind)
        got = ours[f"model.layers.0.mlp.{part.removeprefix('ffn_')}_proj.weight"].numpy()
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), kind.name


# --- metadata the real file lacks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (
            {"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": 2.0},
            {"rope_type": "linear", "factor": 2.0},
        ),
        (
            {
                "rope_scaling_type": gguf.RopeScalingType.YARN,
                "rope_scaling_factor": 4.0,
                "rope_scaling_orig_ctx_len": 16,
            },
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
    ],
)
def test_rope_scaling(tmp_path, metadata, expected):
    cfg = GGUFCheckpoint(
        write_gguf(tmp_path / "rope.gguf", rope_freq_base=5e5, **metadata)
    ).hf_config
    assert cfg["rope_parameters"] == {"rope_theta": 5e5, **expected}
    assert cfg["head_dim"] == 4  # no rope.dimension_count: hidden / heads
    assert ModelConfig.from_hf(cfg).rope_type == expected["rope_type"]


def test_llama3_vocabulary_adds_bos_and_takes_whole_tokens(tmp_path):
    tokens = ["<|begin_of_text|>", "a", "b", "c", "ab", "abc"]
    path = write_gguf(
        tmp_path / "llama3.gguf",
        tokenizer_model="gpt2",
        tokenizer_pre="llama-bpe",
        token_list=tokens,
        token_types=[gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * 5,
        token_merges=["a b"],
        bos_token_id=0,
    )
    tokenizer = GGUFCheckpoint(path).tokenizer()
    # llama.cpp's llama3 defaults: BOS prepended, and a whole-word vocabulary hit skips the merges.
    assert tokenizer.encode("abc").ids == [0, 5]
    assert tokenizer.encode("abc", add_special_tokens=False).ids == [5]


def test_sentencepiece_vocabulary_is_refused(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", tokenizer_model="llama", token_list=["<unk>", "▁a"])
    with pytest.raises(ModelLoadError, match="'llama'"):
        GGUFCheckpoint(path).tokenizer()


def test_named_chat_templates_as_llama_cpp_writes_them(tmp_path):
    named = [
        {"name": "default", "template": "{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools: {{ tools | length }}"},
    ]
    path = write_gguf(tmp_path / "named.gguf", chat_template=named)
    assert GGUFCheckpoint(path).chat_template == {t["name"]: t["template"] for t in named}
