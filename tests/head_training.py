"""What tests of MTP head training start from: a tiny random model's own continuations
of random prompts (40 sequences to train on, 8 held out) and fresh heads made from its
last layer, as `mtpd train-mtp` makes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mtpd.model.checkpoint import open_checkpoint
from mtpd.model.mtp import MTPHead
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.collect import Record, continue_prompts
from mtpd.train.engine import Engine
from mtpd.train.trainer import build_trainable_head, initial_head


@dataclass
class HeadData:
    engine: Engine
    train: list[Record]
    held_out: list[Record]
    trunk: dict[str, torch.Tensor]

    def fresh_head(self) -> MTPHead:
        embedding = self.trunk["model.embed_tokens.weight"]
        return build_trainable_head(
            self.engine.cfg,
            initial_head(self.trunk, self.engine.cfg),
            embedding,
            self.trunk.get("lm_head.weight", embedding),
        )


def head_training_data(model: Path) -> HeadData:
    engine = Engine.load(model, max_seqs=48, max_context=128)
    prompts = [
        torch.randint(3, 98, (6,), generator=torch.Generator().manual_seed(i)).tolist()
        for i in range(48)
    ]
    records = continue_prompts(
        engine, prompts, 40, [SamplingParams(temperature=0.8, seed=i) for i in range(48)]
    )
    checkpoint = open_checkpoint(model)
    trunk = {k: v.float() for k, v in checkpoint.read(checkpoint.tensor_names()).items()}
    return HeadData(engine, records[:40], records[40:], trunk)
