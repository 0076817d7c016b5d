"""The decoder's configuration, parsed from a Hugging Face config.json dictionary.

GGUF files are translated into the same dictionary form (see `gguf_checkpoint`), so
every checkpoint format is validated by one parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtpd.model.errors import ModelLoadError

# The Qwen3.5/3.6 family: Gated DeltaNet and gated attention layers, dense or MoE MLPs.
HYBRID_ARCHITECTURES = ("qwen3_5", "qwen3_5_moe")
# model_type -> what distinguishes the family inside one shared decoder.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", *HYBRID_ARCHITECTURES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LINEAR_ATTENTION, FULL_ATTENTION = "linear_attention", "full_attention"


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Gated DeltaNet dimensions (Qwen3.5 `linear_*` keys)."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal convolution: q, k and v side by side."""
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    shared_expert_intermediate_size: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2 always does)
    o_proj_bias: bool  # Llama and Qwen3 tie it to attention_bias; Qwen2 never has one
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over each head of q and k before RoPE (Qwen3)
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    mtp_num_layers: int = 0
    # Hybrid (Qwen3.5) models only: each layer's kind, rotary on part of each head,
    # the linear-attention dimensions and, for MoE models, the experts.
    layer_types: tuple[str, ...] = ()
    partial_rotary_factor: float = 1.0
    linear_attention: LinearAttentionConfig | None = None
    moe: MoEConfig | None = None
    vision_tower_skipped: bool = False  # a multimodal checkpoint served as text only

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")

    @property
    def is_hybrid(self) -> bool:
        return self.architecture in HYBRID_ARCHITECTURES

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Validate and translate a config.json dictionary; errors name `source` and the key."""
        arch = cfg.get("model_type")
        vision_tower = False
        if arch in _QWEN3_5_MODEL_TYPES:  # the wrapper's keys count too (quantization_config)
            _refuse_unimplemented(cfg, source)
            arch, cfg, vision_tower = _qwen3_5_text_config(arch, cfg, source)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: unsupported architecture model_type={arch!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        _refuse_unimplemented(cfg, source)

        def need(key: str) -> int:
            return _positive_int(cfg, key, source)

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )

        # transformers 5 nests rope_theta and the scaling under rope_parameters; older
        # files carry rope_theta at top level and an optional rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"{source}: unsupported rope type {rope_type!r} "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        rope["rope_type"] = rope_type
        rope.pop("type", None)
        hybrid = _hybrid_fields(arch, cfg, rope, source) if arch in HYBRID_ARCHITECTURES else {}

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            # An MoE model has no dense MLP: its experts' sizes are in `moe`.
            intermediate_size=0 if hybrid.get("moe") else need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_proj_bias=arch != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch == "qwen3" or arch in HYBRID_ARCHITECTURES,
            rope_scaling=rope,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            mtp_num_layers=cfg.get("mtp_num_hidden_layers", cfg.get("num_nextn_predict_layers"))
            or 0,
            vision_tower_skipped=vision_tower,
            **hybrid,
        )


# Keys that change the model's arithmetic in ways mtpd does not implement, with the
# values that leave it unchanged. Running such a checkpoint with the key ignored would
# answer, wrongly; it is refused instead, naming the key.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "quantization_config": (None,),  # FP8, AWQ, GPTQ, bitsandbytes...: scales to apply
    "compression_config": (None,),  # compressed-tensors' older name for it
    "layer_scale": (None, False, 1, 1.0),
    "layer_scales": (None, False),
    "residual_multiplier": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
    "logits_scaling": (None, 1, 1.0),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "use_sliding_window": (None, False),
    "hidden_act": (None, "silu"),
}


def _refuse_unimplemented(cfg: dict[str, Any], source: str) -> None:
    for key, neutral in _NEUTRAL.items():
        value = cfg.get(key)
        if not any(value is n or (type(value) is type(n) and value == n) for n in neutral):
            what = value.get("quant_method", "?") if isinstance(value, dict) else value
            raise ModelLoadError(
                f"{source}: {key}={what!r} is not implemented by mtpd; refusing to run the "
                f"model without it"
                + (
                    " (serve the unquantized checkpoint; mtpd quantizes it with --quant)"
                    if key in ("quantization_config", "compression_config")
                    else ""
                )
            )
    for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
        if cfg.get(key) not in (None, 0, 1):
            raise ModelLoadError(
                f"{source}: {key}={cfg[key]!r} is not implemented by mtpd: it runs at most "
                "one MTP layer"
            )


def _positive_int(cfg: dict[str, Any], key: str, source: str) -> int:
    if key not in cfg:
        raise ModelLoadError(f"{source}: missing required key {key!r}")
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


# Qwen3.5 checkpoints are multimodal wrappers (model_type qwen3_5 with the decoder in
# text_config); a text-only save carries the text config itself (qwen3_5_text).
_QWEN3_5_MODEL_TYPES = {
    "qwen3_5": "qwen3_5",
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5_moe",
}


def _qwen3_5_text_config(
    model_type: str, cfg: dict[str, Any], source: str
) -> tuple[str, dict[str, Any], bool]:
    """The architecture and the decoder's own keys of a Qwen3.5 config, and whether it
    has a vision tower (which mtpd skips)."""
    arch = _QWEN3_5_MODEL_TYPES[model_type]
    if "text_config" not in cfg:
        return arch, cfg, False
    text = cfg["text_config"]
    if not isinstance(text, dict):
        raise ModelLoadError(f"{source}: text_config must be an object")
    merged = dict(text)
    # The wrapper's own keys win where transformers reads them from the wrapper.
    merged["tie_word_embeddings"] = cfg.get(
        "tie_word_embeddings", text.get("tie_word_embeddings", False)
    )
    for key in ("bos_token_id", "eos_token_id"):
        if merged.get(key) is None and cfg.get(key) is not None:
            merged[key] = cfg[key]
    return arch, merged, cfg.get("vision_config") is not None


def _hybrid_fields(
    arch: str, cfg: dict[str, Any], rope: dict[str, Any], source: str
) -> dict[str, Any]:
    """The Qwen3.5 keys the reference implementation reads, validated. `rope` is the
    parsed rope dictionary; the keys that only concern the rotary are taken out of it."""

    def need(key: str) -> int:
        return _positive_int(cfg, key, source)

    layers = need("num_hidden_layers")
    types = cfg.get("layer_types")
    if types is None:
        # The reference's default: every fourth layer is full attention.
        interval = _positive_int(
            {"full_attention_interval": 4, **cfg}, "full_attention_interval", source
        )
        types = [
            FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(layers)
        ]
    if not isinstance(types, list) or len(types) != layers:
        raise ModelLoadError(
            f"{source}: layer_types must list one type for each of the {layers} layers"
        )
    for kind in types:
        if kind not in (LINEAR_ATTENTION, FULL_ATTENTION):
            raise ModelLoadError(
                f"{source}: unsupported layer type {kind!r} in layer_types "
                f"(supported: {LINEAR_ATTENTION!r}, {FULL_ATTENTION!r})"
            )
    linear = LinearAttentionConfig(
        num_key_heads=need("linear_num_key_heads"),
        num_value_heads=need("linear_num_value_heads"),
        key_head_dim=need("linear_key_head_dim"),
        value_head_dim=need("linear_value_head_dim"),
        conv_kernel=need("linear_conv_kernel_dim"),
    )
    if linear.num_value_heads % linear.num_key_heads:
        raise ModelLoadError(
            f"{source}: linear_num_value_heads={linear.num_value_heads} is not a multiple of "
            f"linear_num_key_heads={linear.num_key_heads}"
        )
    # Text positions are the same on mrope's three axes, where it reduces to plain rope.
    for key in ("mrope_section", "mrope_interleaved"):
        rope.pop(key, None)
    factor = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
    if not isinstance(factor, int | float) or not 0 < factor <= 1:
        raise ModelLoadError(f"{source}: partial_rotary_factor must be in (0, 1], got {factor!r}")
    moe = None
    if arch == "qwen3_5_moe":
        moe = MoEConfig(
            num_experts=need("num_experts"),
            experts_per_token=need("num_experts_per_tok"),
            expert_intermediate_size=need("moe_intermediate_size"),
            shared_expert_intermediate_size=need("shared_expert_intermediate_size"),
        )
        if moe.experts_per_token > moe.num_experts:
            raise ModelLoadError(
                f"{source}: num_experts_per_tok={moe.experts_per_token} is more than "
                f"num_experts={moe.num_experts}"
            )
    return {
        "layer_types": tuple(types),
        "partial_rotary_factor": float(factor),
        "linear_attention": linear,
        "moe": moe,
    }
