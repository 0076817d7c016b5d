"""Bad model files give one clear line naming the file or tensor, exit code 2, no traceback."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.cli import main


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    write_tiny_model(d, "llama", vocab=128)
    write_char_tokenizer(d)
    return d


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", "hello", "--max-tokens", "2", "--raw", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_tiny_model_runs(capsys, model_dir):
    code, _ = run_cli(capsys, "--model", str(model_dir))
    assert code == 0


def test_missing_path(capsys, tmp_path):
    code, err = run_cli(capsys, "--model", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err and "no such file" in err


def test_truncated_safetensors(capsys, model_dir):
    file = model_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    code, err = run_cli(capsys, "--model", str(model_dir))
    assert code == 2 and "model.safetensors" in err


def test_unknown_architecture(capsys, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, "--model", str(model_dir))
    assert code == 2 and "config.json" in err and "mamba" in err


def test_tensor_of_wrong_shape(capsys, model_dir):
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = torch.zeros(7, 64)
    save_file(tensors, file, metadata={"format": "pt"})
    code, err = run_cli(capsys, "--model", str(model_dir))
    assert code == 2 and name in err and "[7, 64]" in err


def test_missing_tensor(capsys, model_dir):
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    code, err = run_cli(capsys, "--model", str(model_dir))
    assert code == 2 and "model.norm.weight" in err


def test_gguf_of_unsupported_architecture(capsys, tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, err = run_cli(capsys, "--model", str(path))
    assert code == 2 and "mamba.gguf" in err and "mamba" in err


def test_not_a_model_file(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    code, err = run_cli(capsys, "--model", str(path))
    assert code == 2 and "notes.txt" in err


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "0", "top_p"),
        ("--max-tokens", "0", "max_tokens"),
    ],
)
def test_bad_generation_flags(capsys, model_dir, flag, value, named):
    code, err = run_cli(capsys, "--model", str(model_dir), flag, value)
    assert code == 2 and named in err


UNIMPLEMENTED = [
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "'fp8'"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "'awq'"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "'gptq'"),
    ({"layer_scale": 0.5}, "layer_scale=0.5"),
    ({"num_nextn_predict_layers": 3}, "num_nextn_predict_layers=3"),
    ({"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
]


@pytest.mark.parametrize(("keys", "named"), UNIMPLEMENTED, ids=[str(k) for k, _ in UNIMPLEMENTED])
def test_a_config_mtpd_does_not_implement_is_refused_naming_the_key(capsys, model_dir, keys, named):
    """Never run with pre-quantized scales or an unknown change to the arithmetic ignored."""
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, **keys}))
    code, err = run_cli(capsys, "--model", str(model_dir))
    assert code == 2 and "config.json" in err and named in err and "not implemented" in err


def test_neutral_values_of_those_keys_still_load(capsys, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    neutral = {"quantization_config": None, "layer_scale": 1.0, "use_sliding_window": False}
    (model_dir / "config.json").write_text(json.dumps({**cfg, **neutral, "hidden_act": "silu"}))
    code, _ = run_cli(capsys, "--model", str(model_dir))
    assert code == 0
