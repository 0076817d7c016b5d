"""Turning benchmark runs into the report `mtpd bench` prints, writes as JSON and plots.
The JSON's fields are documented in docs/bench.md."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from mtpd.bench.runner import ConfigRun, mean_step_s, mean_verify_s, step_split
from mtpd.daemon.draft_policy import DraftStats
from mtpd.model.compare import compare_tokens
from mtpd.model.errors import InputError


def _mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else 0.0


def config_report(
    runs: list[ConfigRun], baseline: list[ConfigRun], reference: ConfigRun, dtype: torch.dtype
) -> dict:
    """One configuration over its rounds, against MTP off's timed runs at the same
    concurrency, its outputs against `reference` (MTP off with logits there); the model
    computed in `dtype` (which sets what counts as a near-tie)."""
    drafts = DraftStats()
    for run in runs:
        drafts.merge(run.drafts)
    steps = [s for run in runs for s in run.steps]
    base_steps = [s for run in baseline for s in run.steps]
    rate = _mean([run.decode_rate for run in runs])
    base_rate = _mean([run.decode_rate for run in baseline])
    step_s, base_step_s = mean_step_s(steps), mean_step_s(base_steps)
    tokens_per_step = drafts.tokens_per_step if drafts.steps else 1.0
    predicted = tokens_per_step * base_step_s / step_s if step_s else 0.0
    realized = rate / base_rate if base_rate else 0.0
    agreements = [
        compare_tokens(b.token_ids, b.logits, r.token_ids, dtype)
        for run in runs
        for r, b in zip(run.results, reference.results, strict=True)
    ]
    base_verify = mean_verify_s(base_steps)
    return {
        "draft_tokens": str(runs[0].draft),
        "concurrency": runs[0].concurrency,
        "decode_tokens_per_s": round(rate, 3),
        "throughput_tokens_per_s": round(_mean([run.throughput for run in runs]), 3),
        "ttft_s": round(_mean([t for run in runs for t in run.ttft_s]), 4),
        "acceptance_by_position": [round(a, 4) for a in drafts.conditional_acceptance_by_position],
        "drafts_by_position": drafts.drafted,
        "mean_accepted_length": round(tokens_per_step - 1, 4),
        "tokens_per_step": round(tokens_per_step, 4),
        "step": step_split(steps),
        "verify_cost_vs_plain": round(mean_verify_s(steps) / base_verify, 4)
        if base_verify
        else 0.0,
        "speedup_vs_mtp_off": round(realized, 4),
        "predicted_speedup": round(predicted, 4),
        "realized_over_predicted": round(realized / predicted, 4) if predicted else 0.0,
        "outputs": {
            "identical": sum(a.equal for a in agreements),
            "near_ties": sum(a.ok and not a.equal for a in agreements),
            "diverged": sum(not a.ok for a in agreements),
        },
    }


def print_report(report: dict) -> None:
    head = (
        f"{'drafts':>6} {'conc':>4} {'decode tok/s':>12} {'x off':>6} {'pred':>6} "
        f"{'total tok/s':>11} {'TTFT s':>7} {'tok/step':>8} {'accept by position':<24} "
        f"{'step ms':>8} {'verify/stage ms':<16} {'draft ms':>8} {'hop ms':<10} {'ctrl ms':>7} "
        f"{'verify x':>8} {'same':>5}"
    )
    print(head)
    for c in report["configs"]:
        s = c["step"] or {}
        accept = ",".join(f"{a:.2f}" for a in c["acceptance_by_position"][:4]) or "-"
        outputs = c["outputs"]
        same = f"{outputs['identical'] + outputs['near_ties']}/{sum(outputs.values())}"
        print(
            f"{c['draft_tokens']:>6} {c['concurrency']:>4} {c['decode_tokens_per_s']:>12.2f} "
            f"{c['speedup_vs_mtp_off']:>6.2f} {c['predicted_speedup']:>6.2f} "
            f"{c['throughput_tokens_per_s']:>11.2f} {c['ttft_s']:>7.3f} {c['tokens_per_step']:>8.2f} "
            f"{accept:<24} {s.get('step_ms', 0):>8.2f} "
            f"{','.join(f'{v:.1f}' for v in s.get('verify_ms_per_stage', [])):<16} "
            f"{s.get('draft_ms', 0):>8.2f} "
            f"{','.join(f'{v:.2f}' for v in s.get('transport_ms_per_hop', [])) or '-':<10} "
            f"{s.get('control_ms', 0):>7.2f} {c['verify_cost_vs_plain']:>8.2f} {same:>5}"
        )
    m = report["memory"]
    print(
        f"memory: weights {m['weight_bytes'] / 2**20:.1f} MiB, MTP adds {m['mtp_bytes'] / 2**20:.1f} "
        f"MiB ({100 * m['mtp_over_weights']:.1f}% of the weights); peak per worker "
        + ", ".join(f"{w['peak_bytes'] / 2**20:.0f} MiB" for w in m["workers"])
        + f"; coordinator {m['coordinator_peak_bytes'] / 2**20:.0f} MiB"
    )
    if "quantization" in report:
        q = report["quantization"]
        cache = "" if q["kv_cache"] == "auto" else f" with its KV cache in {q['kv_cache']}"
        print(
            f"{q['quant']}{cache} against float, on float's greedy text ({q['positions']} "
            "positions): "
            f"perplexity {q['perplexity'][q['quant']]:.3f} vs {q['perplexity']['float']:.3f}, "
            f"top-1 agreement {q['top1_agreement']:.3f}; 8-bit blocks requantized per channel, "
            "relative RMS error: "
            + (", ".join(f"{k} {v:.4f}" for k, v in q["requantized_8bit"].items()) or "none")
        )
    for name, line in report["summary"].items():
        print(f"{name}: {line}")


def summary(configs: list[dict], peers: dict[str, dict]) -> dict[str, float]:
    """The headline ratios, each from this run alone."""
    out: dict[str, float] = {}
    by = {(c["draft_tokens"], c["concurrency"]): c for c in configs}
    concurrency = sorted({c["concurrency"] for c in configs})
    one = concurrency[0]
    if ("auto", one) in by:
        out["mtp_auto_over_off"] = by[("auto", one)]["speedup_vs_mtp_off"]
        out["realized_over_predicted_auto"] = by[("auto", one)]["realized_over_predicted"]
    if ("auto/2", one) in by:  # mtpd bench --second-head
        out["mtp_auto_over_off_second_head"] = by[("auto/2", one)]["speedup_vs_mtp_off"]
    best = max(
        (c for c in configs if c["concurrency"] == one), key=lambda c: c["decode_tokens_per_s"]
    )
    out["best_single_stream"] = best["decode_tokens_per_s"]
    out["best_single_stream_drafts"] = best["draft_tokens"]
    for n in concurrency[1:]:
        if ("0", n) in by:
            out[f"throughput_{n}_over_{one}_streams"] = round(
                by[("0", n)]["throughput_tokens_per_s"] / by[("0", one)]["throughput_tokens_per_s"],
                4,
            )
    for k in ("4", "3"):
        if (k, one) in by:
            out[f"verify_{k}_drafts_over_plain"] = by[(k, one)]["verify_cost_vs_plain"]
            break
    for name, peer in peers.items():
        out[f"mtp_off_over_{name}"] = round(
            by[("0", one)]["decode_tokens_per_s"] / peer["decode_tokens_per_s"], 4
        )
        out[f"best_over_{name}"] = round(
            best["decode_tokens_per_s"] / peer["decode_tokens_per_s"], 4
        )
    return out


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib (pip install 'mtpd[bench]')") from None
    configs = report["configs"]
    settings = list(dict.fromkeys(c["draft_tokens"] for c in configs))
    concurrency = sorted({c["concurrency"] for c in configs})
    by = {(c["draft_tokens"], c["concurrency"]): c for c in configs}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in concurrency:
        left.plot(
            settings,
            [by[(s, n)]["decode_tokens_per_s"] for s in settings],
            "o-",
            label=f"{n} stream{'s' if n > 1 else ''}",
        )
    left.set(xlabel="draft tokens", ylabel="decode tokens/s per stream", title="Draft length")
    for s in settings:
        right.plot(
            concurrency,
            [by[(s, n)]["throughput_tokens_per_s"] for n in concurrency],
            "o-",
            label=f"drafts {s}",
        )
    right.set(xlabel="concurrent streams", ylabel="tokens/s, all streams", title="Concurrency")
    right.set_xscale("log", base=2)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"mtpd bench: {report['model_name']}, {report['workers']} worker(s), {report['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
