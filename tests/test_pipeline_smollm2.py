"""The embedded SmolLM2 through 2 and 3 CPU workers, one per activation transport:
the same tokens and logits as the single-process engine."""

from __future__ import annotations

import pytest
import torch
from reference import GREEDY, smollm2_references

from mtpd.daemon.pipeline import Pipeline, PipelineConfig
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.compare import compare_tokens, logit_rows
from mtpd.model.default_model import default_model_path

QUESTIONS = ["Write a haiku about the sea.", "List three uses of copper."]
TOKENS = 64


@pytest.fixture(scope="module")
def references():
    return smollm2_references(QUESTIONS, TOKENS)


# Each transport on two worker counts here (one worker has no activations to move);
# tests/test_pipeline.py runs every pairing on tiny models.
@pytest.mark.parametrize(
    # The real model on one pairing per transport (the suite's time budget); tiny models
    # cover every worker count with both transports, and the MTP test runs 1 worker.
    ("workers", "transport"),
    [(2, "grpc"), (3, "dist")],
)
def test_smollm2_pipeline_equals_single_process(references, workers, transport):
    num_layers, runs = references
    cfg = PipelineConfig(
        model=str(default_model_path()),
        num_layers=num_layers,
        workers=workers,
        device="cpu",
        transport=transport,
        max_seqs=2,
        max_context=256,
        cache_memory=64 << 20,
        threads=1,
    )
    with Pipeline.start(cfg) as pipeline:
        scheduler = Scheduler(pipeline, eos_ids=set())
        requests = [
            scheduler.submit(p, GREEDY, TOKENS, ignore_eos=True, return_logits=True)
            for p, _, _ in runs
        ]
        results = [r.result(timeout=600) for r in requests]
        scheduler.close()
    for (_, ref_tokens, ref_logits), result in zip(runs, results, strict=True):
        agreement = compare_tokens(ref_tokens, ref_logits, result.token_ids)
        assert agreement.ok, str(agreement)
        upto = TOKENS if agreement.equal else agreement.diverged_at
        for ref, got in zip(ref_logits[:upto], logit_rows(result.logits[:upto]), strict=True):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
