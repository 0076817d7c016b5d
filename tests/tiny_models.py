"""Tiny random checkpoints written to disk by `transformers` (the test oracle)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers.models import qwen3_5, qwen3_5_moe

from mtpd.model.config import ModelConfig
from mtpd.model.mtp import TAP_LAYERS, mtp_tensor_shapes

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    # Text-only Qwen3.5 (model_type qwen3_5_text / qwen3_5_moe_text).
    "qwen3_5": (qwen3_5.Qwen3_5TextConfig, qwen3_5.Qwen3_5ForCausalLM),
    "qwen3_5_moe": (qwen3_5_moe.Qwen3_5MoeTextConfig, qwen3_5_moe.Qwen3_5MoeForCausalLM),
}
# Gated DeltaNet with two key heads shared by four value heads, as the real models group them.
LINEAR_ATTENTION = {
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
}
# The default init (std 0.02) leaves these models' logits nearly blind to the recurrent
# state (a token five back moves them by 0.02); at 0.1 an error in the state shows.
HYBRID_INIT = {**LINEAR_ATTENTION, "initializer_range": 0.1}
FAMILY_CONFIG = {
    "qwen3_5": {**HYBRID_INIT, "intermediate_size": 112},
    "qwen3_5_moe": {
        **HYBRID_INIT,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
    },
}


def write_tiny_model(
    out: Path,
    family: str = "llama",
    *,
    tied: bool = False,
    gqa: int = 2,
    layers: int = 4,
    vocab: int = 96,
    seed: int = 0,
    max_shard_size: str = "5GB",
    **overrides: object,
) -> transformers.PreTrainedModel:
    """Save a random model of `family` to `out` and return it (float32, eval mode)."""
    config_cls, model_cls = FAMILIES[family]
    heads, head_dim = 4, overrides.pop("head_dim", 16)
    config = config_cls(
        vocab_size=vocab,
        hidden_size=64,
        **{**FAMILY_CONFIG.get(family, {"intermediate_size": 112}), **overrides},
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // gqa,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    _perturb_norms_and_biases(model)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    return model


def _perturb_norms_and_biases(model: transformers.PreTrainedModel) -> None:
    # Random init leaves norms at 1 (or 0, zero-centred) and biases at 0: perturb them so
    # they are tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)


def write_tiny_multimodal_qwen3_5(out: Path, vocab: int = 96, seed: int = 0):
    """A Qwen3.5 checkpoint as published: the multimodal wrapper (model_type qwen3_5), the
    decoder under model.language_model.*, and a (tiny) vision tower under model.visual.*."""
    text = {
        "vocab_size": vocab,
        "hidden_size": 64,
        **FAMILY_CONFIG["qwen3_5"],
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "eos_token_id": 2,
    }
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 16,
        "patch_size": 4,
    }
    # The image markers' token ids at the top of the vocabulary (text here never uses them).
    config = qwen3_5.Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab - 4,
        video_token_id=vocab - 3,
        vision_start_token_id=vocab - 2,
        vision_end_token_id=vocab - 1,
    )
    torch.manual_seed(seed)
    model = qwen3_5.Qwen3_5ForConditionalGeneration(config).float().eval()
    _perturb_norms_and_biases(model)
    model.save_pretrained(out, safe_serialization=True)
    return model


def write_char_tokenizer(out: Path, chat_template: str | None = None) -> int:
    """A character-level tokenizer.json (specials, then printable ASCII); returns its size."""
    import json

    import tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    if chat_template:
        (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return len(vocab)


def random_head(
    cfg: ModelConfig, seed: int = 0, taps: Sequence[int] = ()
) -> dict[str, torch.Tensor]:
    """Random MTP head tensors (Qwen3.5 layout) for a model of `cfg`; with `taps`, a
    head of fused trunk features reading the residual stream before those layers."""
    g = torch.Generator().manual_seed(seed)
    norm_scale = 0 if cfg.is_hybrid else 1  # hybrid models' norms are zero-centred
    head = {
        name: (norm_scale + 0.1 * torch.randn(shape, generator=g))
        if len(shape) == 1
        else 0.1 * torch.randn(shape, generator=g)
        for name, shape in mtp_tensor_shapes(cfg, taps=len(taps)).items()
    }
    if taps:
        head[TAP_LAYERS] = torch.tensor(list(taps))
    return head


def add_mtp_head(path: Path, seed: int = 0) -> None:
    """Give the single-file checkpoint at `path` its own random MTP layer."""
    from safetensors.torch import load_file, save_file

    from mtpd.model.checkpoint import open_checkpoint, read_config

    cfg = read_config(open_checkpoint(path))
    file = path / "model.safetensors"
    save_file({**load_file(file), **random_head(cfg, seed)}, file, metadata={"format": "pt"})


def write_drafting_model(path: Path, layers: int, vocab: int) -> Path:
    """A tiny qwen2 checkpoint with a character tokenizer and its own random MTP layer
    (found at load): what the speculative decoding tests run."""
    write_tiny_model(path, "qwen2", layers=layers, vocab=vocab)
    write_char_tokenizer(path)
    add_mtp_head(path)
    return path
