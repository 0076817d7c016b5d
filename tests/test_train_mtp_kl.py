"""Distilling the whole distribution (--distill kl) also teaches the head."""

from __future__ import annotations

import json

from safetensors import safe_open
from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.cli import main


def test_kl_distillation_learns(tmp_path, capsys):
    write_tiny_model(tmp_path / "model", "llama", vocab=98, layers=2)
    write_char_tokenizer(
        tmp_path / "model", "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    )
    reports = {}
    for steps in (0, 200):
        out = tmp_path / f"head-{steps}.safetensors"
        args = [
            "train-mtp",
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(out),
            "--distill",
            "kl",
        ]
        args += ["--work-dir", str(tmp_path / "work"), "--num-prompts", "64", "--gen-tokens", "48"]
        args += ["--steps", str(steps), "--draft-vocab", "0", "--seed", "2"]
        assert main(args) == 0
        capsys.readouterr()
        with safe_open(str(out), "pt") as f:
            reports[steps] = json.loads(f.metadata()["acceptance"])
    assert reports[200]["acceptance_by_position"][0] > reports[0]["acceptance_by_position"][0] + 0.2
