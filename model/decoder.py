"""A decoder shard: a contiguous range of layers, plus the embedding on the first
shard and the final norm and LM head on the last. With one shard it is the whole model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtpd.model.architecture import decoder_layer_shapes, layer_stack, rms_norm
from mtpd.model.checkpoint import Checkpoint
from mtpd.model.config import ModelConfig
from mtpd.model.errors import ModelLoadError
from mtpd.model.kv_cache import KVCache
from mtpd.model.layers import LayerStack, Linear
from mtpd.model.step_layout import PaddedLayout

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class ShardSpec:
    first_layer: int
    end_layer: int  # exclusive
    has_embedding: bool
    has_head: bool

    @classmethod
    def whole(cls, cfg: ModelConfig) -> ShardSpec:
        return cls(0, cfg.num_layers, True, True)

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.first_layer


def shard_tensor_shapes(cfg: ModelConfig, spec: ShardSpec) -> dict[str, tuple[int, ...]]:
    """The tensors (HF names) a shard reads, with their expected shapes."""
    shapes: dict[str, tuple[int, ...]] = {}
    # The tail holds the embedding too: the MTP head embeds the token after each state.
    if spec.has_embedding or spec.has_head:
        shapes[EMBEDDING] = (cfg.vocab_size, cfg.hidden_size)
    for i in range(spec.first_layer, spec.end_layer):
        shapes.update(decoder_layer_shapes(cfg, f"model.layers.{i}"))
    if spec.has_head:
        shapes[FINAL_NORM] = (cfg.hidden_size,)
        if not cfg.tie_word_embeddings:
            shapes[LM_HEAD] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def read_validated(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Read exactly the named tensors and check their shapes."""
    available = ckpt.tensor_names()
    missing = sorted(set(shapes) - available)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{ckpt.path}: missing tensor {missing[0]!r}{more}")
    tensors = ckpt.read(shapes)
    for name, want in shapes.items():
        got = tuple(tensors[name].shape)
        if got != want:
            raise ModelLoadError(
                f"{ckpt.path}: tensor {name!r} has shape {list(got)}, expected {list(want)}"
            )
    return tensors


def fingerprint_names(cfg: ModelConfig) -> list[str]:
    """The base-model tensors a head is bound to: what it shares (embedding or LM head,
    final norm) and the trunk's last layer, whose output it reads. The tail worker holds
    all of them."""
    names = [EMBEDDING if cfg.tie_word_embeddings else LM_HEAD, FINAL_NORM]
    return names + sorted(decoder_layer_shapes(cfg, f"model.layers.{cfg.num_layers - 1}"))


def weights_fingerprint(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> str:
    digest = hashlib.sha256()
    for name in fingerprint_names(cfg):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def check_tap_layers(tap_layers: Sequence[int], cfg: ModelConfig) -> None:
    """Taps lie before trunk layers 1 .. num_layers - 1, each once, in order."""
    n = cfg.num_layers
    if list(tap_layers) != sorted(set(tap_layers)) or not all(0 < t < n for t in tap_layers):
        raise ModelLoadError(f"tap layers {list(tap_layers)} must increase, each within 1..{n - 1}")


class DecoderShard(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        spec: ShardSpec,
        tensors: dict[str, torch.Tensor],
        max_context: int,
    ) -> None:
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.dtype = next(iter(tensors.values())).dtype
        self.fingerprint: str | None = None  # of the base weights a head binds to (tail only)
        self.tap_layers: tuple[int, ...] = ()  # see set_taps
        self.embedding = (
            nn.Parameter(tensors[EMBEDDING], requires_grad=False) if EMBEDDING in tensors else None
        )
        self.stack = layer_stack(
            cfg,
            [f"model.layers.{i}" for i in range(spec.first_layer, spec.end_layer)],
            tensors,
            self.dtype,
            max_context,
        )
        self.norm = self.lm_head = None
        if spec.has_head:
            self.norm = rms_norm(cfg, tensors[FINAL_NORM])
            head = EMBEDDING if cfg.tie_word_embeddings else LM_HEAD
            self.lm_head = Linear(tensors[head], sources=(head,))
        # Counted now, while every weight is a plain parameter (packing turns them into
        # buffers); tied weights count once.
        self.parameter_count = sum(p.numel() for p in self.parameters())

    @classmethod
    def load(
        cls,
        ckpt: Checkpoint,
        cfg: ModelConfig,
        spec: ShardSpec,
        dtype: torch.dtype,
        max_context: int,
        device: torch.device | None = None,
    ) -> DecoderShard:
        raw = read_validated(ckpt, shard_tensor_shapes(cfg, spec))
        # Taken before any dtype conversion, so it names the weights as stored.
        fingerprint = weights_fingerprint(raw, cfg) if spec.has_head else None
        # Converted before the modules are built, so tied weights stay one tensor.
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in raw.items()}
        shard = cls(cfg, spec, tensors, max_context)
        shard.fingerprint = fingerprint
        return shard

    @property
    def device(self) -> torch.device:
        return self.stack.cos.device

    def new_cache(
        self,
        max_seqs: int,
        max_context: int | None = None,
        scratch_slot: bool = False,
        snapshots: int = 0,
    ) -> KVCache:
        """`snapshots`: recurrent states each slot may save for prefix caching."""
        return self.stack.new_cache(max_seqs, max_context, scratch_slot, snapshots)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embedding)

    def set_taps(self, tap_layers: Sequence[int]) -> None:
        """Carry the residual stream before each of `tap_layers` (model layer numbers,
        1 .. num_layers - 1) on to the tail, where a fused MTP head reads it: a shard's
        output rows become [its output, the taps of earlier shards, its own taps] in layer
        order, and a later shard's input rows the same."""
        check_tap_layers(tap_layers, self.cfg)
        if tap_layers and type(self.stack) is not LayerStack:
            raise ModelLoadError(f"{self.cfg.architecture}: no tapped trunk features")
        first = self.spec.first_layer
        self.stack.taps = tuple(t - first for t in tap_layers if first <= t < self.spec.end_layer)
        self.tap_layers = tuple(tap_layers)

    @property
    def carried_taps(self) -> int:
        """Taps of earlier shards, which this one's input rows carry."""
        return sum(1 for t in self.tap_layers if t < self.spec.first_layer)

    @property
    def input_width(self) -> int:
        """Columns of a row this shard takes after the first: hidden, and carried taps."""
        return self.cfg.hidden_size * (1 + self.carried_taps)

    def forward(
        self, x: torch.Tensor, cache: KVCache, slots: list[int], counts: list[int]
    ) -> torch.Tensor:
        """Run the shard on a flat step batch.

        x: token ids [N] on the first shard, hidden states [N, input_width] otherwise;
        the i-th sequence contributes counts[i] consecutive rows and owns cache slot
        slots[i]. Returns hidden states [N, hidden] (final-normed on the last shard), and
        after them, with taps, the tapped residual streams.
        """
        x, carried = self._split_input(x)
        h = self.embed(x) if self.spec.has_embedding else x
        return self._output(self.stack(h, cache, slots, counts), carried)

    def forward_padded(self, x: torch.Tensor, cache: KVCache, layout: PaddedLayout) -> torch.Tensor:
        """forward() on a padded step (x: [B * T] ids or [B * T, input_width]): tensors
        in, tensors out, nothing on the host, so it can be captured in a CUDA graph. The
        caller records the new cache lengths."""
        x, carried = self._split_input(x)
        h = self.embed(x) if self.spec.has_embedding else x
        return self._output(self.stack.run_layers(h, layout, cache), carried)

    def _split_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.carried_taps:
            return x, None
        h = self.cfg.hidden_size
        return x[:, :h], x[:, h:]

    def _output(self, h: torch.Tensor, carried: torch.Tensor | None) -> torch.Tensor:
        if not self.tap_layers:
            return self.norm(h) if self.norm is not None else h
        size = self.cfg.hidden_size
        out, own = h[:, :size], h[:, size:]
        if self.norm is not None:
            out = self.norm(out)
        return torch.cat([out, *([] if carried is None else [carried]), own], -1)

    def logits(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final-normed rows (their taps, if any, are not read)."""
        if self.tap_layers:
            normed_hidden = normed_hidden[..., : self.cfg.hidden_size].contiguous()
        return self.lm_head(normed_hidden).float()
