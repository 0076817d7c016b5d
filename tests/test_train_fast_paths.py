"""The fast ways of `mtpd train-mtp` on a CPU: collection on a quantized trunk
(--collect-quant) and training in bfloat16 (--precision), each checked against the
float32 way it replaces, on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from head_training import head_training_data
from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.cli import main
from mtpd.train.collect import collect, read_shards
from mtpd.train.engine import Engine
from mtpd.train.trainer import (
    IGNORE,
    TrainSettings,
    _batch,
    train_head,
    training_precision,
)

TEMPLATE = "{% for m in messages %}> {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast") / "model"
    write_tiny_model(d, "llama", vocab=98, layers=2)
    write_char_tokenizer(d, TEMPLATE)
    return d


def teacher_forced(engine: Engine, tokens: list[int]) -> torch.Tensor:
    """The trunk's final-normed states over `tokens` in one prefill."""
    slot = engine.cache.slot("tf")
    try:
        with torch.inference_mode():
            return engine.shard(torch.tensor(tokens), engine.cache, [slot], [len(tokens)])
    finally:
        engine.release("tf")


def test_train_mtp_collects_on_the_int4_trunk_and_keeps_its_work_dir_to_it(model, tmp_path, capsys):
    prompts = ["tell me about rivers", "count to five", "a story of a fox", "why is sky blue"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    work = tmp_path / "work"

    def train_mtp(quant: str) -> int:
        args = ["train-mtp", "--model", str(model), "--out", str(tmp_path / "h.safetensors")]
        args += ["--prompts", str(tmp_path / "prompts.txt"), "--num-prompts", "4"]
        args += ["--self-prompts", "0", "--gen-tokens", "24", "--batch", "4", "--steps", "0"]
        args += ["--draft-vocab", "0", "--no-eval", "--sampled-share", "0"]
        return main([*args, "--work-dir", str(work), "--collect-quant", quant])

    assert train_mtp("int4") == 0
    records = list(read_shards(work))
    assert len(records) == 4
    int4 = Engine.load(model, max_seqs=1, max_context=128, quant="int4")
    plain = Engine.load(model, max_seqs=1, max_context=128)
    for r in records:
        inputs = r.tokens[: len(r.argmax)]
        quantized, exact = teacher_forced(int4, inputs), teacher_forced(plain, inputs)
        stored = r.hidden.float()
        # The stored states are the int4 trunk's (to its bfloat16 rounding), measurably
        # not the float32 trunk's.
        to_int4 = (stored - quantized.to(torch.bfloat16).float()).abs().max()
        to_float32 = (stored - exact.to(torch.bfloat16).float()).abs().max()
        assert to_int4 < 0.05 * to_float32, (float(to_int4), float(to_float32))
        # And the targets are the int4 trunk's argmax (its logits from those states).
        with torch.inference_mode():
            want = int4.shard.logits(quantized).argmax(-1).tolist()
        assert sum(a == b for a, b in zip(r.argmax, want, strict=True)) >= 0.95 * len(want)
    # eval-mtp measures the head on the trunk it is served with.
    capsys.readouterr()
    head = ["--model", str(model), "--head", str(tmp_path / "h.safetensors"), "--json"]
    for quant in ("int4", "none"):
        assert main(["eval-mtp", *head, "--quant", quant, "--max-tokens", "16"]) == 0
        assert json.loads(capsys.readouterr().out)["positions"] > 0
    # Going on with a float32 trunk would mix two trunks' states: refused, naming why.
    assert train_mtp("none") != 0
    assert "quant int4" in capsys.readouterr().err


def test_prompts_appended_after_a_short_last_batch_are_all_collected(model, tmp_path):
    engine = Engine.load(model, max_seqs=4, max_context=128)
    prompts = ["tell me about rivers", "count to five", "a fox", "sky", "why", "how", "ok"]

    def collect_first(n: int) -> None:
        collect(engine, prompts[:n], tmp_path, batch=4, max_new=4, sampled_share=0, seed=0)

    collect_first(5)  # a batch of 4, then a short one of 1
    collect_first(7)  # two appended: they go after the short batch, not in a batch of its own
    records = list(read_shards(tmp_path))
    tok = engine.tokenizer
    assert len(records) == 7
    for prompt, record in zip(prompts, records, strict=True):
        want = tok.encode(tok.render_chat([{"role": "user", "content": prompt}]))
        assert record.tokens[: len(want)] == want


def held_out_agreement(head, records) -> float:
    """Depth 1's top-1 agreement with the model's argmax on held-out records."""
    hidden, toks, target, _ = _batch(records, list(range(len(records))), 1, 256)
    with torch.no_grad():
        logits = head.draft_logits(head.forward_causal(hidden, toks[:, : hidden.shape[1]]))
    valid = target != IGNORE
    return float((logits.argmax(-1)[valid] == target[valid]).float().mean())


def test_bfloat16_training_learns_as_float32_training_does(model):
    data = head_training_data(model)
    untrained = held_out_agreement(data.fresh_head(), data.held_out)
    heads, agreement = {}, {}
    for precision in ("float32", "bfloat16"):
        heads[precision] = data.fresh_head()
        train_head(
            heads[precision],
            data.train,
            TrainSettings(steps=80, batch=8, seed=3, precision=precision),
        )
        agreement[precision] = held_out_agreement(heads[precision], data.held_out)
    # The products really ran in bfloat16: the same steps from the same start end elsewhere.
    assert not torch.equal(heads["float32"].fc.weight, heads["bfloat16"].fc.weight)
    # Both learn, and bfloat16 as well as float32 (measured: the same to within 0.01).
    assert agreement["float32"] > untrained + 0.2, (untrained, agreement)
    assert agreement["bfloat16"] > agreement["float32"] - 0.04, agreement


def test_auto_precision_is_bfloat16_on_a_gpu_and_a_choice_stays_as_given():
    assert training_precision("auto", torch.device("cuda")) == "bfloat16"
    for choice in ("float32", "bfloat16"):
        assert training_precision(choice, torch.device("cpu")) == choice
