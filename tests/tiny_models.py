"""Tiny random checkpoints written to disk by `transformers` (the test oracle)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from mtpd.model.config import ModelConfig
from mtpd.model.mtp import mtp_tensor_shapes

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
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
    heads = 4
    config = config_cls(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // gqa,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so they are tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
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


def random_head(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random MTP head tensors (Qwen3.5 layout) for a model of `cfg`."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (1 + 0.1 * torch.randn(shape, generator=g))
        if len(shape) == 1
        else 0.1 * torch.randn(shape, generator=g)
        for name, shape in mtp_tensor_shapes(cfg).items()
    }


def add_mtp_head(path: Path, seed: int = 0) -> None:
    """Give the single-file checkpoint at `path` its own random MTP layer."""
    from safetensors.torch import load_file, save_file

    from mtpd.model.checkpoint import open_checkpoint, read_config

    cfg = read_config(open_checkpoint(path))
    file = path / "model.safetensors"
    save_file({**load_file(file), **random_head(cfg, seed)}, file, metadata={"format": "pt"})
