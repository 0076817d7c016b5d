"""The committed gRPC stubs are what `python protos/generate.py` makes from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PROTOS = Path(__file__).resolve().parent.parent / "protos"


def test_generated_stubs_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", PROTOS / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc produced no stubs"
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = PROTOS / rel
        assert committed.exists(), f"{rel} is not committed: run python protos/generate.py"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{rel} is stale: run python protos/generate.py"
        )
    committed_stubs = {p.relative_to(PROTOS) for p in (PROTOS / "mtpd").rglob("*_pb2*.py*")}
    assert committed_stubs == {p.relative_to(tmp_path) for p in fresh}, "stubs without a .proto"
