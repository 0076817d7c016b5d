"""`mtpd train-mtp` / `mtpd eval-mtp` end to end on a tiny random model: a real learning
signal, a head file that round-trips, and a head refused by a model it was not made for."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.cli import main

TEMPLATE = "{% for m in messages %}> {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_tiny_model(d / "model", "llama", vocab=98, layers=2)
    write_char_tokenizer(d / "model", TEMPLATE)
    return d


def train(tiny, steps: int, out: str, capsys, *extra: str) -> dict:
    args = ["train-mtp", "--model", str(tiny / "model"), "--out", str(tiny / out), *extra]
    args += [
        "--work-dir",
        str(tiny / "work"),
        "--num-prompts",
        "96",
        "--self-prompts",
        "32",
        "--gen-tokens",
        "48",
        "--batch",
        "32",
    ]
    args += ["--steps", str(steps), "--draft-vocab", "0", "--seed", "1"]
    assert main(args) == 0
    capsys.readouterr()
    with safe_open(str(tiny / out), "pt") as f:
        return {k: v for k, v in f.metadata().items()}


def eval_json(tiny, head: str, capsys, model=None) -> dict:
    model = model or tiny / "model"
    assert main(["eval-mtp", "--model", str(model), "--head", str(tiny / head), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_training_raises_acceptance_and_the_file_round_trips(tiny, capsys):
    untrained = json.loads(train(tiny, 0, "untrained.safetensors", capsys)["acceptance"])
    meta = train(tiny, 300, "trained.safetensors", capsys)
    trained = json.loads(meta["acceptance"])
    first_before, first_after = (
        untrained["acceptance_by_position"][0],
        trained["acceptance_by_position"][0],
    )
    assert first_after > first_before + 0.2, (first_before, first_after)
    assert trained["tokens_per_step"] > untrained["tokens_per_step"]
    # The file, loaded the way serving loads it, behaves exactly as measured at save time.
    assert eval_json(tiny, "trained.safetensors", capsys) == trained
    assert meta["base_model_fingerprint"] and json.loads(meta["training"])["steps"] == 300


def test_head_refused_by_another_model(tiny, tmp_path, capsys):
    if not (tiny / "trained.safetensors").exists():
        train(tiny, 5, "trained.safetensors", capsys)
    other = tmp_path / "other"
    write_tiny_model(other, "llama", vocab=98, layers=2, seed=7)
    write_char_tokenizer(other, TEMPLATE)
    code = main(["eval-mtp", "--model", str(other), "--head", str(tiny / "trained.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "different base model" in err and "trained.safetensors" in err


def test_training_goes_on_from_a_trained_head(tiny, tmp_path, capsys):
    if not (tiny / "trained.safetensors").exists():
        train(tiny, 5, "trained.safetensors", capsys)
    start = str(tiny / "trained.safetensors")
    meta = train(tiny, 0, "continued.safetensors", capsys, "--init-head", start)
    with safe_open(start, "pt") as a, safe_open(str(tiny / "continued.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():  # noqa: SIM118
            assert a.get_tensor(name).equal(b.get_tensor(name)), name
        before = json.loads(a.metadata()["training"])
    assert json.loads(meta["training"])["init_head"] == {
        "file": "trained.safetensors",
        "training": before,
    }
    # A head made for another model is refused before any data is collected.
    other = tmp_path / "other"
    write_tiny_model(other, "llama", vocab=98, layers=2, seed=7)
    write_char_tokenizer(other, TEMPLATE)
    work = tmp_path / "work"
    args = ["train-mtp", "--model", str(other), "--out", str(tmp_path / "h.safetensors")]
    code = main([*args, "--init-head", start, "--work-dir", str(work)])
    assert code == 2 and "different base model" in capsys.readouterr().err
    assert not work.exists()


def test_training_stops_at_its_best_held_out_checkpoint(tiny, capsys):
    meta = train(tiny, 30, "early.safetensors", capsys, "--held-out-share", "0.1", "--no-eval")
    training = json.loads(meta["training"])
    assert training["best_step"] == 30  # scored every 100 steps and at the last
    assert 0 < training["held_out_score"] < 2  # drafts accepted a step at k = 2
    for bad in ("1", "-0.1"):
        args = ["train-mtp", "--out", str(tiny / "x.safetensors"), "--held-out-share", bad]
        assert main(args) == 2 and "--held-out-share must be in [0, 1)" in capsys.readouterr().err


def test_a_head_of_fused_features_trains_and_keeps_its_taps(tiny, tmp_path, capsys):
    """--taps: collected rows carry the tapped residual stream, the head file names its
    taps and, loaded the way serving loads it, drafts as measured at save time; a head
    goes on with its own taps only, and a work dir holds rows of one tap list."""
    work = tmp_path / "work"
    base = ["train-mtp", "--model", str(tiny / "model"), "--work-dir", str(work)]
    base += ["--num-prompts", "32", "--self-prompts", "0", "--gen-tokens", "24"]
    base += ["--steps", "20", "--draft-vocab", "0", "--seed", "1"]
    fused = tmp_path / "fused.safetensors"
    assert main([*base, "--out", str(fused), "--taps", "1"]) == 0
    capsys.readouterr()
    with safe_open(str(fused), "pt") as f:
        assert f.get_tensor("mtp.tap_layers").tolist() == [1]
        assert list(f.get_slice("mtp.fuse.weight").get_shape()) == [64, 128]
        meta = f.metadata()
    assert json.loads(meta["training"])["tap_layers"] == [1]
    assert eval_json(tmp_path, "fused.safetensors", capsys, tiny / "model") == json.loads(
        meta["acceptance"]
    )
    # Going on from it keeps its taps (and its fuse, at 0 steps, unchanged).
    continued = tmp_path / "continued.safetensors"
    assert main([*base, "--out", str(continued), "--init-head", str(fused), "--steps", "0"]) == 0
    with safe_open(str(fused), "pt") as a, safe_open(str(continued), "pt") as b:
        assert a.get_tensor("mtp.fuse.weight").equal(b.get_tensor("mtp.fuse.weight"))
        assert b.get_tensor("mtp.tap_layers").tolist() == [1]
    capsys.readouterr()
    out = ["--out", str(tmp_path / "x.safetensors")]
    assert main([*base, *out, "--init-head", str(fused), "--taps", ""]) == 2
    assert "a head cannot change its taps" in capsys.readouterr().err
    assert main([*base, *out]) == 2  # no taps, on rows collected with them
    assert "another trunk (quant none, taps [1])" in capsys.readouterr().err


def test_interrupted_training_resumes_to_the_same_head(tiny, tmp_path, capsys):
    import torch

    from mtpd.model.checkpoint import open_checkpoint, read_config
    from mtpd.model.decoder import fingerprint_names
    from mtpd.train.collect import read_shards
    from mtpd.train.trainer import (
        TrainSettings,
        build_trainable_head,
        head_tensors,
        initial_head,
        train_head,
    )

    if not (tiny / "work").exists():
        train(tiny, 0, "untrained.safetensors", capsys)
    records = list(read_shards(tiny / "work"))
    ckpt = open_checkpoint(tiny / "model")
    cfg = read_config(ckpt)
    trunk = {k: v.float() for k, v in ckpt.read(fingerprint_names(cfg)).items()}
    embedding = ckpt.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"].float()

    def fresh():
        return build_trainable_head(
            cfg, initial_head(trunk, cfg), embedding, trunk["lm_head.weight"]
        )

    settings = TrainSettings(steps=20, batch=4, checkpoint_every=10, seed=3)
    whole = fresh()
    train_head(whole, records, settings, state_file=tmp_path / "a.safetensors")

    class Interrupt(Exception):
        pass

    def stop_at_10(step, *_):
        if step == 10:
            raise Interrupt

    resumed = fresh()
    with pytest.raises(Interrupt):
        train_head(resumed, records, settings, tmp_path / "b.safetensors", progress=stop_at_10)
    steps_run: list[int] = []
    resumed = fresh()  # a new process: only the state file carries over
    train_head(
        resumed,
        records,
        settings,
        tmp_path / "b.safetensors",
        progress=lambda s, *_: steps_run.append(s),
    )
    assert steps_run == list(range(11, 21))
    a, b = head_tensors(whole), head_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corpus_files_plain_and_json(tmp_path):
    from mtpd.model.errors import ModelLoadError
    from mtpd.train.commands import read_corpus

    (tmp_path / "a.txt").write_text("In the beginning")
    (tmp_path / "b.json").write_text(
        json.dumps({"books": [{"name": "Ruth", "verses": ["one", "two"]}], "n": 3})
    )
    assert read_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.json")]) == [
        "In the beginning",
        "Ruth\none\ntwo",
    ]
    with pytest.raises(ModelLoadError, match=r"missing\.txt"):
        read_corpus([str(tmp_path / "missing.txt")])


def test_corpus_text_becomes_records(tiny):
    from mtpd.train.collect import read_corpus_records
    from mtpd.train.engine import Engine

    engine = Engine.load(tiny / "model", max_context=256)
    text = "In the beginning was the word. " * 12  # 372 characters, one token each
    records = read_corpus_records(engine, [text], chunk_tokens=100)
    # Chunks start every 100 tokens; each also carries the token after its last position.
    assert [len(r.argmax) for r in records] == [100, 100, 100, 71]
    assert records[1].tokens == engine.tokenizer.encode(text)[100:201]
    for r in records:
        assert len(r.tokens) == len(r.argmax) + 1 and r.hidden.shape == (len(r.argmax), 64)
    # The reading slot was released: the one-slot cache can take a new sequence.
    assert engine.cache.slot("next") == 0 and engine.cache.lengths[0] == 0


def test_the_model_writes_prompts(tiny, tmp_path):
    from mtpd.train.engine import Engine
    from mtpd.train.prompts import self_written_prompts

    engine = Engine.load(tiny / "model", max_seqs=8, max_context=256)
    cache = tmp_path / "written.json"
    prompts = self_written_prompts(engine, 12, cache, exclude=(), seed=3, batch=8)
    assert len(prompts) == 12 and len(set(prompts)) == 12 and all(p == p.strip() for p in prompts)
    # Written once: a rerun reads the file instead of sampling again.
    stamp = cache.stat().st_mtime_ns
    assert self_written_prompts(engine, 12, cache, exclude=(), seed=3, batch=8) == prompts
    assert cache.stat().st_mtime_ns == stamp
    # Deterministic by seed, and an excluded prompt (the evaluation set's) never appears.
    banned = prompts[4]
    again = self_written_prompts(
        engine, 12, tmp_path / "other.json", exclude=[f"  {banned.upper()} "], seed=3, batch=8
    )
    assert banned not in again and again[:4] == prompts[:4] and again[4:11] == prompts[5:]
    # An interrupted run resumes at the next row instead of sampling its rows again.
    partial = tmp_path / "partial.json"
    assert self_written_prompts(engine, 6, partial, exclude=(), seed=3, batch=8) == prompts[:6]
    assert json.loads(partial.read_text())["rows_sampled"] == 8
    assert self_written_prompts(engine, 12, partial, exclude=(), seed=3, batch=8) == prompts
    assert (
        json.loads(partial.read_text())["rows_sampled"]
        == json.loads(cache.read_text())["rows_sampled"]
    )


def test_the_model_writes_prompts_on_from_openers(tiny, tmp_path):
    from mtpd.train.engine import Engine
    from mtpd.train.prompts import self_written_prompts

    engine = Engine.load(tiny / "model", max_seqs=8, max_context=256)
    openers = ("Qx", "Zy w")
    opened = self_written_prompts(
        engine, 12, tmp_path / "o.json", exclude=(), seed=3, batch=8, openers=openers
    )
    assert len(opened) == 12 and len(set(opened)) == 12
    # Every prompt keeps its opening and goes on past it, and both openings are used.
    starts = [next(o for o in openers if p.startswith(o)) for p in opened]
    assert all(len(p) > len(o) for p, o in zip(opened, starts, strict=True))
    assert set(starts) == set(openers)
    # The model writes on from the opening: what follows it is not what the same seed
    # samples with no opening (a prefix pasted onto those would be).
    plain = self_written_prompts(engine, 12, tmp_path / "p.json", exclude=(), seed=3, batch=8)
    written = {p[len(o) :].strip() for p, o in zip(opened, starts, strict=True)}
    assert not written & set(plain)


def test_writing_prompts_needs_a_template_with_a_cue(tmp_path):
    from mtpd.model.errors import ModelLoadError
    from mtpd.train.engine import Engine
    from mtpd.train.prompts import self_written_prompts

    write_tiny_model(tmp_path / "m", "llama", vocab=98, layers=2)
    write_char_tokenizer(tmp_path / "m", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    engine = Engine.load(tmp_path / "m", max_context=128)
    with pytest.raises(ModelLoadError, match="--self-prompts 0"):
        self_written_prompts(engine, 4, tmp_path / "w.json", exclude=(), seed=0)
