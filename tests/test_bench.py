"""`mtpd bench` end to end on a tiny model with 2 CPU workers and int4 weights: every
configuration runs, the report has the documented fields with values that follow from
the run, greedy outputs agree across configurations, the quantized model is compared
with its float self, the peer runs, the plot is drawn."""

from __future__ import annotations

import json

import pytest
from live_daemon import write_served_model

from mtpd.cli import main

CONFIG_FIELDS = {
    "draft_tokens",
    "concurrency",
    "decode_tokens_per_s",
    "throughput_tokens_per_s",
    "ttft_s",
    "acceptance_by_position",
    "drafts_by_position",
    "mean_accepted_length",
    "tokens_per_step",
    "step",
    "verify_cost_vs_plain",
    "speedup_vs_mtp_off",
    "predicted_speedup",
    "realized_over_predicted",
    "outputs",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    model = write_served_model(tmp / "model")
    out, png = tmp / "bench.json", tmp / "bench.png"
    code = main(
        [
            "bench",
            "--model",
            str(model),
            "--device",
            "cpu",
            "--workers",
            "2",
            "--threads",
            "1",
            "--max-context",
            "256",
            "--cache-memory",
            "64M",
            "--requests",
            "3",
            "--max-tokens",
            "12",
            "--draft-tokens",
            "2,auto",
            "--concurrency",
            "1,2",
            "--quant",
            "int4",
            "--peer",
            "transformers",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert code == 0
    return json.loads(out.read_text()), png


def test_every_configuration_is_measured_with_the_documented_fields(report):
    data, _ = report
    keys = [(c["draft_tokens"], c["concurrency"]) for c in data["configs"]]
    assert keys == [("0", 1), ("2", 1), ("auto", 1), ("0", 2), ("2", 2), ("auto", 2)]
    for c in data["configs"]:
        assert set(c) == CONFIG_FIELDS
        assert c["decode_tokens_per_s"] > 0 and c["throughput_tokens_per_s"] > 0
        assert c["ttft_s"] > 0
        assert set(c["step"]) >= {"step_ms", "verify_ms_per_stage", "draft_ms", "control_ms"}
        assert len(c["step"]["verify_ms_per_stage"]) == 2
        assert len(c["step"]["transport_ms_per_hop"]) == 1
    assert data["lookahead"] is False  # never across two stages
    by = {(c["draft_tokens"], c["concurrency"]): c for c in data["configs"]}
    off, two = by[("0", 1)], by[("2", 1)]
    # MTP off drafts nothing and never runs the head; two drafts per step are verified.
    assert off["drafts_by_position"] == [] and off["tokens_per_step"] == 1.0
    assert off["step"]["draft_ms"] == 0 and off["speedup_vs_mtp_off"] == 1.0
    assert len(two["drafts_by_position"]) == 2 and two["drafts_by_position"][0] > 0
    assert two["tokens_per_step"] == pytest.approx(1 + two["mean_accepted_length"])
    assert two["speedup_vs_mtp_off"] == pytest.approx(
        two["decode_tokens_per_s"] / off["decode_tokens_per_s"], rel=1e-3
    )


def test_greedy_outputs_agree_across_configurations(report):
    for c in report[0]["configs"]:
        assert c["outputs"]["diverged"] == 0, c
        assert c["outputs"]["identical"] + c["outputs"]["near_ties"] == 3


def test_quantized_runs_report_their_distance_from_float(report):
    data, _ = report
    q = data["quantization"]
    assert data["quant"] == q["quant"] == "int4"
    assert data["kv_cache"] == q["kv_cache"] == "auto"
    assert q["positions"] == 3 * 12
    assert q["perplexity"]["float"] >= 1 and q["perplexity"]["int4"] >= 1
    assert 0 < q["top1_agreement"] <= 1
    assert q["requantized_8bit"] == {}  # safetensors floats: nothing stored at 8 bits


def test_memory_peers_summary_and_plot(report):
    data, png = report
    memory = data["memory"]
    assert [w["rank"] for w in memory["workers"]] == [0, 1]
    assert all(w["weight_bytes"] > 0 and w["peak_bytes"] > 0 for w in memory["workers"])
    # Only the tail holds the head.
    assert memory["workers"][0]["mtp_bytes"] == 0 < memory["workers"][1]["mtp_bytes"]
    assert memory["mtp_over_weights"] == pytest.approx(
        memory["mtp_bytes"] / memory["weight_bytes"], abs=1e-4
    )
    assert data["peers"]["transformers"]["decode_tokens_per_s"] > 0
    summary = data["summary"]
    assert summary["mtp_off_over_transformers"] == pytest.approx(
        data["configs"][0]["decode_tokens_per_s"]
        / data["peers"]["transformers"]["decode_tokens_per_s"],
        rel=1e-3,
    )
    assert {"mtp_auto_over_off", "throughput_2_over_1_streams", "best_single_stream"} <= set(
        summary
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_settings_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--draft-tokens", "1,99"])
    assert exit_.value.code == 2
    assert "draft tokens are 0..16 or auto" in capsys.readouterr().err


def test_forced_acceptance_sets_acceptance_and_keeps_the_output(tmp_path):
    model = write_served_model(tmp_path / "model")
    out = tmp_path / "forced.json"
    pipeline = [
        "--device",
        "cpu",
        "--workers",
        "1",
        "--max-context",
        "256",
        "--cache-memory",
        "64M",
    ]
    run = ["--requests", "2", "--max-tokens", "13", "--draft-tokens", "3", "--concurrency", "1"]
    code = main(
        [
            "bench",
            "--model",
            str(model),
            *pipeline,
            *run,
            "--force-acceptance",
            "1",
            "--lookahead",  # on, whatever cores the worker takes
            "--json",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["lookahead"] is True
    assert data["configs"][0]["outputs"]["diverged"] == 0  # MTP off, with lookaheads
    three = data["configs"][1]
    assert three["draft_tokens"] == "3"
    assert three["acceptance_by_position"] == [1.0, 1.0, 1.0]
    assert three["tokens_per_step"] == 4.0  # 12 tokens after the first, in 3 steps of 4
    assert three["outputs"]["diverged"] == 0


def test_a_second_head_runs_beside_the_first(tmp_path):
    """--second-head: a second pipeline drafts with that head file, each configuration
    runs with both heads, each against its own MTP off. The checkpoint's own MTP layer is
    random and drafts nothing the model accepts; the file holds a head trained for 60
    steps (acceptance about 0.4): its acceptance shows which pipeline drafted, and the
    outputs are the first's reference."""
    model = write_served_model(tmp_path / "model")
    head_file = tmp_path / "trained.mtp.safetensors"
    training = ["--num-prompts", "32", "--self-prompts", "0", "--gen-tokens", "32", "--steps", "60"]
    training += [
        "--draft-vocab",
        "0",
        "--seed",
        "1",
        "--no-eval",
        "--work-dir",
        str(tmp_path / "w"),
    ]
    assert main(["train-mtp", "--model", str(model), "--out", str(head_file), *training]) == 0
    out = tmp_path / "bench.json"
    flags = ["--model", str(model), "--device", "cpu", "--workers", "1", "--threads", "1"]
    sizes = ["--max-context", "128", "--cache-memory", "16M", "--requests", "2"]
    runs = ["--max-tokens", "8", "--draft-tokens", "2", "--concurrency", "1"]
    code = main(
        ["bench", *flags, *sizes, *runs, "--second-head", str(head_file), "--json", str(out)]
    )
    assert code == 0
    data = json.loads(out.read_text())
    by = {c["draft_tokens"]: c for c in data["configs"]}
    assert list(by) == ["0", "2", "0/2", "2/2"]
    assert str(head_file) in data["heads"]["/2"] and str(head_file) not in data["heads"][""]
    assert by["2"]["drafts_by_position"] and by["2/2"]["drafts_by_position"]
    assert by["2"]["acceptance_by_position"][0] < 0.1 < 0.2 < by["2/2"]["acceptance_by_position"][0]
    assert all(c["outputs"]["diverged"] == 0 for c in data["configs"])
