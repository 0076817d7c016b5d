"""`--kv-cache int8` through a pipeline of workers: each worker holds its layers' keys and
values at 8 bits with a scale per 32 values (half float16's bytes and a little more),
and a request decodes, with MTP drafting and verification steps or without, exactly
what a plain single-process run over an int8 cache decodes one token at a time (the
cache's own closeness to float32 is tests/test_cpu_kernels.py's). The MTP head's cache
takes the trunk's type; where the kernels would not read the cache, it is refused with
an error line."""

from __future__ import annotations

import pytest
import torch
from live_daemon import CHAT_TEMPLATE
from reference import GREEDY, solo_run
from tiny_models import add_mtp_head, write_char_tokenizer, write_tiny_model
from tiny_pipeline import start_pipeline

from mtpd.cli import main
from mtpd.daemon.draft_policy import DraftPolicy
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.decoder import ShardSpec
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine
from mtpd.worker.shard_loading import load_shard

LAYERS, VOCAB, TOKENS, HEAD_DIM, CONTEXT = 4, 98, 24, 40, 256
PROMPT = [5, 17, 33, 2, 9, 60, 41, 70, 3, 3, 12]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv8") / "model"
    write_tiny_model(
        path, "llama", layers=LAYERS, vocab=VOCAB, head_dim=HEAD_DIM, intermediate_size=128
    )
    write_char_tokenizer(path)
    add_mtp_head(path)
    return path, Engine.load(path, max_context=CONTEXT, quant="int4", kv_cache="int8")


def test_the_heads_cache_takes_the_trunks_type(tiny):
    path, _ = tiny
    ckpt = open_checkpoint(path)
    cfg = read_config(ckpt)
    for kv_cache, dtype in (("int8", torch.int8), ("auto", torch.float16)):
        _, head = load_shard(
            ckpt,
            cfg,
            ShardSpec.whole(cfg),
            torch.float32,
            CONTEXT,
            torch.device("cpu"),
            checkpoint_mtp=True,
            quant="int4",
            kv_cache=kv_cache,
        )
        assert head.new_cache(1).k.dtype == dtype


@pytest.mark.parametrize(
    ("draft", "params"),
    [(0, GREEDY), (3, GREEDY), (2, SamplingParams(temperature=0.9, top_p=0.95, seed=3))],
    ids=["off-greedy", "k3-greedy", "k2-sampled"],
)
def test_an_int8_cache_decodes_what_a_plain_run_over_one_does(tiny, draft, params):
    path, engine = tiny
    assert engine.cache.k.dtype == engine.cache.v.dtype == torch.int8
    tokens, _ = solo_run(engine, PROMPT, TOKENS, params)
    with start_pipeline(
        path, LAYERS, 2, quant="int4", kv_cache="int8", max_context=CONTEXT
    ) as pipeline:
        cfg = engine.cfg
        # Each vector: 40 values at a byte, and two float32 scales (32 values, then 8).
        vector_bytes = HEAD_DIM + 2 * 4
        for stage in pipeline.stages:
            layers = stage.end_layer - stage.first_layer
            vectors = 2 * layers * cfg.num_kv_heads * stage.load.max_context
            assert stage.load.cache_bytes == stage.load.max_seqs * vectors * vector_bytes
        scheduler = Scheduler(pipeline, set(), policy=DraftPolicy(draft))
        result = scheduler.submit(PROMPT, params, TOKENS, ignore_eos=True).result(timeout=120)
        assert result.finish_reason == "length", result.error
        assert result.token_ids == tokens
        if draft:
            assert result.drafts.drafted
        scheduler.close()


def test_a_cache_the_kernels_would_not_read_is_refused_with_a_clear_error(tmp_path, capsys):
    """Before any worker starts where the flags say it (a bfloat16 model), and as the
    worker's load error where only the model does (Qwen3.5's linear-attention layers run
    outside the kernels): an error line, no traceback."""
    write_tiny_model(tmp_path, "qwen3_5", layers=2, vocab=VOCAB)
    write_char_tokenizer(tmp_path, CHAT_TEMPLATE)
    run = ["run", "hi", "--model", str(tmp_path), "--device", "cpu", "--threads", "1"]
    assert main([*run, "--kv-cache", "int8", "--dtype", "bfloat16"]) == 2
    assert "--kv-cache int8 needs the CPU kernels" in capsys.readouterr().err
    assert main([*run, "--kv-cache", "int8", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mtpd: error: worker 0 failed to load") and "Traceback" not in err
    assert "--kv-cache int8 needs the CPU kernels to run every layer" in err
