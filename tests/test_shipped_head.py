"""The MTP head shipped for the default model: it binds to that model, stays small, and
drafts far better than chance on held-out prompts."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from mtpd.model.default_model import default_head_path
from mtpd.model.quant import Int8Linear
from mtpd.train.commands import eval_prompts_path, read_prompts
from mtpd.train.engine import Engine
from mtpd.train.evaluate import evaluate_head


def test_shipped_head_binds_to_the_default_model_and_drafts():
    path = default_head_path(None)
    assert path is not None and path.stat().st_size <= 16 * 2**20
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    recorded = json.loads(meta["acceptance"])
    engine = Engine.load(None, max_seqs=4, max_context=512, mtp_head=path)  # fingerprint checked
    assert engine.mtp is not None and engine.mtp.draft_ids is not None
    # Its linear layers, draft-vocabulary rows included, are held at int8 (quantize_head).
    rows = engine.mtp.draft_head
    assert isinstance(rows, Int8Linear) and rows.on_kernel
    assert rows.out_features == engine.mtp.draft_vocab_size
    assert rows.weight.dtype == torch.uint8  # one byte a weight, in the kernel's panels
    assert rows.weight.numel() == engine.mtp.draft_vocab_size * engine.cfg.hidden_size
    assert isinstance(engine.mtp.fc, Int8Linear)
    assert all(layer.kernel is not None for layer in engine.mtp.stack.layers)
    report = evaluate_head(
        engine, engine.mtp, read_prompts(eval_prompts_path())[:4], k=3, max_new=48
    )
    # An untrained head accepts about 1% of first drafts (PERFORMANCE-NOTES.md).
    assert report["acceptance_by_position"][0] > 0.25
    assert report["tokens_per_step"] > 1.2
    assert recorded["acceptance_by_position"][0] > 0.25
