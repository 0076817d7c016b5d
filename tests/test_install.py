"""mtpd runs as installed, wherever it is started from: no folder of the clone shadows the
package, and a worker does not depend on the caller's working directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from live_daemon import LiveDaemon
from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.client import Client
from mtpd.model.compare import compare_tokens

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("cli", "v1.worker_pb2", "daemon.coordinator", "worker.server", "model.decoder")
SUBPACKAGES += ("client", "train.commands", "bench.commands")


def test_no_folder_of_the_clone_shadows_the_package():
    """`python -c` (like `python -m`) puts the working directory first on sys.path: from
    the clone's root every part of the package must still import, and from the install."""
    assert not {"mtpd", "mtpd.py"} & {p.name for p in REPO.iterdir()}
    probe = "import importlib, mtpd\n"
    probe += "".join(f"importlib.import_module('mtpd.{name}')\n" for name in SUBPACKAGES)
    probe += "print(mtpd.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    # The same package this test process imported (the installed one, or the editable
    # mapping of a development install), not a folder that happens to be in the cwd.
    import mtpd

    assert Path(out.stdout.strip()) == Path(mtpd.__file__)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("install") / "model"
    model = write_tiny_model(path, "llama", layers=2, vocab=98)
    write_char_tokenizer(path)
    return path, model


def test_workers_start_whatever_the_callers_directory_holds(tiny, tmp_path):
    """Started from a directory with a broken `mtpd` package in it, `mtpd run` (the
    installed script) and the worker processes it starts still import the installed
    package, and the answer is the reference's."""
    path, model = tiny
    decoy = tmp_path / "mtpd"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit('imported the decoy mtpd package')\n")
    (decoy / "__main__.py").write_text("raise SystemExit('ran the decoy mtpd package')\n")
    script = Path(sys.executable).with_name("mtpd")
    assert script.exists(), "the mtpd command is not installed beside this Python"
    cmd = [str(script), "run", "hello", "--raw", "--json", "--model", str(path)]
    cmd += ["--max-tokens", "6", "--device", "cpu", "--workers", "2", "--threads", "1"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "decoy" not in out.stderr
    result = json.loads(out.stdout)

    from mtpd.model.checkpoint import open_checkpoint, read_config
    from mtpd.model.tokenizer import Tokenizer

    ckpt = open_checkpoint(path)
    prompt = Tokenizer.from_checkpoint(ckpt, read_config(ckpt)).encode("hello")
    ids, logits_seen = list(prompt), []
    with torch.inference_mode():
        for _ in range(6):
            logits = model(torch.tensor([ids])).logits[0, -1]
            logits_seen.append(logits)
            ids.append(int(logits.argmax()))
    assert 2 not in ids[len(prompt) :], "the reference stops early: choose another prompt"
    agreement = compare_tokens(ids[len(prompt) :], logits_seen, result["token_ids"])
    assert agreement.ok, agreement


def test_the_daemon_never_imports_torch(tiny, tmp_path):
    """The daemon holds no model tensors, so it imports no torch (a worker's business):
    `mtpd run`, the daemon in the caller's process, serves a request with torch never in
    its modules; `mtpd serve` maps no torch library while it serves one."""
    path, _ = tiny
    probe = f"""
import sys
from mtpd.cli import main
flags = ["--max-tokens", "2", "--device", "cpu", "--workers", "2", "--json"]
assert main(["run", "hi", "--raw", "--model", {str(path)!r}, *flags]) == 0
print("torch imported:", "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("torch imported: False"), out.stdout
    with LiveDaemon(path, tmp_path) as daemon, Client(daemon.address, timeout=60) as client:
        assert client.generate("hi", max_tokens=2).completion_tokens == 2
        maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps
