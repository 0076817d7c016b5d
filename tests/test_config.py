"""`mtpd serve`'s configuration: a TOML file, MTPD_* variables over it, flags over
both; every value checked as its flag, errors naming the key."""

from __future__ import annotations

import pytest

from mtpd.cli import main


def write(tmp_path, text: str):
    path = tmp_path / "mtpd.toml"
    path.write_text(text)
    return path


def test_config_show_gives_each_value_and_its_source(tmp_path, capsys, monkeypatch):
    path = write(
        tmp_path, 'workers = 2\nmax_context = 1024\ncache_memory = "512M"\ndraft_tokens = 3\n'
    )
    monkeypatch.setenv("MTPD_WORKERS", "3")
    monkeypatch.setenv("MTPD_DEVICE", "cpu")
    assert main(["config", "show", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "workers = 3  # $MTPD_WORKERS" in lines
    assert f"max_context = 1024  # {path}" in lines
    assert f"cache_memory = {512 << 20}  # {path}" in lines
    assert f"draft_tokens = 3  # {path}" in lines
    assert 'device = "cpu"  # $MTPD_DEVICE' in lines
    assert "max_seqs = 16  # default" in lines


@pytest.mark.parametrize(("raw", "value"), [("false", "false"), ("0", "false"), ("on", "true")])
def test_a_switch_with_a_default_of_its_own_takes_true_and_false(
    tmp_path, capsys, monkeypatch, raw, value
):
    # --cuda-graphs / --no-cuda-graphs: unset means "where they apply".
    path = write(tmp_path, "cuda_graphs = true\n")
    assert main(["config", "show", "--config", str(path)]) == 0
    assert f"cuda_graphs = true  # {path}" in capsys.readouterr().out.splitlines()
    monkeypatch.setenv("MTPD_CUDA_GRAPHS", raw)
    assert main(["config", "show", "--config", str(path)]) == 0
    assert f"cuda_graphs = {value}  # $MTPD_CUDA_GRAPHS" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("bogus = 1", "unknown key 'bogus'"),
        ('workers = "two"', "workers"),
        ('device = "tpu"', "device"),
        ("max_request_bytes = -5", "max_request_bytes"),
        ("workers = [1, 2]", "workers"),
        ("workers = ", "not valid TOML"),
    ],
)
def test_bad_configuration_is_refused_naming_the_key(tmp_path, capsys, text, named):
    path = write(tmp_path, text + "\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and str(path) in err and "Traceback" not in err


def test_a_bad_environment_value_names_the_variable(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MTPD_MAX_CONTEXT", "lots")
    assert main(["config", "show", "--config", str(write(tmp_path, ""))]) == 2
    assert "$MTPD_MAX_CONTEXT" in capsys.readouterr().err


def test_flags_beat_the_environment_which_beats_the_file(tmp_path, capsys, monkeypatch):
    """Seen through the socket the daemon would claim: each layer names a regular file,
    which serve refuses by name before starting anything."""
    files = {name: tmp_path / name for name in ("from-file", "from-env", "from-flag")}
    for f in files.values():
        f.write_text("not a socket")
    path = write(tmp_path, f'socket = "{files["from-file"]}"\n')
    assert main(["serve", "--config", str(path)]) == 2
    assert "from-file: exists and is not a socket" in capsys.readouterr().err
    monkeypatch.setenv("MTPD_SOCKET", str(files["from-env"]))
    assert main(["serve", "--config", str(path)]) == 2
    assert "from-env: exists and is not a socket" in capsys.readouterr().err
    assert main(["serve", "--config", str(path), "--socket", str(files["from-flag"])]) == 2
    assert "from-flag: exists and is not a socket" in capsys.readouterr().err


def test_a_named_config_file_must_exist(tmp_path, capsys):
    assert main(["config", "show", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: no such configuration file" in capsys.readouterr().err
