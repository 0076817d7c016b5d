"""The verifying sampler is the plain sampler: with greedy drafts, every seed gives the
tokens plain decoding gives, and the tokens follow the model's exact distribution."""

from __future__ import annotations

import torch
from tiny_models import write_tiny_model

from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.decoder import DecoderShard, ShardSpec
from mtpd.model.sampling import select_token, target_probs
from mtpd.model.sampling_params import SamplingParams
from mtpd.worker.verify import verify

VOCAB, SEEDS, DRAFTS = 8, 20_000, 2
# chi-square critical values at alpha = 0.001, by degrees of freedom
CHI2_CRITICAL = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def test_drafted_sampling_is_exact_and_distributed_as_the_model(tmp_path):
    write_tiny_model(tmp_path, "llama", layers=2, vocab=VOCAB, seed=3)
    ckpt = open_checkpoint(tmp_path)
    cfg = read_config(ckpt)
    shard = DecoderShard.load(ckpt, cfg, ShardSpec.whole(cfg), torch.float32, 64)
    prompt = [3, 5, 1]
    memo: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(generated: tuple[int, ...]) -> torch.Tensor:
        """The model's logits after prompt + generated (whole-prefix recomputation)."""
        if generated not in memo:
            cache = shard.new_cache(1)
            ids = torch.tensor(prompt + list(generated))
            with torch.inference_mode():
                memo[generated] = shard.logits(shard(ids, cache, [0], [len(ids)])[-1])
        return memo[generated]

    def params(seed: int) -> SamplingParams:
        return SamplingParams(temperature=0.3, seed=seed)  # sharpened

    def probs(generated: tuple[int, ...]) -> torch.Tensor:
        history = torch.tensor(prompt + list(generated))
        return target_probs(logits(generated), params(0), history).double()

    def plain(seed: int) -> list[int]:
        out: list[int] = []
        for _ in range(3):
            hist = prompt + out
            out.append(
                select_token(logits(tuple(out)), params(seed), len(hist), torch.tensor(hist))
            )
        return out

    def drafted(seed: int) -> tuple[list[int], int]:
        """First token from the prompt, then verification steps with greedy drafts."""
        hist = list(prompt)
        out = [select_token(logits(()), params(seed), len(hist), torch.tensor(hist))]
        accepted = 0
        while len(out) < 3:
            drafts = []
            for _ in range(DRAFTS):
                drafts.append(int(logits(tuple(out + drafts)).argmax()))
            rows = torch.stack([logits(tuple(out + drafts[:j])) for j in range(DRAFTS + 1)])
            history = prompt + out + drafts
            base = len(prompt) + len(out) - 1
            emitted = verify(rows, params(seed), history, base, DRAFTS, len(prompt))
            accepted += len(emitted) - 1
            out.extend(emitted)
        return out[:3], accepted

    counts = torch.zeros(3, VOCAB)
    total_accepted = 0
    for seed in range(SEEDS):
        tokens, accepted = drafted(seed)
        total_accepted += accepted
        if seed < 2000:
            assert tokens == plain(seed), seed
        for i, t in enumerate(tokens):
            counts[i, t] += 1
    assert total_accepted > SEEDS // 4, "drafts were hardly ever accepted: a weak test"

    # Exact marginals of the first three tokens, by enumeration.
    p1 = probs(())
    p2 = sum(p1[a] * probs((a,)) for a in range(VOCAB))
    p3 = sum(p1[a] * probs((a,))[b] * probs((a, b)) for a in range(VOCAB) for b in range(VOCAB))
    for position, exact in enumerate((p1, p2, p3)):
        expected = exact * SEEDS
        big = expected >= 5  # pool the rare tokens into one cell
        observed = torch.cat([counts[position][big], counts[position][~big].sum()[None]])
        want = torch.cat([expected[big], expected[~big].sum()[None]])
        if want[-1] < 5:
            observed, want = observed[:-1], want[:-1]
        chi2 = float(((observed - want) ** 2 / want).sum())
        df = len(want) - 1
        assert df >= 2, "the distribution is too peaked to test"
        assert chi2 < CHI2_CRITICAL[df], (position, chi2, df)
