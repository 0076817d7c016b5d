"""The whole model in one process, without a pipeline: the reference the tests compare
the pipeline against, and what `mtpd train` collects the MTP head's data with and `mtpd
bench` measures quantization quality with. Serving never uses it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.config import ModelConfig
from mtpd.model.decoder import DecoderShard, ShardSpec
from mtpd.model.default_model import resolve_model
from mtpd.model.errors import InvalidParameter
from mtpd.model.kv_cache import CacheFullError
from mtpd.model.mtp import MTPHead
from mtpd.model.sampling import select_token
from mtpd.model.sampling_params import SamplingParams
from mtpd.model.tokenizer import Tokenizer
from mtpd.worker.shard_loading import load_shard


class Engine:
    def __init__(
        self,
        model_path: Path,
        cfg: ModelConfig,
        tokenizer: Tokenizer,
        shard: DecoderShard,
        max_seqs: int,
        mtp: MTPHead | None = None,
    ) -> None:
        self.model_path, self.cfg, self.tokenizer, self.shard = model_path, cfg, tokenizer, shard
        self.max_context = shard.stack.max_context
        self.cache = shard.new_cache(max_seqs, self.max_context)
        self.mtp = mtp

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        max_seqs: int = 1,
        max_context: int = 2048,
        mtp_head: Path | None = None,
        device: torch.device | str = "cpu",
        quant: str = "none",
        kv_cache: str = "auto",
    ) -> Engine:
        path = resolve_model(None if model is None else str(model))
        ckpt = open_checkpoint(path)
        cfg = read_config(ckpt)
        tokenizer = Tokenizer.from_checkpoint(ckpt, cfg)
        shard, mtp = load_shard(
            ckpt,
            cfg,
            ShardSpec.whole(cfg),
            dtype,
            max_context,
            torch.device(device),
            mtp_head,
            quant=quant,
            kv_cache=kv_cache,
        )
        return cls(path, cfg, tokenizer, shard, max_seqs, mtp)

    @torch.inference_mode()
    def forward(
        self, seq_id: str, keep: int, tokens: list[int], all_logits: bool = False
    ) -> torch.Tensor:
        """Keep the first `keep` cached positions of `seq_id`, append `tokens`, and return
        the logits of the last new position [V] (of every new position [T, V] with
        `all_logits`)."""
        slot = self.cache.slot(seq_id)
        self.cache.truncate(slot, keep)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.shard.device)
        hidden = self.shard(ids, self.cache, [slot], [len(tokens)])
        # Token selection runs on the CPU beside the token history.
        return self.shard.logits(hidden if all_logits else hidden[-1]).cpu()

    def release(self, seq_id: str) -> None:
        self.cache.release(seq_id)

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        seq_id: str = "generate",
        ignore_eos: bool = False,
    ) -> Iterator[int]:
        """Yield generated token ids; stops before an end-of-sequence token unless
        `ignore_eos` (benchmarks generate a fixed length)."""
        if not prompt_ids:
            raise InvalidParameter("prompt is empty")
        if len(prompt_ids) + max_tokens > self.max_context:
            raise CacheFullError(
                f"prompt of {len(prompt_ids)} tokens plus max_tokens {max_tokens} exceeds the "
                f"context of {self.max_context} tokens"
            )
        history = list(prompt_ids)
        try:
            logits = self.forward(seq_id, 0, history)
            for _ in range(max_tokens):
                token = select_token(
                    logits, params, len(history), torch.tensor(history), len(prompt_ids)
                )
                if token in self.tokenizer.eos_ids and not ignore_eos:
                    return
                yield token
                history.append(token)
                logits = self.forward(seq_id, len(history) - 1, [token])
        finally:
            self.release(seq_id)
