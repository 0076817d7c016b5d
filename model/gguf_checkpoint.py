"""A llama-architecture GGUF file, presented in Hugging Face conventions.

The rest of the engine knows one checkpoint layout: a config.json dictionary, tensors under HF
names and shapes, and a `tokenizers` tokenizer. This module translates a GGUF file into exactly
that, so nothing downstream needs to know the weights came from llama.cpp.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGMLQuantizationType, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from mtpd.model.errors import ModelLoadError
from mtpd.model.gguf_index import GGUFIndex, TensorInfo

if TYPE_CHECKING:  # tensors are decoded (in torch) only where read: a daemon reads none
    import torch

    from mtpd.model.quant import Int4Weight

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# The text splits llama.cpp applies, one after another, for each `tokenizer.ggml.pre` (see
# llama-vocab.cpp); matching them is what makes our ids equal the ones the model was trained on.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe")
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "gpt2": (_GPT2_SPLIT,),
    # Every digit is its own piece first. transformers' GGUF tokenizer skips this step and so cuts
    # a run of whitespace before a digit differently ("x  1", indented numbers in code).
    **dict.fromkeys(("smollm", "starcoder", "refact"), (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys(_LLAMA3_PRES, (_LLAMA3_SPLIT,)),
}


_PERMUTED_HEADS = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}


class GGUFCheckpoint:
    """Metadata, tensors and tokenizer of one GGUF file, under Hugging Face names and layouts."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such GGUF file")
        try:
            self._index = GGUFIndex.open(self.path)
        except Exception as e:  # the reader fails with whatever numpy hits in a malformed file
            raise ModelLoadError(
                f"{self.path}: not a readable GGUF file (truncated or corrupt?): {e}"
            ) from e

        arch = self._meta("general.architecture")
        if arch != "llama":
            raise ModelLoadError(
                f"{self.path}: GGUF architecture {arch!r} is not supported (only 'llama')"
            )
        self._tensors = {self._hf_name(t.name): t for t in self._index.tensors}

        heads = self._need("llama.attention.head_count")
        hidden = self._need("llama.embedding_length")
        self.bos_token_id: int | None = self._meta("tokenizer.ggml.bos_token_id")
        self.eos_token_id: int | None = self._meta("tokenizer.ggml.eos_token_id")
        self.chat_template = self._chat_templates()
        self.hf_config: dict[str, Any] = {
            "model_type": "llama",
            "vocab_size": self._meta("llama.vocab_size")
            or len(self._need("tokenizer.ggml.tokens")),
            "hidden_size": hidden,
            "intermediate_size": self._need("llama.feed_forward_length"),
            "num_hidden_layers": self._need("llama.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._meta("llama.attention.head_count_kv", heads),
            "head_dim": self._meta("llama.rope.dimension_count") or hidden // heads,
            "rms_norm_eps": float(self._need("llama.attention.layer_norm_rms_epsilon")),
            "rope_parameters": self._rope_parameters(),
            "max_position_embeddings": self._need("llama.context_length"),
            # llama.cpp writes output.weight only when it differs from the embedding.
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_bias": False,
            "mlp_bias": False,
        }

    def tensor_names(self) -> set[str]:
        return set(self._tensors)

    def _tensor(self, name: str) -> TensorInfo:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise ModelLoadError(f"{self.path}: no tensor {name!r} in this checkpoint")
        return tensor

    def stored_bytes(self, name: str) -> bytes:
        return self._index.data(self._tensor(name)).tobytes()

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Dequantize just these tensors to float32, in HF layout: a pipeline stage reads its own."""
        from mtpd.model.gguf_tensors import dequantized

        out = {}
        for name in names:
            tensor = self._tensor(name)
            try:
                weight = dequantized(self._index.data(tensor), tensor.kind)
            except (ValueError, NotImplementedError, RuntimeError) as e:
                raise ModelLoadError(
                    f"{self.path}: tensor {tensor.name!r} ({tensor.kind.name}) "
                    f"cannot be dequantized: {e}"
                ) from e
            # numpy's check, as torch's isfinite is an order of magnitude slower on CPU.
            if not np.isfinite(weight.numpy()).all():
                raise ModelLoadError(
                    f"{self.path}: tensor {tensor.name!r} holds NaN or infinite values (corrupt file?)"
                )
            if name.endswith("q_proj.weight"):
                weight = self._unpermute(weight, self.hf_config["num_attention_heads"], tensor.name)
            elif name.endswith("k_proj.weight"):
                weight = self._unpermute(weight, self.hf_config["num_key_value_heads"], tensor.name)
            out[name] = weight.contiguous()
        return out

    def int4_blocks(self, names: tuple[str, ...]) -> Int4Weight | None:
        """The exact int4 groups of these tensors, fused in order, when every one is stored
        as Q4_0 or Q4_1 (blocks of 32 with a scale, and for Q4_1 a minimum): repacked, not
        dequantized."""
        from mtpd.model.gguf_tensors import Q4_KINDS, q4_groups
        from mtpd.model.quant import Int4Weight

        tensors = [self._tensors.get(n) for n in names]
        if not names or any(t is None or t.kind not in Q4_KINDS for t in tensors):
            return None
        parts = []
        for name, tensor in zip(names, tensors, strict=True):
            part = q4_groups(self._index.data(tensor), tensor.kind)
            heads = _PERMUTED_HEADS.get(name.rsplit(".", 2)[-2])
            if heads is not None:  # rows regrouped for llama.cpp's RoPE, as in read()
                n = self.hf_config[heads]
                part = Int4Weight(
                    *(self._unpermute(x, n, tensor.name) for x in (part.q, part.scale, part.zero))
                )
            parts.append(part)
        return Int4Weight.cat(parts)

    def stored_at_8_bits(self, names: tuple[str, ...]) -> bool:
        return any(
            (t := self._tensors.get(n)) is not None and t.kind == GGMLQuantizationType.Q8_0
            for n in names
        )

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the metadata describes, splitting text the way llama.cpp does."""
        model = self._meta("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelLoadError(
                f"{self.path}: GGUF tokenizer model {model!r} is not supported "
                "(only byte-level BPE, 'gpt2'; sentencepiece 'llama' vocabularies are not)"
            )
        pre = self._meta("tokenizer.ggml.pre")
        if pre not in _PRE_TOKENIZER_SPLITS:
            raise ModelLoadError(
                f"{self.path}: GGUF pre-tokenizer {pre!r} is not supported "
                f"(supported: {', '.join(sorted(_PRE_TOKENIZER_SPLITS))})"
            )
        tokens: list[str] = self._need("tokenizer.ggml.tokens")
        merges = [tuple(merge.split(" ", 1)) for merge in self._need("tokenizer.ggml.merges")]
        llama3 = pre in _LLAMA3_PRES

        vocab = {token: index for index, token in enumerate(tokens)}
        tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=llama3))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), "isolated") for split in _PRE_TOKENIZER_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tokenizer.decoder = decoders.ByteLevel()

        # Both kinds are matched whole in the raw text before any splitting, as llama.cpp does.
        # Control tokens are special (dropped when decoding with skip_special_tokens); user-defined
        # ones such as <think> are text that llama.cpp prints. The converter stores them verbatim,
        # not in the byte alphabet, so they are added under their vocabulary id as spelled.
        kinds = self._meta("tokenizer.ggml.token_type", [])
        tokenizer.add_special_tokens(
            [
                AddedToken(token, normalized=False, special=True)
                for token, kind in zip(tokens, kinds, strict=False)
                if kind == TokenType.CONTROL
            ]
        )
        tokenizer.add_tokens(
            [
                AddedToken(token, normalized=False, special=False)
                for token, kind in zip(tokens, kinds, strict=False)
                if kind == TokenType.USER_DEFINED
            ]
        )

        # llama.cpp prepends BOS to llama3 vocabularies unless the file says otherwise.
        bos = self._edge_token("bos", self.bos_token_id, llama3, tokens)
        eos = self._edge_token("eos", self.eos_token_id, False, tokens)
        if bos or eos:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=[*bos, "$A", *eos],
                pair=[*bos, "$A", *eos, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)],
                special_tokens=[(token, vocab[token]) for token in {*bos, *eos}],
            )
        return tokenizer

    def _edge_token(
        self, kind: str, token_id: int | None, default: bool, tokens: list[str]
    ) -> list[str]:
        """[the BOS/EOS token] when the file asks for it on every encoded text, else []."""
        if not self._meta(f"tokenizer.ggml.add_{kind}_token", default):
            return []
        if token_id is None or not 0 <= token_id < len(tokens):
            raise ModelLoadError(
                f"{self.path}: the tokenizer adds {kind.upper()} but its token id is {token_id!r}"
            )
        return [tokens[token_id]]

    def _hf_name(self, gguf_name: str) -> str:
        if gguf_name in _GLOBAL_TENSORS:
            return _GLOBAL_TENSORS[gguf_name]
        match = _LAYER_TENSOR.fullmatch(gguf_name)
        if match and match[2] in _LAYER_TENSORS:
            return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.weight"
        # Biases, MoE experts and llama3 RoPE frequency tables would change the model's maths;
        # ignoring them would run a different model without a word.
        raise ModelLoadError(
            f"{self.path}: unsupported tensor {gguf_name!r} (only plain llama decoders: no biases, "
            "experts or rope_freqs)"
        )

    def _unpermute(self, weight: torch.Tensor, heads: int, gguf_name: str) -> torch.Tensor:
        # convert_hf_to_gguf regroups each head's rows from [half0; half1] to interleaved pairs
        # (for llama.cpp's RoPE); swapping the two axes back restores the HF row order.
        rows = weight.shape[0]
        if rows % (2 * heads):
            raise ModelLoadError(
                f"{self.path}: tensor {gguf_name!r} has {rows} rows, "
                f"not a multiple of 2 x {heads} heads"
            )
        return (
            weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2)
            .reshape(weight.shape)
        )

    def _rope_parameters(self) -> dict[str, Any]:
        rope: dict[str, Any] = {
            "rope_theta": float(self._meta("llama.rope.freq_base", 10000.0)),
            "rope_type": "default",
        }
        kind = self._meta("llama.rope.scaling.type", "none")
        factor = self._meta("llama.rope.scaling.factor")
        # Files from before rope.scaling.* stated a linear factor under its own key.
        if kind == "none" and (legacy := self._meta("llama.rope.scale_linear")) is not None:
            kind, factor = "linear", legacy
        if kind == "none":
            return rope
        if kind not in ("linear", "yarn") or factor is None:
            raise ModelLoadError(
                f"{self.path}: RoPE scaling {kind!r} with factor {factor!r} is not supported"
            )
        rope |= {"rope_type": kind, "factor": float(factor)}
        if (original := self._meta("llama.rope.scaling.original_context_length")) is not None:
            rope["original_max_position_embeddings"] = original
        return rope

    def _need(self, key: str) -> Any:
        if key not in self._index.metadata:
            raise ModelLoadError(f"{self.path}: missing GGUF metadata key {key!r}")
        return self._meta(key)

    def _chat_templates(self) -> str | dict[str, str] | None:
        """tokenizer.chat_template, and the named ones llama.cpp's converter writes
        (tokenizer.chat_templates lists the names of tokenizer.chat_template.NAME)."""
        default = self._meta("tokenizer.chat_template")
        names = self._meta("tokenizer.chat_templates") or []
        named = {
            name: template
            for name in names
            if isinstance(name, str)
            and isinstance(template := self._meta(f"tokenizer.chat_template.{name}"), str)
        }
        if not named:
            return default if isinstance(default, str) else None
        return {**({"default": default} if isinstance(default, str) else {}), **named}

    def _meta(self, key: str, default: Any = None) -> Any:
        return self._index.metadata.get(key, default)
