"""The daemon's core, shared by `mtpd run` and `mtpd serve`: the model's tokenizer,
the worker pipeline, and the scheduler feeding it. It holds no model tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtpd.daemon.draft_policy import AUTO, DraftPolicy
from mtpd.daemon.pipeline import LocalWorkers, Pipeline, PipelineConfig
from mtpd.daemon.scheduler import Scheduler
from mtpd.daemon.structured_output import Grammars
from mtpd.model.checkpoint import model_identity, open_checkpoint, read_config
from mtpd.model.config import ModelConfig
from mtpd.model.default_model import resolve_model
from mtpd.model.tokenizer import Tokenizer
from mtpd.rpc import WorkerTLS

# Prefix caching on a hybrid model: the recurrent states each sequence keeps, saved after
# its prompt's chunks (each one as large as the sequence's live recurrent state).
STATE_SNAPSHOTS = 4


@dataclass
class Settings:
    model: str | None = None  # None: the embedded default
    workers: int | None = None
    device: str | None = None
    split: str | None = None
    dtype: str = "float32"
    quant: str = "none"
    cuda_graphs: bool | None = None  # None: on CUDA where they apply
    threads: int | None = None
    transport: str = "dist"
    max_seqs: int = 16
    max_context: int = 2048
    cache_memory: int = 0
    max_batch_tokens: int = 256
    max_queue: int = 256
    runtime_dir: Path | None = None
    join_listen: str | None = None
    token: str | None = None
    worker_tls: WorkerTLS | None = None  # mutual TLS with remote workers
    draft_tokens: int | str = AUTO  # 0 turns MTP off
    draft_p_min: float = 0.0
    step_timeout_s: float = 120.0  # a worker this late with a step is restarted
    max_restarts: int = 5  # per worker in restart_window_s; past them requests fail
    restart_window_s: float = 600.0
    rejoin_timeout_s: float = 300.0  # how long a failed remote worker has to rejoin
    mtp_head: Path | None = None  # default: the shipped head, else the checkpoint's own
    # (resolved by the tail worker, which may be on another host)
    tool_call_parser: str = "auto"  # daemon/chat.py: the format the chat template teaches
    reasoning_parser: str = "auto"  # <think> split off where the template knows it
    prefix_cache: bool = False  # keep finished requests' caches (mtpd serve: on)


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
        local = None
        if settings.join_listen is None:
            local = LocalWorkers.start(
                settings.device,
                settings.workers,
                settings.transport,
                settings.threads,
                settings.runtime_dir,
            )
        try:
            path, cfg, tokenizer, identity = _read_model(settings)
        except BaseException:
            if local is not None:
                local.stop()
            raise
        policy = DraftPolicy(settings.draft_tokens, settings.draft_p_min)
        pipeline = Pipeline.start(  # which owns `local` from here, and stops it on failure
            PipelineConfig(
                model=str(path),
                num_layers=cfg.num_layers,
                workers=settings.workers,
                device=settings.device,
                split=settings.split,
                dtype=settings.dtype,
                quant=settings.quant,
                cuda_graphs=settings.cuda_graphs,
                max_seqs=settings.max_seqs,
                max_context=min(settings.max_context, cfg.max_position_embeddings),
                cache_memory=settings.cache_memory,
                threads=settings.threads,
                transport=settings.transport,
                runtime_dir=settings.runtime_dir,
                join_listen=settings.join_listen,
                token=settings.token,
                worker_tls=settings.worker_tls,
                model_identity=identity,
                load_mtp=policy.enabled,
                mtp_head=str(settings.mtp_head) if settings.mtp_head else None,
                step_timeout_s=settings.step_timeout_s,
                max_restarts=settings.max_restarts,
                restart_window_s=settings.restart_window_s,
                rejoin_timeout_s=settings.rejoin_timeout_s,
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
    identity = model_identity(ckpt, cfg) if settings.join_listen else ""
    return path, cfg, Tokenizer.from_checkpoint(ckpt, cfg), identity
