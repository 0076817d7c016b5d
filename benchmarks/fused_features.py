"""Does an MTP head draft better from several of the trunk's layers than from its last
alone? EAGLE-3's "fused features" (`mtpd train-mtp --taps`), measured side by side on
the default model at equal data and steps (docs/mtp-heads.md, "Fused trunk features").

`collect` continues prompts on the int4 trunk, tapped before the given layers: every
stored row is the final-normed state followed by the residual stream there
([L, (1 + taps) x H], bfloat16, `mtpd train-mtp`'s work-dir format). `train` goes on from
the shipped head (or --init-head) over that data, either from the final state alone
(`--arm final`: the recipe without taps, which ignores the extra columns) or from a
learned mix of all of them (`--arm fused`: `fuse` starts by passing the final state
through, so both arms start from the same head), then reports held-out acceptance as
`mtpd eval-mtp --quant int4` measures it.

    python benchmarks/fused_features.py collect --prompts P.jsonl --num-prompts 2400 \\
        --written SELF_PROMPTS.json --num-written 800 --data DIR [--taps 5,15]
    python benchmarks/fused_features.py train --data DIR --arm final|fused [--steps 400] \\
        [--held-out HELD_OUT.jsonl] [--taps 5,15] [--init-head HEAD]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mtpd.model.checkpoint import open_checkpoint
from mtpd.model.decoder import fingerprint_names
from mtpd.model.default_model import default_head_path
from mtpd.model.mtp import FUSE, read_head_file
from mtpd.train.collect import collect, read_shards
from mtpd.train.commands import eval_prompts_path
from mtpd.train.engine import Engine
from mtpd.train.evaluate import evaluate_head
from mtpd.train.sources import read_prompts
from mtpd.train.trainer import TrainSettings, build_trainable_head, fused_input, train_head


def tapped_trunk(taps: list[int], max_seqs: int) -> Engine:
    engine = Engine.load(max_seqs=max_seqs, max_context=512, quant="int4")
    engine.shard.set_taps(taps)
    return engine


def collect_tapped(args: argparse.Namespace, taps: list[int]) -> None:
    prompts = read_prompts(Path(args.prompts))[: args.num_prompts]
    if args.written:
        prompts += json.loads(Path(args.written).read_text())["prompts"][: args.num_written]
    collect(
        tapped_trunk(taps, 32),
        prompts,
        Path(args.data),
        batch=32,
        max_new=128,
        sampled_share=0.3,  # train-mtp's defaults
        seed=0,
        quant="int4",
        progress=lambda b, n, rate: print(f"batch {b}/{n}: {rate}/s", file=sys.stderr, flush=True),
    )


def train(args: argparse.Namespace, taps: list[int]) -> None:
    torch.manual_seed(0)
    records = list(read_shards(Path(args.data)))
    trunk = tapped_trunk(taps, 16)
    cfg = trunk.cfg
    lm_name = fingerprint_names(cfg)[0]
    lm_weight = open_checkpoint(trunk.model_path).read([lm_name])[lm_name].float()
    start, _ = read_head_file(Path(args.init_head) if args.init_head else default_head_path(None))
    init = {k: v.float() if v.is_floating_point() else v for k, v in start.items()}
    if args.arm == "final" and FUSE in init:
        sys.exit("--arm final goes on from a head without taps: give one as --init-head")
    if args.arm == "fused" and FUSE not in init:
        init |= fused_input(cfg, taps)
    head = build_trainable_head(cfg, init, lm_weight, lm_weight)
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
    result = {"arm": args.arm, "taps": taps, "steps": args.steps, "train": final}
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
    ap.add_argument("--taps", default="5,15", help="tap the residual stream before these layers")
    ap.add_argument("--prompts", help="collect: prompts (.jsonl or lines)")
    ap.add_argument("--num-prompts", type=int, default=2400)
    ap.add_argument("--written", help="collect: a work dir's self-prompts.json")
    ap.add_argument("--num-written", type=int, default=800)
    ap.add_argument("--arm", choices=["final", "fused"], default="fused")
    ap.add_argument("--init-head", help="train: the head both arms go on from (default: shipped)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--held-out", help="train: a second held-out prompts file")
    args = ap.parse_args()
    taps = [int(x) for x in args.taps.split(",")]
    (collect_tapped if args.phase == "collect" else train)(args, taps)


if __name__ == "__main__":
    main()
