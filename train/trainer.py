"""Train an MTP head on collected data (see collect.py) by self-distillation.

The target at every position is the frozen model's own argmax: what counts is agreement
with what the model would generate, not with any text. The loss unrolls the recursion
(`unroll` draft depths), so depths 2+ train on the head's own output as they run; with
`feature_weight` it also pulls the head's states towards the trunk's (EAGLE's feature
regression). With `held_out`, a share of the sequences is kept out of training and the
head returned is the checkpoint that drafts best on them (early stopping).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mtpd.model.config import ModelConfig
from mtpd.model.kernel_library import cpu_flags
from mtpd.model.layers import Linear
from mtpd.model.mtp import (
    DRAFT_VOCAB,
    FUSE,
    PREFIX,
    TAP_LAYERS,
    MTPHead,
    mtp_tensor_shapes,
    tap_norm_name,
)
from mtpd.train.collect import Record

IGNORE = -100


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1500
    batch: int = 16  # sequences per step
    lr: float = 3e-2  # relative to each tensor's initial RMS (see _param_groups)
    warmup: int = 50
    unroll: int = 2  # draft depths in the loss
    max_len: int = 256
    seed: int = 0
    checkpoint_every: int = 100
    # "argmax": cross-entropy on the model's argmax; "kl": match its whole distribution
    # (over the draft vocabulary), recomputed from the stored hidden states.
    distill: str = "argmax"
    # EAGLE's feature regression: at every depth, smooth L1 between the head's state and
    # the trunk's final-normed hidden state at the same position, times this weight. A
    # deeper draft then runs on a state like the one the trunk would give it. 0: off.
    feature_weight: float = 0.0
    # "bfloat16": the forward and backward passes' products in bfloat16 (autocast; the
    # weights, their gradients and Adam's state stay float32): on a CPU with AMX, oneDNN
    # runs them on the tile unit, a training step 2x faster (docs/mtp-heads.md).
    precision: str = "float32"
    # The share of sequences kept out of training to score the head at every checkpoint;
    # the best-scoring checkpoint is the one returned. 0: off (the last step's head).
    held_out: float = 0.0


def training_precision(choice: str, device: torch.device) -> str:
    """`choice`, with "auto" resolved: bfloat16 where the device multiplies it fast."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bfloat16"
    return "bfloat16" if {"amx_bf16", "avx512_bf16"} & cpu_flags() else "float32"


def draft_vocabulary(records: Sequence[Record], size: int) -> tuple[torch.Tensor, float]:
    """The `size` tokens the model predicts most often, sorted, and their coverage."""
    counts = Counter(t for r in records for t in r.argmax)
    top = [t for t, _ in counts.most_common(size)]
    coverage = sum(counts[t] for t in top) / max(1, sum(counts.values()))
    return torch.tensor(sorted(top), dtype=torch.long), coverage


def initial_head(trunk: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Start from the trunk's last layer and final norm; fc passes the hidden state through
    and adds a little of the embedding, so step 0 already resembles the trunk's output."""
    h = cfg.hidden_size
    last = f"model.layers.{cfg.num_layers - 1}."
    out = {
        f"{PREFIX}.fc.weight": torch.cat([0.1 * torch.eye(h), torch.eye(h)], dim=1),
        f"{PREFIX}.pre_fc_norm_embedding.weight": torch.ones(h),
        f"{PREFIX}.pre_fc_norm_hidden.weight": torch.ones(h),
        f"{PREFIX}.norm.weight": trunk["model.norm.weight"].clone(),
    }
    for name in mtp_tensor_shapes(cfg):
        if name.startswith(f"{PREFIX}.layers.0."):
            out[name] = trunk[last + name.removeprefix(f"{PREFIX}.layers.0.")].clone()
    return out


def fused_input(cfg: ModelConfig, tap_layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """A fused-features head's extra tensors, at a start that passes the final state
    through as before (so a trained head goes on from where it was): `fuse` is the
    identity on the final state and small on the taps (not zero: a zero block gets no
    gradient through the product's input)."""
    h, n = cfg.hidden_size, len(tap_layers)
    fuse = torch.zeros(h, (1 + n) * h)
    fuse[:, :h] = torch.eye(h)
    noise = torch.randn(h, n * h, generator=torch.Generator().manual_seed(0))
    fuse[:, h:] = 0.01 * noise / h**0.5
    return {
        TAP_LAYERS: torch.tensor(list(tap_layers), dtype=torch.long),
        FUSE: fuse,
        **{tap_norm_name(i): torch.ones(h) for i in range(n)},
    }


def head_tensors(head: MTPHead) -> dict[str, torch.Tensor]:
    """The head's own trained tensors under their file names (shared ones excluded)."""
    names = {
        "norm_embedding.weight": "pre_fc_norm_embedding.weight",
        "norm_hidden.weight": "pre_fc_norm_hidden.weight",
        "fc.weight": "fc.weight",
        "norm.weight": "norm.weight",
    }
    out = {
        f"{PREFIX}.{names[k]}": v.detach().clone() for k, v in head.named_parameters() if k in names
    }
    for i, layer in enumerate(head.stack.layers):
        p = f"{PREFIX}.layers.{i}."
        q, kv = (
            layer.attn.num_heads * layer.attn.head_dim,
            layer.attn.num_kv_heads * layer.attn.head_dim,
        )
        wq, wk, wv = layer.attn.qkv.weight.detach().split([q, kv, kv])
        gate, up = layer.mlp.gate_up.weight.detach().split(layer.mlp.intermediate)
        out |= {
            p + "input_layernorm.weight": layer.input_norm.weight.detach().clone(),
            p + "post_attention_layernorm.weight": layer.post_attn_norm.weight.detach().clone(),
            p + "self_attn.q_proj.weight": wq.clone(),
            p + "self_attn.k_proj.weight": wk.clone(),
            p + "self_attn.v_proj.weight": wv.clone(),
            p + "self_attn.o_proj.weight": layer.attn.o.weight.detach().clone(),
            p + "mlp.gate_proj.weight": gate.clone(),
            p + "mlp.up_proj.weight": up.clone(),
            p + "mlp.down_proj.weight": layer.mlp.down.weight.detach().clone(),
        }
        if layer.attn.q_norm is not None:
            out[p + "self_attn.q_norm.weight"] = layer.attn.q_norm.weight.detach().clone()
            out[p + "self_attn.k_norm.weight"] = layer.attn.k_norm.weight.detach().clone()
    if head.draft_ids is not None:
        out[DRAFT_VOCAB] = head.draft_ids.clone()
    if head.fuse is not None:
        out[TAP_LAYERS] = torch.tensor(head.tap_layers, dtype=torch.long)
        out[FUSE] = head.fuse.weight.detach().clone()
        for i, norm in enumerate(head.norm_taps):
            out[tap_norm_name(i)] = norm.weight.detach().clone()
    return out


def _param_groups(head: MTPHead, lr: float) -> list[dict]:
    # Adam's step is the same size for every tensor; scaling each tensor's learning rate
    # by its initial RMS makes the step relative to the tensor, which trains a head
    # initialised from trunk weights much faster than one global rate.
    groups = []
    for p in head.parameters():
        if p.requires_grad:
            scale = float(p.detach().pow(2).mean().sqrt()) or 1.0
            groups.append(
                {"params": [p], "lr": lr * max(scale, 1e-2), "base_lr": lr * max(scale, 1e-2)}
            )
    return groups


def _batch(
    records: Sequence[Record], idx: list[int], unroll: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B, T, H], tokens [B, T + unroll] (tokens at p+1.. per row), argmax targets
    [B, T + unroll - 1] aligned the same way, padded with IGNORE, and the trunk's hidden
    states at those target positions [B, T + unroll - 1, H] (whose logits the targets are)."""
    rows = [records[i] for i in idx]
    t = min(max_len, max(len(r.argmax) - 1 for r in rows))
    h = torch.zeros(len(rows), t, rows[0].hidden.shape[1])
    toks = torch.zeros(len(rows), t + unroll, dtype=torch.long)
    tgt = torch.full((len(rows), t + unroll - 1), IGNORE, dtype=torch.long)
    h_tgt = torch.zeros(len(rows), t + unroll - 1, rows[0].hidden.shape[1])
    for b, r in enumerate(rows):
        n = min(t, len(r.argmax) - 1)
        h[b, :n] = r.hidden[:n].float()
        nxt = torch.tensor(r.tokens[1 : 1 + n + unroll])
        toks[b, : len(nxt)] = nxt
        a = torch.tensor(r.argmax[1 : 1 + n + unroll - 1])
        tgt[b, : len(a)] = a
        tgt[b, n:] = IGNORE  # positions beyond the row's drafts
        h_tgt[b, : len(a)] = r.hidden[1 : 1 + len(a)].float()
    return h, toks, tgt, h_tgt


def split_held_out(
    records: Sequence[Record], share: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """(training, held out): each sequence held out whole with probability `share`, by a
    seeded draw of its own, so sequences appended to a work dir later leave the earlier
    ones where they were; at least one on each side. A sequence is one prompt's
    continuation (corpus text aside, whose chunks of one file may fall on both sides)."""
    if not share:
        return list(records), []
    if not 0 < share < 1 or len(records) < 2:
        raise ValueError(f"cannot hold out {share} of {len(records)} sequences")
    draws = torch.rand(len(records), generator=torch.Generator().manual_seed(seed + 104729))
    held = draws < share
    held[draws.argmin()] = True
    held[draws.argmax()] = False
    return (
        [r for r, h in zip(records, held.tolist(), strict=True) if not h],
        [r for r, h in zip(records, held.tolist(), strict=True) if h],
    )


def train_head(
    head: MTPHead,
    records: Sequence[Record],
    settings: TrainSettings,
    state_file: Path | None = None,
    progress: Callable[[int, float, float, float], None] | None = None,
) -> dict[str, float]:
    """Train `head` in place; resumes from `state_file` when it exists. Returns the last
    loss and top-1 agreement (depth 1) averaged over the final 50 steps; with
    `settings.held_out`, also the held-out score of the head returned (`held_out_score`,
    see `held_out_score`) and the step it was saved at (`best_step`)."""
    for p in head.parameters():
        p.requires_grad_(False)
    trained = (head.norm_embedding, head.norm_hidden, head.fc, head.stack, head.norm)
    for m in (*trained, head.norm_taps, *([head.fuse] if head.fuse is not None else [])):
        for p in m.parameters():
            p.requires_grad_(True)
    opt = torch.optim.AdamW(_param_groups(head, settings.lr), weight_decay=0.0)
    params = [p for g in opt.param_groups for p in g["params"]]
    records, held = split_held_out(records, settings.held_out, settings.seed)
    start_step, best = 0, None
    if state_file is not None and state_file.exists():
        start_step, best = _load_state(state_file, params, opt)
    if best is not None and best.held != len(held):
        best = None  # scored on another held-out set (the work dir has grown since)

    # Map targets to draft-vocabulary indices; targets outside it cannot be drafted.
    to_draft = None
    if head.draft_ids is not None:
        to_draft = torch.full(
            (head.cfg.vocab_size,), IGNORE, dtype=torch.long, device=head.draft_ids.device
        )
        to_draft[head.draft_ids] = torch.arange(
            head.draft_ids.numel(), device=head.draft_ids.device
        )

    n = len(records)
    history: list[tuple[float, float]] = []
    started = time.perf_counter()
    for step in range(start_step, settings.steps):
        epoch, pos = divmod(step * settings.batch, n)
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(settings.seed * 7919 + epoch)
        )
        idx = [int(order[(pos + i) % n]) for i in range(settings.batch)]
        lr_scale = (
            min(1.0, (step + 1) / settings.warmup)
            * 0.5
            * (1 + math.cos(math.pi * step / settings.steps))
        )
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_scale

        loss, matches = _batch_loss(head, settings, records, idx, to_draft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        agree = matches[0][0] / max(matches[0][1], 1)
        history.append((loss.item(), agree))
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            if held:
                score = held_out_score(head, held, settings, to_draft)
                if best is None or score > best.score:
                    kept = [p.detach().clone() for p in params]
                    best = _Best(score, step + 1, len(held), kept)
            if state_file is not None:
                _save_state(state_file, params, opt, step + 1, best)
        if progress:
            done = step + 1 - start_step
            eta = (time.perf_counter() - started) / done * (settings.steps - step - 1)
            progress(step + 1, history[-1][0], agree, eta)
    for p in head.parameters():
        p.requires_grad_(False)
    tail = history[-50:] or [(math.nan, math.nan)]
    result = {
        "loss": sum(x for x, _ in tail) / len(tail),
        "top1_agreement": sum(a for _, a in tail) / len(tail),
    }
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(params, best.params, strict=True):
                p.copy_(kept)
        result |= {"held_out_score": best.score, "best_step": best.step}
    return result


@dataclass(frozen=True)
class _Best:
    score: float
    step: int
    held: int  # sequences scored
    params: list[torch.Tensor]


def held_out_score(
    head: MTPHead,
    held: Sequence[Record],
    settings: TrainSettings,
    to_draft: torch.Tensor | None = None,
) -> float:
    """Drafts a step would accept on `held`, teacher-forced, at k = `settings.unroll`:
    the sum over depths of the product of the top-1 agreements up to each (the
    performance model's E(k) - 1, with each depth's agreement standing for its
    conditional acceptance), over every position training would count (the prompts'
    too). `to_draft` maps token ids into the draft vocabulary."""
    hits = [0] * settings.unroll
    counts = [0] * settings.unroll
    with torch.no_grad():
        for start in range(0, len(held), settings.batch):
            idx = list(range(start, min(start + settings.batch, len(held))))
            _, matches = _batch_loss(head, settings, held, idx, to_draft)
            for d, (hit, count) in enumerate(matches):
                hits[d] += hit
                counts[d] += count
    score, chain = 0.0, 1.0
    for hit, count in zip(hits, counts, strict=True):
        chain *= hit / max(count, 1)
        score += chain
    return score


def _batch_loss(
    head: MTPHead,
    settings: TrainSettings,
    records: Sequence[Record],
    idx: list[int],
    to_draft: torch.Tensor | None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`_unrolled_loss` over the sequences `idx` of `records`, on the head's device and
    in the settings' precision; `to_draft` maps targets into the draft vocabulary."""
    device = head.fc.weight.device
    hidden, toks, tgt, h_tgt = (
        x.to(device) for x in _batch(records, idx, settings.unroll, settings.max_len)
    )
    h_tgt = h_tgt[..., : head.cfg.hidden_size]  # the final states (rows may carry taps)
    positions = tgt != IGNORE  # whose trunk state the feature term matches
    if to_draft is not None:
        tgt = torch.where(tgt == IGNORE, tgt, to_draft[tgt.clamp(min=0)])
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=settings.precision == "bfloat16"
    )
    with autocast:
        return _unrolled_loss(head, settings, hidden, toks, tgt, h_tgt, positions)


def _unrolled_loss(
    head: MTPHead,
    settings: TrainSettings,
    hidden: torch.Tensor,
    toks: torch.Tensor,
    tgt: torch.Tensor,
    h_tgt: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The loss over `settings.unroll` draft depths, and at each depth how many
    positions' top-1 agreed with the target, of how many (in the draft vocabulary)."""
    t = hidden.shape[1]
    loss, states, matches = torch.zeros((), device=hidden.device), hidden, []
    for depth in range(settings.unroll):
        width = t - depth
        states = head.forward_causal(states[:, :width], toks[:, depth : depth + width])
        logits = head.draft_logits(states)
        target = tgt[:, depth : depth + width]
        valid = target != IGNORE
        if settings.distill == "kl":
            with torch.no_grad():
                teacher = F.log_softmax(head.draft_logits(h_tgt[:, depth : depth + width]), -1)
            kl = F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="none")
            depth_loss = kl.sum(-1)[valid].mean()
        else:
            depth_loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE
            )
        if settings.feature_weight:
            real = positions[:, depth : depth + width]  # also outside the draft vocabulary
            features = F.smooth_l1_loss(states[real], h_tgt[:, depth : depth + width][real])
            depth_loss = depth_loss + settings.feature_weight * features
        loss = loss + depth_loss * 0.5**depth
        hit = int((logits.argmax(-1)[valid] == target[valid]).sum())
        matches.append((hit, int(valid.sum())))
    return loss, matches


def _save_state(
    path: Path,
    params: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    step: int,
    best: _Best | None = None,
) -> None:
    tensors, metadata = {}, {"step": str(step)}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach().contiguous()
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"{key}.{i}"] = st[key].contiguous()
    if best is not None:
        tensors |= {f"best.{i}": p.contiguous() for i, p in enumerate(best.params)}
        metadata |= {
            "best_step": str(best.step),
            "best_score": repr(best.score),
            "best_held": str(best.held),
        }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.rename(path)


def _load_state(
    path: Path, params: list[torch.Tensor], opt: torch.optim.Optimizer
) -> tuple[int, _Best | None]:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    step = int(metadata["step"])
    best = None
    if "best_step" in metadata:
        kept = [tensors[f"best.{i}"].to(p.device) for i, p in enumerate(params)]
        best = _Best(
            float(metadata["best_score"]),
            int(metadata["best_step"]),
            int(metadata["best_held"]),
            kept,
        )
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
            if f"exp_avg.{i}" in tensors:
                opt.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": tensors[f"exp_avg.{i}"].to(p.device),
                    "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].to(p.device),
                }
    return step, best


def build_trainable_head(
    cfg: ModelConfig,
    init: dict[str, torch.Tensor],
    embedding: torch.Tensor,
    lm_weight: torch.Tensor,
) -> MTPHead:
    """A float32, unpacked head (packed weights take no gradients)."""
    return MTPHead(cfg, init, embedding, Linear(lm_weight), max_context=4096, dtype=torch.float32)
