"""Does an MTP head draft better from several of the trunk's layers than from its last
alone? EAGLE-3's "fused features", measured on the default model before mtpd builds
them in (docs/mtp-heads.md, "Fused trunk features").

`collect` runs the int4 trunk as pipeline stages in one process (split after the tapped
layers) and stores, for every position, the final-normed state followed by the residual
stream after each tapped layer ([L, (1 + taps) x H], bfloat16, `mtpd train-mtp`'s shard
format). `train` goes on from the shipped head over that data, either from the final
state alone (`--taps off`: the current recipe) or from a learned mix of all of them
(`--taps on`: `fuse`, initialised to pass the final state through, so both arms start
from the same head), then reports held-out acceptance as `mtpd eval-mtp` measures it,
on the same tapped int4 trunk.

    python benchmarks/fused_features.py collect --prompts P.jsonl --num-prompts 2400 \\
        --written SELF_PROMPTS.json --num-written 800 --data DIR [--split 5,15]
    python benchmarks/fused_features.py train --data DIR --taps off|on [--steps 400] \\
        [--held-out HELD_OUT.jsonl] [--split 5,15]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.decoder import ShardSpec, fingerprint_names
from mtpd.model.default_model import default_head_path, resolve_model
from mtpd.model.mtp import read_head_file
from mtpd.model.tokenizer import Tokenizer
from mtpd.train.collect import collect, read_shards
from mtpd.train.commands import eval_prompts_path
from mtpd.train.evaluate import evaluate_head
from mtpd.train.sources import read_prompts
from mtpd.train.trainer import TrainSettings, build_trainable_head, train_head
from mtpd.worker.shard_loading import load_shard

MAX_CONTEXT = 512


class TappedTrunk:
    """The int4 trunk as stages split after the tapped layers; a step returns the
    final-normed states and then each split's residual stream, side by side. Quacks as
    much of `Engine` (and its shard and cache) as `continue_prompts` and `evaluate_head`
    use."""

    def __init__(self, splits: list[int], max_seqs: int) -> None:
        self.checkpoint = ckpt = open_checkpoint(resolve_model(None))
        self.cfg = read_config(ckpt)
        self.tokenizer = Tokenizer.from_checkpoint(ckpt, self.cfg)
        self.max_context = MAX_CONTEXT
        bounds = [0, *splits, self.cfg.num_layers]
        self.stages = [
            load_shard(
                ckpt,
                self.cfg,
                ShardSpec(first, end, first == 0, end == self.cfg.num_layers),
                torch.float32,
                MAX_CONTEXT,
                torch.device("cpu"),
                quant="int4",
            )[0]
            for first, end in itertools.pairwise(bounds)
        ]
        self.caches = [s.new_cache(max_seqs, MAX_CONTEXT) for s in self.stages]
        self.shard, self.cache = self, self
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def __call__(self, x, cache, slots, counts) -> torch.Tensor:
        taps = []
        for stage, stage_cache in zip(self.stages, self.caches, strict=True):
            x = stage(x, stage_cache, slots, counts)
            taps.append(x)
        return torch.cat([taps[-1], *taps[:-1]], -1)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return self.stages[-1].logits(states[..., : self.cfg.hidden_size])

    def slot(self, seq_id: str) -> int:
        slots = {c.slot(seq_id) for c in self.caches}
        assert len(slots) == 1, "the stages' caches gave one sequence different slots"
        return slots.pop()

    def release(self, seq_id: str) -> None:
        for c in self.caches:
            c.release(seq_id)


class FusedHidden(nn.Module):
    """Takes the head's `norm_hidden` place. Given [final, tap 1, ...] it mixes them
    (each tap RMS-normed first: the residual stream's scale grows with depth); given a
    state of one width (the head's own, at draft depth 2 and beyond) it is the old norm.
    With `on` False it uses the final state alone: the current recipe."""

    def __init__(self, norm_hidden: nn.Module, hidden: int, taps: int, eps: float, on: bool):
        super().__init__()
        self.norm_hidden, self.hidden, self.eps, self.on = norm_hidden, hidden, eps, on
        self.tap_norms = nn.ParameterList([nn.Parameter(torch.ones(hidden)) for _ in range(taps)])
        weight = torch.zeros(hidden, (1 + taps) * hidden)
        weight[:, :hidden] = torch.eye(hidden)
        # Small, not zero: a zero block would get no gradient through the product's input.
        noise = torch.randn(hidden, taps * hidden, generator=torch.Generator().manual_seed(0))
        weight[:, hidden:] = 0.01 * noise / hidden**0.5
        self.fuse = nn.Parameter(weight)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        h = self.hidden
        final = self.norm_hidden(states[..., :h])
        if states.shape[-1] == h or not self.on:
            return final
        taps = [
            F.rms_norm(states[..., (i + 1) * h : (i + 2) * h], (h,), w, self.eps)
            for i, w in enumerate(self.tap_norms)
        ]
        return F.linear(torch.cat([final, *taps], -1), self.fuse)


def collect_tapped(args: argparse.Namespace, splits: list[int]) -> None:
    prompts = read_prompts(Path(args.prompts))[: args.num_prompts]
    if args.written:
        prompts += json.loads(Path(args.written).read_text())["prompts"][: args.num_written]
    collect(
        TappedTrunk(splits, 32),
        prompts,
        Path(args.data),
        batch=32,
        max_new=128,
        sampled_share=0.3,  # train-mtp's defaults
        seed=0,
        quant="int4",
        progress=lambda b, n, rate: print(f"batch {b}/{n}: {rate}/s", file=sys.stderr, flush=True),
    )


def train(args: argparse.Namespace, splits: list[int]) -> None:
    torch.manual_seed(0)
    records = list(read_shards(Path(args.data)))
    trunk = TappedTrunk(splits, 16)
    cfg = trunk.cfg
    lm_name = fingerprint_names(cfg)[0]
    lm_weight = trunk.checkpoint.read([lm_name])[lm_name].float()
    shipped, _ = read_head_file(default_head_path(None))
    init = {k: v.float() if v.is_floating_point() else v for k, v in shipped.items()}
    head = build_trainable_head(cfg, init, lm_weight, lm_weight)
    head.norm_hidden = FusedHidden(
        head.norm_hidden, cfg.hidden_size, len(splits), cfg.rms_norm_eps, args.taps == "on"
    )
    settings = TrainSettings(steps=args.steps, lr=args.lr, seed=1, precision="bfloat16", warmup=20)
    started = time.perf_counter()
    final = train_head(
        head,
        records,
        settings,
        progress=lambda step, loss, agree, _eta: (
            print(f"step {step} loss {loss:.3f} top-1 {agree:.3f}", file=sys.stderr, flush=True)
            if step % 25 == 0
            else None
        ),
    )
    result = {"taps": args.taps, "split": splits, "steps": args.steps, "train": final}
    result["train_s"] = round(time.perf_counter() - started)
    for name, prompts in (("eval_prompts", eval_prompts_path()), ("held_out", args.held_out)):
        if prompts:
            report = evaluate_head(trunk, head, read_prompts(Path(prompts)), k=3)
            result[name] = {
                "acceptance_by_position": report["acceptance_by_position"],
                "tokens_per_step": report["tokens_per_step"],
            }
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["collect", "train"])
    ap.add_argument("--data", required=True, help="the tapped collection's folder")
    ap.add_argument("--split", default="5,15", help="tap the residual after these layers")
    ap.add_argument("--prompts", help="collect: prompts (.jsonl or lines)")
    ap.add_argument("--num-prompts", type=int, default=2400)
    ap.add_argument("--written", help="collect: a work dir's self-prompts.json")
    ap.add_argument("--num-written", type=int, default=800)
    ap.add_argument("--taps", choices=["off", "on"], default="on")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--held-out", help="train: a second held-out prompts file")
    args = ap.parse_args()
    splits = [int(x) for x in args.split.split(",")]
    (collect_tapped if args.phase == "collect" else train)(args, splits)


if __name__ == "__main__":
    main()
