"""What exact rollback of Gated DeltaNet states costs, on a random mid-sized Qwen3.5
config: memory per sequence slot, and time per step.

A verification step keeps each linear-attention layer's state from before the step
(the step writes the other of two buffers) and logs the delta rule's inputs at its
positions; a rollback to n of the step's positions replays n logged updates from the
kept state (`mtpd.model.linear_state`). Measured: the step itself (1 and k+1 new
tokens), the bookkeeping inside it (the log: writing the other buffer costs nothing
more than writing in place), and the rollback for each n. For comparison, the memory
that per-position snapshots of the state would take.

    python benchmarks/rollback.py [--hidden 1024] [--layers 8] [--drafts 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from mtpd.model.config import ModelConfig
from mtpd.model.decoder import DecoderShard, ShardSpec, shard_tensor_shapes
from mtpd.model.layers import pack_for_inference
from mtpd.model.linear_state import ROLLBACK_POSITIONS, LinearStates


def config(hidden: int, layers: int, vocab: int) -> ModelConfig:
    """Qwen3.6-27B's proportions at a smaller width: 128-wide heads, three value heads
    per key head in the linear attention, every fourth layer full attention."""
    heads = hidden // 128
    return ModelConfig.from_hf(
        {
            "model_type": "qwen3_5_text",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 4),
            "head_dim": 128,
            "linear_num_key_heads": heads,
            "linear_num_value_heads": 3 * heads,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4,
            "max_position_embeddings": 32768,
        }
    )


def random_shard(cfg: ModelConfig, context: int) -> DecoderShard:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shard_tensor_shapes(cfg, ShardSpec.whole(cfg)).items():
        if name.endswith("A_log"):
            tensors[name] = torch.empty(shape).uniform_(1, 16, generator=g).log()
        elif name.endswith("dt_bias"):
            tensors[name] = torch.ones(shape)
        elif len(shape) == 1:  # norms
            tensors[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            tensors[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    shard = DecoderShard(cfg, ShardSpec.whole(cfg), tensors, context)
    pack_for_inference(shard)
    return shard


def median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 3)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--context", type=int, default=4096, help="KV cache length per slot")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--drafts", type=int, default=3, help="k: a verification step has k + 1 tokens")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = config(args.hidden, args.layers, args.vocab)
    shard = random_shard(cfg, args.context)
    cache = shard.new_cache(1, args.context)
    states: LinearStates = cache.linear
    slot = cache.slot("s")
    k = args.drafts
    g = torch.Generator().manual_seed(1)

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(0, cfg.vocab_size, (n,), generator=g)

    def step(keep: int, n: int) -> None:
        cache.truncate(slot, keep)
        shard(tokens(n), cache, [slot], [n])

    decode, verify, bookkeeping = [], [], []
    rollback: dict[int, list[float]] = {n: [] for n in range(k + 1)}
    with torch.inference_mode():
        step(0, args.prompt)
        for _ in range(3):  # warm up
            step(cache.lengths[slot], k + 1)
        for i in range(args.repeats):
            length = cache.lengths[slot]
            decode.append(timed(lambda length=length: step(length, 1)))
            start = cache.lengths[slot]
            verify.append(timed(lambda start=start: step(start, k + 1)))
            # Keep n of the k + 1 positions (n = 0: the state before the step, a flip).
            n = i % (k + 1)
            rollback[n].append(timed(lambda start=start, n=n: cache.truncate(slot, start + n)))
            if n == 0:  # keep at least the step's first token, as the protocol does
                step(start, 1)
            bookkeeping.append(timed(lambda: bookkeeping_of_one_step(states, slot, k + 1)))

    dims = cfg.linear_attention
    state_bytes = (
        states.num_layers * dims.num_value_heads * dims.key_head_dim * dims.value_head_dim * 4
    )
    kv_per_slot = shard.stack.num_attention * 2 * cfg.num_kv_heads * args.context * cfg.head_dim * 4
    linear_per_slot = LinearStates.bytes_per_slot(states.num_layers, dims, shard.dtype)
    result = {
        "config": {
            "hidden": cfg.hidden_size,
            "layers": cfg.num_layers,
            "linear_attention_layers": states.num_layers,
            "attention_layers": shard.stack.num_attention,
            "linear_heads_k_v": [dims.num_key_heads, dims.num_value_heads],
            "head_dim": dims.key_head_dim,
            "drafts": k,
            "context": args.context,
            "threads": args.threads,
            "dtype": "float32",
        },
        "memory_per_sequence_bytes": {
            "kv_cache_attention_layers": kv_per_slot,
            "recurrent_state": state_bytes,
            "linear_attention_total": linear_per_slot,
            "of_which_rollback": linear_per_slot - state_bytes - window_bytes(states),
            "per_position_snapshots_instead": ROLLBACK_POSITIONS * state_bytes,
        },
        "time_ms": {
            "decode_step_1_token": median_ms(decode),
            f"verify_step_{k + 1}_tokens": median_ms(verify),
            "rollback_bookkeeping_in_a_step": median_ms(bookkeeping),
            "rollback_replay_by_positions_kept": {n: median_ms(v) for n, v in rollback.items()},
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def window_bytes(states: LinearStates) -> int:
    """One convolution window per layer (the second buffer is rollback's)."""
    return states.window[:, 0, 0].numel() * states.window.element_size()


def bookkeeping_of_one_step(states: LinearStates, slot: int, positions: int) -> None:
    """What a step does only so it can be rolled back: log each position's delta-rule
    and convolution inputs, in every layer."""
    for layer in range(states.num_layers):
        for log in (states.log_k, states.log_v, states.log_g, states.log_beta, states.log_conv):
            log[layer, slot, :positions].copy_(log[layer, slot, -positions:])


if __name__ == "__main__":
    main()
