"""`mtpd bench --peer llama-bench=PATH`: the command it runs and what it reads back. The
real program is built by hand (docs/bench.md) and is not part of the suite; a script
stands in for it here, printing what llama-bench's `-o json` prints (the fields read) and
writing down its arguments."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mtpd.bench.peers import LlamaBenchPeer, load_peer
from mtpd.model.errors import InputError


def _program(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "llama-bench"
    path.write_text(f"#!{sys.executable}\nimport json, sys\n{body}\n")
    path.chmod(0o755)
    return path


def test_it_runs_the_program_on_the_model_and_reads_its_rate(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    seen = tmp_path / "argv.json"
    program = _program(
        tmp_path,
        f"json.dump(sys.argv[1:], open({str(seen)!r}, 'w'))\n"
        "n = int(sys.argv[sys.argv.index('-n') + 1])\n"
        "print(json.dumps([{'n_prompt': 0, 'n_gen': n, 'avg_ts': 41.5 + n, 'samples_ts': [1]}]))",
    )
    peer = load_peer(f"llama-bench={program}", model, 3)
    assert isinstance(peer, LlamaBenchPeer) and peer.name == "llama-bench"
    assert peer.decode_rate([1, 2, 3], 64) == 105.5
    argv = json.loads(seen.read_text())
    pairs = dict(zip(argv[::2], argv[1::2], strict=True))
    assert pairs == {"-m": str(model), "-t": "3", "-p": "0", "-r": "1", "-o": "json", "-n": "64"}


@pytest.mark.parametrize(
    "body, said",
    [
        ("sys.stderr.write('error: failed to load model'); sys.exit(1)", "exited 1"),
        ("print('| model | size |')", "without a decode rate"),
        ("print(json.dumps([]))", "without a decode rate"),
        ("print(json.dumps([{'avg_ts': 0}]))", "without a decode rate"),
        ("print(json.dumps({'avg_ts': 5}))", "without a decode rate"),
    ],
)
def test_a_run_without_a_rate_is_an_error_that_says_so(tmp_path, body, said):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    peer = load_peer(f"llama-bench={_program(tmp_path, body)}", model, 2)
    with pytest.raises(InputError, match=said):
        peer.decode_rate([1], 8)


def test_a_missing_program_or_a_model_it_cannot_read_is_refused(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(InputError, match=r"no program .*--peer llama-bench=PATH"):
        load_peer(f"llama-bench={tmp_path / 'absent'}", model, 2)
    with pytest.raises(InputError, match="GGUF models only"):
        load_peer("llama-bench", tmp_path / "model.safetensors", 2)
    with pytest.raises(InputError, match="unknown peer 'llama'"):
        load_peer("llama", model, 2)
