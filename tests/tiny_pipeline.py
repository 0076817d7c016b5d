"""A pipeline of local CPU workers (one thread each) over a tiny test model."""

from __future__ import annotations

from pathlib import Path

from mtpd.daemon.pipeline import Pipeline, PipelineConfig


def start_pipeline(path: Path, num_layers: int, workers: int, **settings: object) -> Pipeline:
    """With the MTP head loaded, 4 sequences of 256 positions; `settings` override."""
    config = {
        "device": "cpu",
        "max_seqs": 4,
        "max_context": 256,
        "cache_memory": 64 << 20,
        "threads": 1,
        "load_mtp": True,
        **settings,
    }
    return Pipeline.start(
        PipelineConfig(model=str(path), num_layers=num_layers, workers=workers, **config)
    )
