"""The CUDA path, on one GPU (`benchmarks/gpu_check.sh` runs these with `-m cuda`; the
CPU suite deselects them). One GPU cannot host two NCCL ranks, so the two-worker test
relays activations as bytes (`--transport grpc`); the NCCL calls are the same
torch.distributed point-to-point the CPU tests run over gloo."""

from __future__ import annotations

import json

import pytest
import torch
from reference import solo_run
from tiny_models import add_mtp_head, write_char_tokenizer, write_tiny_model

from mtpd.cli import main
from mtpd.daemon.draft_policy import AUTO, DraftPolicy
from mtpd.daemon.pipeline import Pipeline, PipelineConfig
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.compare import compare_tokens
from mtpd.model.quant import Int4Linear, Int4Weight, Int8Linear
from mtpd.model.sampling import select_tokens
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine
from mtpd.worker.cuda_graphs import StepGraphs

pytestmark = pytest.mark.cuda

PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.fail("the CUDA tests need a GPU (run them with benchmarks/gpu_check.sh)")
    path = tmp_path_factory.mktemp("cuda") / "model"
    write_tiny_model(path, "qwen3", layers=4, vocab=96)
    write_char_tokenizer(path)
    add_mtp_head(path)
    return path


def assert_generates(pipeline: Pipeline, expected: list[int], logits: torch.Tensor) -> None:
    """The pipeline's greedy tokens equal the engine's at MTP off, 3 drafts and auto."""
    for setting in (0, 3, AUTO):
        scheduler = Scheduler(pipeline, eos_ids=set(), policy=DraftPolicy(setting))
        request = scheduler.submit(PROMPT, SamplingParams(), 24, ignore_eos=True)
        result = request.result(300)
        scheduler.close()
        assert compare_tokens(expected, logits, result.token_ids).ok, setting


def test_the_engine_on_cuda_gives_the_cpu_logits(tiny):
    cpu = Engine.load(tiny, max_context=128).forward("s", 0, PROMPT, all_logits=True)
    gpu = Engine.load(tiny, max_context=128, device="cuda").forward("s", 0, PROMPT, all_logits=True)
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)
    half = Engine.load(tiny, max_context=128, device="cuda", dtype=torch.bfloat16)
    logits = half.forward("s", 0, PROMPT, all_logits=True)
    assert (logits.argmax(-1) == cpu.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_packed_layers_on_cuda(quant):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(256, 512, generator=g), torch.randn(5, 512, generator=g)
    if quant == "int4":
        q = Int4Weight.from_float(w)
        layer, dense = Int4Linear(q.to(torch.device("cuda")), None, torch.bfloat16), q.dequantize()
    else:
        layer = Int8Linear(w.cuda().bfloat16(), None)
        dense = layer.weight.float().cpu() * layer.scales.float().cpu()[:, None]
    y = layer(x.cuda().bfloat16()).float().cpu()
    # Against the product of what the kernel is given, bf16-rounded. The kernels round
    # again (int4 dequantizes in bf16), which moves a sum of 512 unit products by about
    # sqrt(512) * 2**-8 = 0.09: an H200 run was off by 0.12 (int8) and 0.24 (int4) near
    # zero against float32 inputs and an absolute tolerance of 0.1. A wrong layout is off
    # by the outputs' own scale (~20).
    want = x.bfloat16().float() @ dense.bfloat16().float().t()
    torch.testing.assert_close(y, want, atol=4 * 512**0.5 * 2**-8, rtol=0.05)


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_two_workers_on_one_gpu_with_mtp_equal_the_engine(tiny, quant):
    engine = Engine.load(tiny, max_context=128, device="cuda", quant=quant)
    expected, logits = solo_run(engine, PROMPT, 24)
    pipeline = Pipeline.start(
        PipelineConfig(
            model=str(tiny),
            num_layers=4,
            workers=2,
            device="cuda",
            transport="grpc",
            max_seqs=2,
            max_context=128,
            cache_memory=16 << 20,
            load_mtp=True,
            quant=quant,
        )
    )
    with pipeline:
        assert_generates(pipeline, expected, logits)
    assert [s.device for s in pipeline.stages] == ["cuda:0", "cuda:0"]


def test_steps_replayed_as_cuda_graphs_give_the_eager_logits(tiny):
    engine = Engine.load(tiny, max_context=128, device="cuda")
    shard = engine.shard
    eager, graphed = (shard.new_cache(4, 128, scratch_slot=True) for _ in range(2))
    steps = StepGraphs(shard, graphed)
    g = torch.Generator().manual_seed(0)
    slots = [eager.slot(str(i)) for i in range(3)]
    assert slots == [graphed.slot(str(i)) for i in range(3)]
    with torch.inference_mode():
        for slot in slots:
            prompt = torch.randint(0, 96, (5 + 7 * slot,), generator=g).cuda()
            for cache in (eager, graphed):
                shard(prompt, cache, [slot], [len(prompt)])
        for round_ in range(8):  # decoding, verification, rejected drafts
            counts = [1 + (round_ + i) % 4 for i in range(3)]
            x = torch.randint(0, 96, (sum(counts),), generator=g).cuda()
            want = shard.logits(shard(x, eager, slots, counts))
            got = shard.logits(steps.run(x, slots, counts))
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            for cache in (eager, graphed):
                for slot, count in zip(slots, counts, strict=True):
                    cache.truncate(slot, cache.lengths[slot] - (count - 1) // 2)
    assert all(b.graph is not None for b in steps.buckets.values())


def test_a_pipeline_with_cuda_graphs_equals_the_engine(tiny):
    engine = Engine.load(tiny, max_context=128, device="cuda")
    expected, logits = solo_run(engine, PROMPT, 24)
    config = PipelineConfig(
        model=str(tiny),
        num_layers=4,
        workers=1,
        device="cuda",
        max_seqs=2,
        max_context=128,
        cache_memory=16 << 20,
        load_mtp=True,
        cuda_graphs=True,
    )
    with Pipeline.start(config) as pipeline:
        assert_generates(pipeline, expected, logits)


def test_a_batch_is_sampled_on_cuda_as_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=g) * 2
    params = [
        SamplingParams(temperature=0.8 + (i % 3) * 0.2, top_p=0.95 if i % 2 else 1.0, seed=i)
        for i in range(64)
    ]
    params[5] = SamplingParams(repetition_penalty=1.3)
    histories = [torch.randint(0, 500, (9,), generator=g) for _ in params]
    positions = list(range(100, 164))
    cpu = select_tokens(logits, params, positions, histories)
    assert select_tokens(logits.cuda(), params, positions, histories) == cpu


def test_train_mtp_on_cuda_learns(tmp_path, capsys):
    # The whole train-mtp path on the GPU: the model writing prompts, sampled and greedy
    # continuations, training; the head it writes is measured on the CPU, as served.
    write_tiny_model(tmp_path / "model", "llama", vocab=98, layers=2)
    write_char_tokenizer(
        tmp_path / "model", "{% for m in messages %}> {{ m['content'] }}\n{% endfor %}"
    )
    accepted = []
    for steps in (0, 300):
        out = tmp_path / f"head-{steps}.safetensors"
        args = ["train-mtp", "--model", str(tmp_path / "model"), "--out", str(out)]
        args += ["--device", "cuda", "--work-dir", str(tmp_path / "work"), "--seed", "1"]
        args += ["--num-prompts", "96", "--self-prompts", "32", "--gen-tokens", "48"]
        args += ["--batch", "32", "--steps", str(steps), "--draft-vocab", "0"]
        assert main(args) == 0
        capsys.readouterr()
        assert (
            main(["eval-mtp", "--model", str(tmp_path / "model"), "--head", str(out), "--json"])
            == 0
        )
        accepted.append(json.loads(capsys.readouterr().out)["acceptance_by_position"][0])
    assert accepted[1] > accepted[0] + 0.2, accepted
