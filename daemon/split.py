"""Which layers each pipeline stage holds."""

from __future__ import annotations

from mtpd.model.errors import InputError


def parse_split(text: str) -> list[int]:
    """`--split 10,20` names the layer counts per worker."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"--split {text!r}: expected layer counts like 10,20") from None
    return counts


def check_worker_count(num_workers: int) -> None:
    if num_workers < 1:
        raise InputError(f"--workers must be >= 1, got {num_workers}")


def layer_ranges(
    num_layers: int,
    num_workers: int,
    split: list[int] | None = None,
    free_memory: list[int] | None = None,
) -> list[tuple[int, int]]:
    """Contiguous [first, end) ranges covering every layer, one per worker: the explicit
    `split` counts, else proportional to `free_memory`, else even (earlier workers take
    the remainder: the tail also holds the LM head)."""
    check_worker_count(num_workers)
    if num_workers > num_layers:
        raise InputError(
            f"{num_workers} workers for a model of {num_layers} layers: every worker needs "
            f"at least one layer"
        )
    if split is not None:
        if len(split) != num_workers:
            raise InputError(
                f"--split names {len(split)} stages but there are {num_workers} workers"
            )
        if any(c < 1 for c in split):
            raise InputError(f"--split {split}: every worker needs at least one layer")
        if sum(split) != num_layers:
            raise InputError(
                f"--split {','.join(map(str, split))} sums to {sum(split)}, but the model "
                f"has {num_layers} layers"
            )
        counts = split
    elif free_memory is not None:
        counts = _proportional(num_layers, free_memory)
    else:
        base, extra = divmod(num_layers, num_workers)
        counts = [base + (i < extra) for i in range(num_workers)]
    ranges, first = [], 0
    for c in counts:
        ranges.append((first, first + c))
        first += c
    return ranges


def _proportional(num_layers: int, weights: list[int]) -> list[int]:
    """At least one layer each, the rest by largest remainder."""
    total = sum(weights)
    if total <= 0:
        raise InputError("--split auto: the workers report no free memory")
    spare = num_layers - len(weights)
    shares = [spare * w / total for w in weights]
    counts = [1 + int(s) for s in shares]
    order = sorted(range(len(weights)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in order[: num_layers - sum(counts)]:
        counts[i] += 1
    return counts
