"""The daemon's core, shared by `mtpd run` and `mtpd serve`: the model's tokenizer,
the worker pipeline, and the scheduler feeding it. It holds no model tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mtpd.daemon.draft_policy import AUTO, DraftPolicy
from mtpd.daemon.launch import LocalWorkers
from mtpd.daemon.pipeline import Pipeline, PipelineConfig
from mtpd.daemon.scheduler import Scheduler
from mtpd.daemon.structured_output import Grammars
from mtpd.model.checkpoint import model_identity, open_checkpoint, read_config
from mtpd.model.config import ModelConfig
from mtpd.model.default_model import resolve_model
from mtpd.model.tokenizer import Tokenizer

# Prefix caching on a hybrid model: the recurrent states each sequence keeps, saved after
# its prompt's chunks (each one as large as the sequence's live recurrent state).
STATE_SNAPSHOTS = 4


@dataclass
class Settings:
    """What `mtpd run`, `serve` and `bench` start: the pipeline (the coordinator fills in
    what it reads from the model) and the daemon's own settings."""

    model: str | None = None  # None: the embedded default
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    max_batch_tokens: int = 256
    max_queue: int = 256
    draft_tokens: int | str = AUTO  # 0 turns MTP off
    draft_p_min: float = 0.0
    tool_call_parser: str = "auto"  # daemon/chat.py: the format the chat template teaches
    reasoning_parser: str = "auto"  # <think> split off where the template knows it
    prefix_cache: bool = False  # keep finished requests' caches (mtpd serve: on)
    # One worker: send the next plain decoding step before the last one answers; None:
    # where the daemon has a core the step does not use (Scheduler's lookahead).
    lookahead: bool | None = None


class Coordinator:
    def __init__(
        self,
        model_path: Path,
        cfg: ModelConfig,
        tokenizer: Tokenizer,
        pipeline: Pipeline,
        scheduler: Scheduler,
    ) -> None:
        self.model_path, self.cfg, self.tokenizer = model_path, cfg, tokenizer
        self.pipeline, self.scheduler = pipeline, scheduler
        self.grammars = Grammars(tokenizer, cfg.vocab_size)  # structured output
        self.notes: list[str] = []  # what the user should hear once about this start
        self.tool_call_parser = Settings.tool_call_parser  # set by start()
        self.reasoning_parser = Settings.reasoning_parser

    @classmethod
    def start(
        cls, settings: Settings, on_status: Callable[[str], None] | None = None
    ) -> Coordinator:
        # Local workers start first: each takes about a second to import torch, and this
        # process spends that second reading the model's config and tokenizer.
        wanted = settings.pipeline
        local = None
        if wanted.join_listen is None:
            local = LocalWorkers.start(wanted)
        try:
            path, cfg, tokenizer, identity = _read_model(settings)
        except BaseException:
            if local is not None:
                local.stop()
            raise
        policy = DraftPolicy(settings.draft_tokens, settings.draft_p_min)
        pipeline = Pipeline.start(  # which owns `local` from here, and stops it on failure
            dataclasses.replace(
                wanted,
                model=str(path),
                num_layers=cfg.num_layers,
                max_context=min(wanted.max_context, cfg.max_position_embeddings),
                model_identity=identity,
                load_mtp=policy.enabled,
                state_snapshots=STATE_SNAPSHOTS if settings.prefix_cache and cfg.is_hybrid else 0,
            ),
            on_status,
            local,
        )
        try:
            notes = []
            if cfg.vision_tower_skipped:
                notes.append(f"{path}: the vision tower is skipped: mtpd serves the text decoder")
            if policy.enabled and not pipeline.mtp_head:
                notes.append(f"{path} has no MTP head: decoding without drafts (k = 0)")
                policy = DraftPolicy(0)
            scheduler = Scheduler(
                pipeline,
                tokenizer.eos_ids,
                settings.max_batch_tokens,
                settings.max_queue,
                policy=policy,
                prefix_cache=settings.prefix_cache,
                lookahead=settings.lookahead,
            )
        except BaseException:
            pipeline.close()
            raise
        coordinator = cls(path, cfg, tokenizer, pipeline, scheduler)
        coordinator.notes = notes
        coordinator.tool_call_parser = settings.tool_call_parser
        coordinator.reasoning_parser = settings.reasoning_parser
        return coordinator

    def close(self) -> None:
        self.scheduler.close()
        self.pipeline.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_model(settings: Settings) -> tuple[Path, ModelConfig, Tokenizer, str]:
    """The model's path, config and tokenizer, and for remote workers its identity: all
    read without torch (the daemon never imports it)."""
    path = resolve_model(settings.model)
    ckpt = open_checkpoint(path)
    cfg = read_config(ckpt)
    identity = model_identity(ckpt, cfg) if settings.pipeline.join_listen else ""
    return path, cfg, Tokenizer.from_checkpoint(ckpt, cfg), identity
