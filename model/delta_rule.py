"""The gated delta rule, Gated DeltaNet's recurrence, in its two equivalent forms.

Per value head, a state S [dk, dv] evolves at each position t as

    S = exp(g_t) S                            # decay (g_t <= 0)
    S = S + k_t (beta_t (v_t - S^T k_t))^T    # the delta rule: write the correction
    o_t = S^T q_t

The recurrent form applies this one position at a time: decoding, verification, and
the replay that rolls a state back all use `update`, so a replayed state is bit for bit
the one the forward pass computed. The chunked form computes the same outputs and
final state for a long prompt with matmuls over chunks of positions (the UT transform
of the DeltaNet papers). Inputs are one sequence's: q and k [T, H, dk] (l2-normalised,
q also scaled by 1/sqrt(dk), key heads already repeated to the value heads), v
[T, H, dv], g and beta [T, H]; everything float32. Both forms advance `state` [H, dk,
dv] and return the outputs [T, H, dv]; given `initial`, they start from it instead and
write the result into `state` (no copy of the state before the first position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


def update(
    state: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial: torch.Tensor | None = None,
) -> None:
    """One position: state [H, dk, dv]; k [H, dk]; v [H, dv]; g and beta [H]."""
    torch.mul(state if initial is None else initial, g.exp()[:, None, None], out=state)
    predicted = torch.bmm(k[:, None, :], state)[:, 0]  # [H, dv]: what S already recalls for k
    correction = (v - predicted) * beta[:, None]
    state.baddbmm_(k[:, :, None], correction[:, None, :])


def recurrent(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.empty_like(v)
    for t in range(q.shape[0]):
        update(state, k[t], v[t], g[t], beta[t], initial if t == 0 else None)
        out[t] = torch.bmm(q[t][:, None, :], state)[:, 0]
    return out


def chunked(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    length = q.shape[0]
    pad = -length % chunk
    # [H, chunks, chunk, d] and [H, chunks, chunk]; padded positions have k = v = beta = 0
    # and g = 0, so they change neither the outputs kept nor the state.
    q, k, v = (F.pad(x.transpose(0, 1), (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x.transpose(0, 1), (0, pad)) for x in (g, beta))
    heads = q.shape[0]
    q, k, v = (x.reshape(heads, -1, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.reshape(heads, -1, chunk) for x in (g, beta))
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]

    decay = g.cumsum(-1)  # log of the decay from the chunk's start through each position
    # pair_decay[i, j]: the decay between positions j <= i of a chunk (0 above the diagonal).
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    pair_decay = (decay[..., :, None] - decay[..., None, :]).masked_fill(upper, float("-inf"))
    pair_decay = pair_decay.exp()
    # The delta rule's writes inside a chunk solve a unit lower-triangular system.
    system = (k_beta @ k.transpose(-1, -2)) * pair_decay
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    keys_read = torch.linalg.solve_triangular(
        system, k_beta * decay.exp()[..., None], upper=False, unitriangular=True
    )
    within = (q @ k.transpose(-1, -2)) * pair_decay
    q_decayed = q * decay.exp()[..., None]
    k_to_end = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]

    out = torch.empty_like(v)
    s = state if initial is None else initial
    for i in range(q.shape[1]):
        fresh = values[:, i] - keys_read[:, i] @ s  # the writes, less what s already recalls
        out[:, i] = q_decayed[:, i] @ s + within[:, i] @ fresh
        s = s * chunk_decay[:, i] + k_to_end[:, i].transpose(-1, -2) @ fresh
    state.copy_(s)
    return out.reshape(heads, -1, v.shape[-1])[:, :length].transpose(0, 1)
