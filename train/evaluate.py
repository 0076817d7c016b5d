"""How well an MTP head drafts for its model: acceptance by draft position and tokens per
verification step, on the model's own greedy continuations of held-out prompts.

The head runs exactly as it does in serving: its KV cache holds entries computed from
verified trunk states only, it drafts k tokens recursively at each position, and the
drafts are compared with what the model itself produces there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtpd.model.mtp import MTPHead
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.collect import Record, continue_prompts
from mtpd.train.engine import Engine


def draft_along(
    head: MTPHead, records: Sequence[Record], starts: Sequence[int], k: int
) -> list[torch.Tensor]:
    """drafts[r][p - starts[r], j] = the (j+1)-th draft made at position p of record r
    (p from starts[r] to the end), all records advanced in lockstep."""
    cache = head.new_cache(len(records), max(len(r.argmax) for r in records) + k + 1)
    slots = [cache.slot(str(i)) for i in range(len(records))]
    out = [
        torch.zeros(max(0, len(r.argmax) - 1 - s), k, dtype=torch.long)
        for r, s in zip(records, starts, strict=True)
    ]
    with torch.inference_mode():
        # Verified entries for the prompt positions before drafting starts.
        pre = [i for i, s in enumerate(starts) if s > 0]
        if pre:
            head(
                torch.cat([records[i].hidden[: starts[i]].to(head.dtype) for i in pre]),
                torch.tensor([t for i in pre for t in records[i].tokens[1 : starts[i] + 1]]),
                cache,
                [slots[i] for i in pre],
                [starts[i] for i in pre],
            )
        for step in range(max(o.shape[0] for o in out)):
            live = [i for i, o in enumerate(out) if step < o.shape[0]]
            p = [starts[i] + step for i in live]
            # The passes serving runs (Drafter): each one call where the head is on the kernels.
            states, first, _, _ = head.forward_and_draft(
                torch.stack(
                    [records[i].hidden[q].to(head.dtype) for i, q in zip(live, p, strict=True)]
                ),
                torch.tensor([records[i].tokens[q + 1] for i, q in zip(live, p, strict=True)]),
                cache,
                [slots[i] for i in live],
                [1] * len(live),
            )
            drafts = [first]
            for _ in range(k - 1):
                states, more, _, _ = head.forward_and_draft(
                    states, drafts[-1], cache, [slots[i] for i in live], [1] * len(live)
                )
                drafts.append(more)
            for i in live:  # the draft-time entries are discarded, as after verification
                cache.truncate(slots[i], cache.lengths[slots[i]] - (k - 1))
            for j, d in enumerate(drafts):
                for row, i in enumerate(live):
                    out[i][step, j] = d[row]
    return out


def _tokens_per_step(accepted_at: list[int], k: int) -> tuple[int, int]:
    """Walk verification steps along a sequence: (steps, tokens emitted)."""
    p, steps, tokens = 0, 0, 0
    while p < len(accepted_at):
        n = min(accepted_at[p], k) + 1
        steps, tokens, p = steps + 1, tokens + n, p + n
    return steps, tokens


def evaluate_head(
    engine: Engine,
    head: MTPHead,
    prompts: Sequence[str],
    k: int = 3,
    max_new: int = 128,
    temperature: float = 0.7,
    batch: int = 16,
) -> dict:
    tok = engine.tokenizer
    greedy_hits = [[0, 0] for _ in range(k)]  # [accepted, drafted] by position
    sampled = [[0.0, 0.0] for _ in range(k)]
    steps = tokens = 0
    expected_tokens, n_positions = 0.0, 0
    for b in range(0, len(prompts), batch):
        ids = [
            tok.encode(tok.render_chat([{"role": "user", "content": p}]))
            for p in prompts[b : b + batch]
        ]
        records = continue_prompts(engine, ids, max_new, [SamplingParams()] * len(ids))
        starts = [len(i) - 1 for i in ids]  # first position whose next token is generated
        drafts = draft_along(head, records, starts, k)
        for r, s, d in zip(records, starts, drafts, strict=True):
            if d.shape[0] == 0:
                continue
            target = torch.tensor(r.argmax)
            with torch.inference_mode():
                probs = torch.softmax(
                    engine.shard.logits(r.hidden.to(engine.shard.dtype)) / temperature, -1
                )
            accepted_at = []
            for q in range(d.shape[0]):
                p = s + q
                chains = _chain_products(probs, d[q], p, k, len(r.argmax))
                reach = 1.0
                for j, chain in enumerate(chains):
                    sampled[j][0] += chain
                    sampled[j][1] += reach
                    reach = chain
                expected_tokens += 1 + sum(chains)
                n_positions += 1
                run = 0
                while run < len(chains) and int(d[q, run]) == int(target[p + 1 + run]):
                    run += 1
                for j in range(min(run + 1, len(chains))):
                    greedy_hits[j][1] += 1
                    greedy_hits[j][0] += j < run
                accepted_at.append(run)
            st, tk = _tokens_per_step(accepted_at, k)
            steps, tokens = steps + st, tokens + tk
    return {
        "k": k,
        "positions": n_positions,
        "acceptance_by_position": [a / n if n else 0.0 for a, n in greedy_hits],
        "tokens_per_step": tokens / steps if steps else 0.0,
        f"temperature_{temperature}": {
            "acceptance_by_position": [a / n if n else 0.0 for a, n in sampled],
            "tokens_per_step": expected_tokens / n_positions if n_positions else 0.0,
        },
    }


def _chain_products(
    probs: torch.Tensor, drafts: torch.Tensor, p: int, k: int, length: int
) -> list[float]:
    """P(first i drafts all accepted) for i = 1..k when each draft is accepted with its
    probability under the target distribution (sample-and-match with a greedy draft)."""
    out, chain = [], 1.0
    for j in range(k):
        if p + 1 + j >= length:
            break
        chain *= float(probs[p + 1 + j, drafts[j]])
        out.append(chain)
    return out
