"""Generate the Python gRPC stubs from protos/: `python protos/generate.py`.

The stubs land beside their .proto files (`protos/mtpd/v1/*_pb2*.py`), the folder that
pyproject.toml installs as the package `mtpd.v1`, so they import as
`mtpd.v1.worker_pb2`. tests/test_protos.py regenerates into a temporary directory and
fails when the committed stubs differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs under `out_dir` (its `mtpd/v1/...`); returns the files written."""
    files = [str(p.relative_to(PROTOS)) for p in proto_files()]
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
    args += [f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out_dir / "mtpd").rglob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate(PROTOS):
        print(path.relative_to(PROTOS.parent))
    sys.exit(0)
