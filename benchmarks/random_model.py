"""Write a random-weight dense Llama-layout checkpoint with its own random MTP layer, for
measuring the cost of decoding, drafting and verifying at a size no test machine holds a
real model of (`benchmarks/gpu_check.sh`). Acceptance means nothing with random weights:
measure with `mtpd bench --force-acceptance P`.

Forced acceptance drafts the plain run's greedy tokens, so greedy decoding must not
depend on the batch shape. With plain random weights it does: the top two logits are
nearly tied (median gap 0.05 against a bf16 error of 0.04 at hidden 1024), a step of
another shape flips the choice, and the drafts stop matching. So the weights are random
but decisive: a large embedding dominates the residual stream (the layers write into it
at a tenth of the usual scale) and the LM head is a permutation of the embedding, so
each token's successor wins by a margin no rounding can close. What the model reads and
computes per token, and so what it costs, is unchanged.

    python benchmarks/random_model.py --out DIR [--hidden 3072] [--layers 28]
        [--intermediate 8192] [--heads 24] [--kv-heads 8] [--vocab 32000] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from mtpd.model.checkpoint import HFCheckpoint, read_config
from mtpd.model.decoder import ShardSpec, shard_tensor_shapes
from mtpd.model.mtp import mtp_tensor_shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cpu", help="where to draw the random numbers")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # Bytes as tokens: enough to encode any prompt; the model's larger vocabulary is
    # generated but never decoded by the benchmark.
    vocab = {pre_tokenizers.ByteLevel.alphabet()[i]: i for i in range(256)}
    tokenizer = Tokenizer(BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(out / "tokenizer.json"))

    cfg = read_config(_ConfigOnly(out))
    shapes = {**shard_tensor_shapes(cfg, ShardSpec.whole(cfg)), **mtp_tensor_shapes(cfg)}
    g = torch.Generator(device=args.device).manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        w = torch.randn(shape, generator=g, device=args.device, dtype=torch.bfloat16)
        if name == "model.embed_tokens.weight":
            scale = 1.0
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            scale = 0.002  # what a layer writes into the residual stream
        else:
            scale = 0.02
        tensors[name] = (w * scale).cpu()
    # Token t's successor is perm[t]: the LM head row perm[t] is t's embedding.
    perm = torch.randperm(args.vocab, generator=torch.Generator().manual_seed(1))
    embedding = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = torch.empty_like(embedding).index_copy_(0, perm, embedding)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    params = sum(t.numel() for t in tensors.values())
    print(f"wrote {out}: {params / 1e6:,.0f}M parameters (bfloat16)")


class _ConfigOnly(HFCheckpoint):
    """The config of a directory whose weights are not written yet."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hf_config = json.loads((path / "config.json").read_text())


if __name__ == "__main__":
    main()
