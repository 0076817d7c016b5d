"""A bad pipeline configuration fails at start with a message naming the problem, and
a worker that dies mid-request (with restarts off) is noticed (the request ends with
an error), not waited on forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from reference import GREEDY
from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.daemon.pipeline import Pipeline, PipelineConfig
from mtpd.daemon.request import RequestFailed
from mtpd.daemon.scheduler import Scheduler

LAYERS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad-config") / "model"
    write_tiny_model(path, "llama", layers=LAYERS, vocab=98)
    write_char_tokenizer(path)
    return path


def run_fails(tiny, *flags: str) -> str:
    cmd = [sys.executable, "-m", "mtpd", "run", "hello", "--raw", "--model", str(tiny), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    return out.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "cpu", "--workers", "4"], "4 workers for a model of 3 layers"),
        (["--device", "cpu", "--workers", "0"], "--workers must be >= 1"),
        (["--device", "cpu", "--workers", "2", "--split", "1,1"], "sums to 2, but the model has 3"),
        (["--device", "cpu", "--workers", "2", "--split", "1,1,1"], "names 3 stages"),
        (["--device", "cuda"], "this machine has 0 GPU(s)"),
        (["--device", "cpu", "--cache-memory", "1K"], "cannot hold one sequence"),
        (["--join-listen", "127.0.0.1:1"], "need a --token-file"),
    ],
)
def test_bad_configuration_is_refused_by_name(tiny, flags, message):
    assert message in run_fails(tiny, *flags)


@pytest.mark.parametrize(
    ("device", "nodes", "expected"),
    [
        (None, False, ["cpu"]),  # no GPU device nodes: no GPU, without asking torch
        (None, True, ["cuda:0", "cuda:1"]),
        ("cuda", False, ["cuda:0", "cuda:1"]),  # asked for, torch is asked anyway
        ("cpu", True, ["cpu"]),
    ],
)
def test_gpus_are_counted_where_device_nodes_say_there_may_be_some(
    monkeypatch, tmp_path, device, nodes, expected
):
    import torch

    from mtpd.daemon import launch

    (tmp_path / "nvidia0").touch()
    pattern = str(tmp_path / ("nvidia*" if nodes else "absent*"))
    monkeypatch.setattr(launch, "_GPU_DEVICE_NODES", (pattern,))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert launch._resolve_devices(device, None, "dist") == expected


def test_worker_on_a_missing_device_refuses_to_start():
    cmd = [sys.executable, "-m", "mtpd", "worker", "--listen", "unix:/tmp/x", "--device", "cuda:3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "device 'cuda:3' does not exist" in out.stderr


@pytest.mark.parametrize("victim", [0, 1])
def test_a_dead_worker_is_noticed_not_waited_on(tiny, victim):
    cfg = PipelineConfig(
        model=str(tiny),
        num_layers=LAYERS,
        workers=2,
        device="cpu",
        max_seqs=2,
        max_context=512,
        cache_memory=32 << 20,
        threads=1,
        recv_timeout_s=30,
        max_restarts=0,  # no supervision here: tests/test_supervision.py has it
    )
    with Pipeline.start(cfg) as pipeline:
        scheduler = Scheduler(pipeline, eos_ids=set())
        request = scheduler.submit([5, 6, 7], GREEDY, 400, ignore_eos=True)
        tokens = iter(request)
        next(tokens)
        os.kill(pipeline.stages[victim].pid, signal.SIGKILL)
        with pytest.raises(RequestFailed, match="worker"):
            list(tokens)
        result = request.result(timeout=1)
        assert result.finish_reason == "error"
        assert 0 < len(result.token_ids) < 400
        # Later requests are refused at once rather than hanging.
        late = scheduler.submit([5], GREEDY, 4, ignore_eos=True)
        assert late.result(timeout=30).finish_reason == "error"
        scheduler.close()
