"""SmolLM2 with the shipped MTP head through 1-3 CPU workers: for every draft length and
the adaptive policy, greedy output equals plain decoding, and the head's drafts are
really accepted."""

from __future__ import annotations

import pytest
from reference import GREEDY, smollm2_references

from mtpd.daemon.draft_policy import AUTO, DraftPolicy
from mtpd.daemon.pipeline import Pipeline, PipelineConfig
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.compare import compare_tokens
from mtpd.model.default_model import default_head_path, default_model_path

QUESTIONS = [
    "Write a haiku about the sea.",
    "List three uses of copper.",
    "Explain in two sentences why the sky is blue.",
]
TOKENS = 40


@pytest.fixture(scope="module")
def references():
    return smollm2_references(QUESTIONS, TOKENS)


# Every draft length runs once on the real model (each on a different worker count, to
# keep the suite short), the adaptive policy on all; tiny models cover every pairing.
@pytest.mark.parametrize(
    # Draft lengths 5 and 6 and the 2-worker split run on tiny models (the time budget).
    ("workers", "settings"),
    [(1, [1, 3, AUTO]), (3, [2, 4, AUTO])],
)
def test_smollm2_mtp_equals_plain_decoding(references, workers, settings):
    num_layers, runs = references
    cfg = PipelineConfig(
        model=str(default_model_path()),
        num_layers=num_layers,
        workers=workers,
        device="cpu",
        max_seqs=3,
        max_context=256,
        cache_memory=64 << 20,
        threads=1,
        load_mtp=True,
        mtp_head=str(default_head_path(None)),
    )
    accepted = 0
    with Pipeline.start(cfg) as pipeline:
        assert pipeline.mtp_head.endswith(".mtp.safetensors")
        for setting in settings:
            scheduler = Scheduler(pipeline, eos_ids=set(), policy=DraftPolicy(setting))
            requests = [scheduler.submit(p, GREEDY, TOKENS, ignore_eos=True) for p, _, _ in runs]
            results = [r.result(timeout=600) for r in requests]
            scheduler.close()
            for (_, ref_tokens, ref_logits), result in zip(runs, results, strict=True):
                agreement = compare_tokens(ref_tokens, ref_logits, result.token_ids)
                assert agreement.ok, f"k={setting}: {agreement}"
                accepted += sum(result.drafts.accepted)
    assert accepted > 0, "the shipped head's drafts were never accepted"
