"""The multi-token-prediction (MTP) module, in the Qwen3.5/3.6 layout.

Given the trunk's final-normed hidden state at position t and the embedding of token
t+1, it predicts token t+2:

    x = fc([norm_e(embed(t+1)); norm_h(h_t)])   # embedding first in the concat
    x = decoder layer(s)(x)                       # with the head's own KV cache
    h' = norm(x);  logits = lm_head(h')           # embedding and LM head shared with the trunk

For more than one draft it runs recursively, feeding h' back as the hidden state.
The DeepSeek-V3 layout (enorm, hnorm, eh_proj, shared_head) is renamed onto this one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mtpd.model import cpu_kernels
from mtpd.model.architecture import decoder_layer_shapes, layer_stack, rms_norm
from mtpd.model.checkpoint import Checkpoint
from mtpd.model.config import ModelConfig
from mtpd.model.decoder import check_tap_layers
from mtpd.model.errors import ModelLoadError
from mtpd.model.kv_cache import KVCache
from mtpd.model.layers import LayerStack, Linear, RMSNorm
from mtpd.model.step_layout import BatchLayout

PREFIX = "mtp"
DRAFT_VOCAB = f"{PREFIX}.draft_vocab"  # optional int64 [N]: the token ids drafts may take
# Optional int64 [T]: fused trunk features (EAGLE-3). The head then reads, beside the
# trunk's final state, the residual stream before each of these trunk layers, each
# RMS-normed, all mixed by `fuse` into the hidden state its fc takes.
TAP_LAYERS = f"{PREFIX}.tap_layers"
FUSE = f"{PREFIX}.fuse.weight"


def tap_norm_name(i: int) -> str:
    return f"{PREFIX}.pre_fc_norm_taps.{i}.weight"


def mtp_tensor_shapes(
    cfg: ModelConfig, num_layers: int = 1, taps: int = 0
) -> dict[str, tuple[int, ...]]:
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        f"{PREFIX}.fc.weight": (h, 2 * h),
        f"{PREFIX}.pre_fc_norm_embedding.weight": (h,),
        f"{PREFIX}.pre_fc_norm_hidden.weight": (h,),
        f"{PREFIX}.norm.weight": (h,),
    }
    for i in range(num_layers):
        shapes.update(decoder_layer_shapes(cfg, f"{PREFIX}.layers.{i}"))
    if taps:
        shapes[FUSE] = (h, (1 + taps) * h)
        shapes.update({tap_norm_name(i): (h,) for i in range(taps)})
    return shapes


def head_tap_layers(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> tuple[int, ...]:
    """The trunk layers a head's fused features tap (none: it reads the final state)."""
    if TAP_LAYERS not in tensors:
        return ()
    taps = tensors[TAP_LAYERS]
    if taps.dim() != 1 or taps.numel() == 0 or taps.is_floating_point():
        raise ModelLoadError(f"MTP head: {TAP_LAYERS} must list trunk layer numbers")
    try:
        check_tap_layers(taps.tolist(), cfg)
    except ModelLoadError as e:
        raise ModelLoadError(f"MTP head: {TAP_LAYERS}: {e}") from None
    return tuple(taps.tolist())


_DEEPSEEK_RENAMES = {
    "enorm": "pre_fc_norm_embedding",
    "hnorm": "pre_fc_norm_hidden",
    "eh_proj": "fc",
    "shared_head.norm": "norm",
}


def from_deepseek_layout(
    tensors: dict[str, torch.Tensor], mtp_layer: int
) -> dict[str, torch.Tensor]:
    """Rename DeepSeek-V3 MTP tensors (model.layers.{mtp_layer}.*) onto the mtp.* layout.

    The shared embedding and head copies DeepSeek stores inside the MTP layer are
    dropped: this module always shares the trunk's.
    """
    prefix = f"model.layers.{mtp_layer}."
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if rest.startswith(("embed_tokens.", "shared_head.head.")):
            continue
        stem = rest.rsplit(".", 1)[0]
        if stem in _DEEPSEEK_RENAMES:
            out[f"{PREFIX}.{_DEEPSEEK_RENAMES[stem]}.weight"] = tensor
        else:
            out[f"{PREFIX}.layers.0.{rest}"] = tensor
    return out


def count_mtp_layers(names: set[str]) -> int:
    indices = {int(m.group(1)) for n in names if (m := re.match(rf"{PREFIX}\.layers\.(\d+)\.", n))}
    return max(indices) + 1 if indices else 0


HEAD_FORMAT = "mtpd-mtp-head/1"


def save_head_file(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"format": HEAD_FORMAT, **metadata},
    )


def check_head_base(metadata: Mapping[str, str], fingerprint: str, source: Path) -> None:
    """Refuse a head trained for another base model."""
    want = metadata.get("base_model_fingerprint")
    if want is not None and want != fingerprint:
        raise ModelLoadError(
            f"{source}: this MTP head was trained for a different base model "
            f"({metadata.get('base_model', 'unknown')}, weights fingerprint {want}); "
            f"the loaded model's fingerprint is {fingerprint}"
        )


def read_head_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A separate MTP head file: its mtp.* tensors and its metadata."""
    if not path.exists():
        raise ModelLoadError(f"{path}: MTP head file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file: {e}") from e


def read_head_tap_layers(path: Path, cfg: ModelConfig) -> tuple[int, ...]:
    """The trunk layers a head file's fused features tap: what the stages before the
    tail carry on for it."""
    return head_tap_layers(read_head_file(path)[0], cfg)


def read_checkpoint_head(ckpt: Checkpoint, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The MTP tensors a checkpoint carries itself, in either layout, or None."""
    names = ckpt.tensor_names()
    own = {n for n in names if n.startswith(f"{PREFIX}.")}
    if own:
        return ckpt.read(own)
    deepseek = f"model.layers.{cfg.num_layers}."
    ds = {n for n in names if n.startswith(deepseek)}
    if ds:
        return from_deepseek_layout(ckpt.read(ds), cfg.num_layers)
    return None


class HeadPass(NamedTuple):
    """A head pass's states of the rows that draft, their greedy drafts (full-vocabulary
    ids), the drafts' probabilities where asked, and the seconds of the part of the pass
    that grows with its rows (what a drafter bills held rows their share of)."""

    states: torch.Tensor
    drafts: torch.Tensor
    probabilities: torch.Tensor | None
    rows_s: float


class MTPHead(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        tensors: dict[str, torch.Tensor],
        embedding: torch.Tensor,
        lm_head: Linear,
        max_context: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        num_layers = count_mtp_layers(set(tensors))
        if num_layers == 0:
            raise ModelLoadError("MTP head has no layers (no mtp.layers.N.* tensors)")
        self.tap_layers = head_tap_layers(tensors, cfg)
        shapes = mtp_tensor_shapes(cfg, num_layers, len(self.tap_layers))
        for name, want in shapes.items():
            if name not in tensors:
                raise ModelLoadError(f"MTP head: missing tensor {name!r}")
            if tuple(tensors[name].shape) != want:
                raise ModelLoadError(
                    f"MTP head: tensor {name!r} has shape {list(tensors[name].shape)}, "
                    f"expected {list(want)}"
                )
        t = {
            k: v.to(device=embedding.device, dtype=dtype) for k, v in tensors.items() if k in shapes
        }
        self.cfg, self.dtype = cfg, dtype
        self.norm_embedding = rms_norm(cfg, t[f"{PREFIX}.pre_fc_norm_embedding.weight"])
        self.norm_hidden = rms_norm(cfg, t[f"{PREFIX}.pre_fc_norm_hidden.weight"])
        self.fc = Linear(t[f"{PREFIX}.fc.weight"])
        self.fuse = Linear(t[FUSE]) if self.tap_layers else None
        self.norm_taps = nn.ModuleList(
            rms_norm(cfg, t[tap_norm_name(i)]) for i in range(len(self.tap_layers))
        )
        self.stack = layer_stack(
            cfg, [f"{PREFIX}.layers.{i}" for i in range(num_layers)], t, dtype, max_context
        )
        self.norm = rms_norm(cfg, t[f"{PREFIX}.norm.weight"])
        self._kernel_input: cpu_kernels.MTPInput | None = None  # made once packed
        self._kernel_pass: cpu_kernels.MTPPass | None = None  # made once packed
        # Shared with the trunk, not copied.
        self.embedding = embedding
        # A reduced draft vocabulary makes the draft pass's LM head a few percent of the
        # trunk instead of a quarter; verification still scores the full vocabulary.
        self.register_buffer("draft_ids", None, persistent=False)
        self.draft_head = lm_head
        if DRAFT_VOCAB in tensors:
            ids = tensors[DRAFT_VOCAB].long()
            if (
                ids.dim() != 1
                or ids.numel() == 0
                or int(ids.max()) >= cfg.vocab_size
                or int(ids.min()) < 0
                or ids.unique().numel() != ids.numel()
            ):
                raise ModelLoadError(
                    f"MTP head: {DRAFT_VOCAB} must hold distinct token ids below {cfg.vocab_size}"
                )
            self.draft_ids = ids.to(embedding.device)
            self.draft_head = Linear(lm_head.weight.detach()[ids].clone())

    @property
    def draft_vocab_size(self) -> int:
        return self.cfg.vocab_size if self.draft_ids is None else self.draft_ids.numel()

    def new_cache(self, max_seqs: int, max_context: int | None = None) -> KVCache:
        return self.stack.new_cache(max_seqs, max_context)

    def forward(
        self,
        hidden: torch.Tensor,
        next_tokens: torch.Tensor,
        cache: KVCache,
        slots: list[int],
        counts: list[int],
    ) -> torch.Tensor:
        """hidden: final-normed trunk (or previous MTP) states [N, H] at positions t;
        next_tokens: the tokens at t+1 [N] (a fused head takes trunk rows [N, H x (1 +
        taps)], see _hidden). Returns the normed MTP states [N, H], whose
        logits predict the tokens at t+2. Appends N entries to the head's cache."""
        return self.norm(self.stack(self._input(hidden, next_tokens), cache, slots, counts))

    def forward_and_draft(
        self,
        hidden: torch.Tensor,
        next_tokens: torch.Tensor,
        cache: KVCache,
        slots: list[int],
        counts: list[int],
        rows: list[int] | None = None,
        probabilities: bool = False,
    ) -> HeadPass:
        """forward(), then draft() on the states of `rows` (None: every row). One kernel
        call where the whole head runs on the kernels: the same bits as the calls one by
        one."""
        spec = None if probabilities else self._pass_on_kernel(cache, hidden)
        if spec is None:
            began = time.monotonic()
            states = self.forward(hidden, next_tokens, cache, slots, counts)
            rows_s = time.monotonic() - began
            if rows is not None:
                states = states[rows]
            if not states.shape[0]:
                return HeadPass(states, next_tokens.new_empty(0), None, rows_s)
            return HeadPass(states, *self.draft(states, probabilities), rows_s)
        stack = self.stack
        layout = BatchLayout.build(cache, slots, counts, stack.cos, stack.sin_signed, self.dtype)
        draft_rows = list(range(len(next_tokens))) if rows is None else rows
        states, drafts, rows_s = cpu_kernels.mtp_pass(
            spec, layout.kernel_step(cache), next_tokens, hidden, draft_rows
        )
        cache.commit(layout.slots, layout.starts, layout.counts)
        return HeadPass(states, drafts, None, rows_s)

    def forward_causal(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Training: whole sequences hidden [B, T, H] and next_tokens [B, T], no cache."""
        return self.norm(self.stack.forward_causal(self._input(hidden, next_tokens)))

    def _input(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        e = F.embedding(next_tokens, self.embedding)
        kernel = self._input_on_kernel()
        if kernel is not None and hidden.dim() == 2:
            return cpu_kernels.mtp_input(kernel, e, hidden)
        return self.fc(torch.cat([self.norm_embedding(e), self._hidden(hidden)], dim=-1))

    def _input_on_kernel(self) -> cpu_kernels.MTPInput | None:
        """The input stage as one kernel call, where packing put every part of it on the
        kernels (the same kernels, in the same order: the same bits as part by part)."""
        if self._kernel_input is None:
            norms = [self.norm_embedding, self.norm_hidden, *self.norm_taps]
            linears = [self.fc] if self.fuse is None else [self.fc, self.fuse]
            size, eps = self.cfg.hidden_size, self.norm_hidden.eps
            if (
                self.dtype == torch.float32
                and self.embedding.dtype == torch.float32
                # A hybrid model's norms are zero-centred: not the kernel's.
                and all(
                    type(norm) is RMSNorm and norm.on_kernel and norm.eps == eps for norm in norms
                )
                and all(linear.on_kernel and linear.matrix.n == size for linear in linears)
            ):
                self._kernel_input = cpu_kernels.MTPInput.of(
                    (self.norm_embedding.weight, self.norm_hidden.weight),
                    [norm.weight for norm in self.norm_taps],
                    eps,
                    None if self.fuse is None else self.fuse.matrix,
                    self.fc.matrix,
                )
        return self._kernel_input

    def _pass_on_kernel(self, cache: KVCache, hidden: torch.Tensor) -> cpu_kernels.MTPPass | None:
        """The whole pass as one kernel call, where the input stage, every layer (in one
        call over this cache), the final norm and the draft head run on the kernels."""
        if type(self.stack) is not LayerStack or self.stack.taps or hidden.dim() != 2:
            return None
        layers = self.stack.one_call_layers(hidden.dtype, cache)
        if layers is None:
            return None
        if self._kernel_pass is None:
            head_input = self._input_on_kernel()
            if (
                head_input is not None
                and type(self.norm) is RMSNorm
                and self.norm.on_kernel
                and self.draft_head.on_kernel
            ):
                self._kernel_pass = cpu_kernels.MTPPass.of(
                    self.embedding,
                    head_input,
                    layers,
                    self.norm.weight,
                    self.norm.eps,
                    self.draft_head.matrix,
                    self.draft_vocab_size,
                    self.draft_ids,
                )
        return self._kernel_pass

    def _hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden state fc takes: from a trunk row with taps ([final, tap, ...]) their
        fused mix; from a plain row (the head's own state, drafting on) that state."""
        size = self.cfg.hidden_size
        final = self.norm_hidden(hidden[..., :size])
        if self.fuse is None or hidden.shape[-1] == size:
            return final
        taps = [
            norm(hidden[..., (i + 1) * size : (i + 2) * size])
            for i, norm in enumerate(self.norm_taps)
        ]
        return self.fuse(torch.cat([final, *taps], -1))

    def draft_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (the full one when the head has none)."""
        return self.draft_head(states).float()

    def draft(
        self, states: torch.Tensor, probabilities: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The greedy draft for each state (full-vocabulary ids) and, if asked, the head's
        probability for it (over the draft vocabulary): softmax at the largest logit,
        1 / sum(exp(logits - largest))."""
        logits = self.draft_logits(states)
        # On the CPU through numpy: PyTorch's argmax over the 8k draft vocabulary took
        # 40 us of a 0.8 ms draft pass, numpy's a few (both take the first of equal maxima).
        best = torch.from_numpy(logits.numpy().argmax(-1)) if logits.is_cpu else logits.argmax(-1)
        prob = None
        if probabilities:
            largest = logits.gather(-1, best[:, None])
            prob = (logits - largest).exp().sum(-1).reciprocal()
        return (best if self.draft_ids is None else self.draft_ids[best]), prob
