"""What a decode step costs beyond the model's compute, in three measurements:

1. The control split of a real daemon's steps (one int4 worker, `--streams` at once,
   MTP off and `auto` alternating by round): daemon submit to the worker's arrival, the
   worker's checks, its compute and the MTP head's share of it, the reply back to the
   daemon, and the daemon's gap to its next submit (the workers' and the daemon's
   time.monotonic() are the host's one clock). Then where each configuration's whole
   wall time went, in sums, not medians: steps with a prompt's rows, steps where some
   sequence drafted, plain decode steps, and the time between steps.
2. The floor under it: a thread handoff, and a round trip between two Python processes
   over a unix socket with the step socket's frames (local workers' step stream since
   session 27) and over a bare gRPC bidirectional stream, sync API at both ends (remote
   workers').
3. What keeping the MTP head's entries costs a worker while nothing drafts: `Stage.run`
   with MTP on at k = 0 against MTP off, alternated step by step, `--sequences` each.

    python benchmarks/step_overhead.py [--rounds 4] [--streams 1,8] [--sequences 1,8]
                                       [--steps 120]

Written for issue 24 (docs/speculative-decoding.md, sessions 19 and 20). Run it alone.
"""

from __future__ import annotations

import argparse
import itertools
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from draft_pass import GREEDY, PROMPT, int4_tail_stage  # this folder's

from mtpd import step_socket
from mtpd.bench.commands import DEFAULT_PROMPTS
from mtpd.bench.runner import MAX_DECODE_ROWS, decode_steps, run_config
from mtpd.daemon.coordinator import Coordinator, Settings
from mtpd.daemon.draft_policy import AUTO, DraftPolicy
from mtpd.daemon.pipeline import PipelineConfig
from mtpd.v1 import worker_pb2 as pb

_ECHO = "/echo.Echo/Chat"


def control_split(rounds: int, streams: list[int]) -> None:
    """Decoding steps of all `n` streams. The MTP head's share is its passes, or where
    it made none (`auto` at k = 0 everywhere, as at 8 int4 streams) its keeping of
    the entries held back."""
    settings = Settings(
        pipeline=PipelineConfig(workers=1, quant="int4", device="cpu"), draft_tokens=AUTO
    )
    parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    # Per configuration: wall seconds, then (steps, seconds) by kind of step.
    totals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    with Coordinator.start(settings) as daemon:
        tok = daemon.tokenizer
        prompts = [tok.encode_chat([{"role": "user", "content": t}])[1] for t in DEFAULT_PROMPTS]
        policy = DraftPolicy(AUTO)  # one for the whole run, as a daemon keeps one
        run_config(daemon.pipeline, prompts[:1], AUTO, 1, 8, policy=policy)  # warm-up
        for n, r in itertools.product(streams, range(rounds)):
            for draft in (0, AUTO) if r % 2 == 0 else (AUTO, 0):
                run = run_config(
                    daemon.pipeline,
                    prompts * (2 if n > 1 else 1),
                    draft,
                    n,
                    64,
                    policy=policy if draft == AUTO else None,
                    lookahead=False,  # it hides the control this splits
                )
                kinds = totals[f"{n} stream(s), drafts {draft}"]
                kinds["wall"][1] += run.wall_s
                for step in run.steps:
                    rows = max(sent for _, sent in step.tokens)
                    kind = "prompt rows" if rows > MAX_DECODE_ROWS else "plain decode"
                    kind = "some drafting" if 1 < rows <= MAX_DECODE_ROWS else kind
                    kinds[kind][0] += 1
                    kinds[kind][1] += step.outcome.duration
                steps = decode_steps(run.steps)
                for step, after in itertools.pairwise(steps):
                    o, t = step.outcome, step.outcome.timings[0]
                    gap = after.outcome.submitted_at - o.completed_at
                    if len(step.tokens) != n or gap > 0.005:  # a prefill came between
                        continue
                    p = parts[f"{n} stream(s), drafts {draft}"]
                    p["submit to worker"].append(t.arrived_at - o.submitted_at)
                    p["worker's checks"].append(t.input_ready_at - t.arrived_at)
                    p["compute (less the head)"].append(t.compute_s - t.draft_s)
                    p["MTP head"].append(t.draft_s)
                    p["reply to daemon"].append(o.completed_at - t.sent_at)
                    p["daemon's gap"].append(gap)
    for config, p in parts.items():
        count = len(next(iter(p.values())))
        print(f"int4, {config}: median ms over {count} steps")
        for name, values in p.items():
            print(f"    {name:24s} {1e3 * statistics.median(values):7.3f}")
    for config, kinds in totals.items():
        wall = kinds.pop("wall")[1]
        between = wall - sum(seconds for _, seconds in kinds.values())
        print(f"int4, {config}: {wall:.3f} s of wall time")
        for kind, (count, seconds) in sorted(kinds.items()):
            print(
                f"    {kind:16s} {count:6d} steps {seconds:8.3f} s  mean {1e3 * seconds / count:7.3f} ms"
            )
        print(f"    {'between steps':16s} {'':12s} {between:8.3f} s")


def _echo_server(path: str) -> None:
    def echo(requests, context):
        yield from requests

    server = grpc.server(futures.ThreadPoolExecutor(4))
    handler = grpc.stream_stream_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("echo.Echo", {"Chat": handler}),)
    )
    server.add_insecure_port(f"unix:{path}")
    server.start()
    print("up", flush=True)
    server.wait_for_termination()


def _echo_socket(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("up", flush=True)
    conn, _ = listener.accept()
    while (frame := step_socket.read_frame(conn)) is not None:
        step_socket.send_frame(conn, *frame)


def _round_trips(server_flag: str, trips: int, trip: Callable[[str], Callable[[], None]]) -> float:
    """The median seconds of `trips` round trips to an echo server started with
    `server_flag`: `trip(path)` connects and returns one round trip."""
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "echo.sock")
        server = subprocess.Popen(
            [sys.executable, __file__, server_flag, path], stdout=subprocess.PIPE
        )
        try:
            server.stdout.readline()
            one = trip(path)
            times = []
            for _ in range(trips):
                start = time.perf_counter()
                one()
                times.append(time.perf_counter() - start)
        finally:
            server.kill()
    return statistics.median(times)


def transport_floor(trips: int = 3000) -> None:
    there, back = queue.SimpleQueue(), queue.SimpleQueue()

    def bounce() -> None:
        while (item := there.get()) is not None:
            back.put(item)

    thread = threading.Thread(target=bounce)
    thread.start()
    times = []
    for i in range(trips):
        start = time.perf_counter()
        there.put(i)
        back.get()
        times.append(time.perf_counter() - start)
    there.put(None)
    thread.join()
    print(f"thread handoff there and back: {1e6 * statistics.median(times):.0f} us")

    def over_socket(path: str) -> Callable[[], None]:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)

        def one() -> None:
            step_socket.send_frame(conn, step_socket.MESSAGE, b"x" * 200)
            step_socket.read_frame(conn)

        return one

    def over_grpc(path: str) -> Callable[[], None]:
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        channel = grpc.insecure_channel(f"unix:{path}")  # closed with the process
        replies = channel.stream_stream(_ECHO)(iter(outbox.get, None))

        def one() -> None:
            outbox.put(b"x" * 200)
            next(replies)

        return one

    unix = _round_trips("--echo-socket", trips, over_socket)
    print(f"step socket round trip (200 B frames, unix socket): {1e6 * unix:.0f} us")
    stream = _round_trips("--echo-server", trips, over_grpc)
    print(
        f"gRPC bidirectional stream round trip (200 B, unix socket, sync API at both ends): "
        f"{1e6 * stream:.0f} us"
    )


def keeping_cost(sequences: list[int], steps: int) -> None:
    stage = int4_tail_stage(2 * max(sequences))
    for n in sequences:
        stage.reset(None)
        state: dict[str, dict[str, tuple[int, int]]] = {}
        for mode in ("off", "on"):
            ids = [f"{mode}{i}" for i in range(n)]
            opened = [pb.SequenceOpen(seq_id=s, sampling=GREEDY, no_mtp=mode == "off") for s in ids]
            first = [pb.SequenceStep(seq_id=s, keep=0, token_ids=PROMPT, sample=True) for s in ids]
            reply = stage.run(pb.StepRequest(step_id=1, sequences=first, open=opened))
            state[mode] = {r.seq_id: (len(PROMPT), r.token_ids[-1]) for r in reply.results}
        times: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(steps):
            for mode in ("off", "on") if i % 2 else ("on", "off"):
                held = state[mode]
                if i % 100 == 99:  # back to the prompt: contexts stay alike and bounded
                    held.update({s: (len(PROMPT), t) for s, (_, t) in held.items()})
                step = [
                    pb.SequenceStep(seq_id=s, keep=k, token_ids=[t], sample=True)
                    for s, (k, t) in held.items()
                ]
                start = time.perf_counter()
                reply = stage.run(pb.StepRequest(step_id=2, sequences=step))
                times[mode].append(time.perf_counter() - start)
                for r in reply.results:
                    held[r.seq_id] = (held[r.seq_id][0] + 1, r.token_ids[-1])
        off, on = (statistics.median(times[m]) for m in ("off", "on"))
        print(
            f"Stage.run, {n} sequence(s), no drafts: MTP off {1e3 * off:.3f} ms, "
            f"MTP on {1e3 * on:.3f} ms ({on / off:.3f}x)"
        )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":
        _echo_server(sys.argv[2])
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-socket":
        _echo_socket(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--sequences", default="1,8")
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()
    control_split(args.rounds, [int(n) for n in args.streams.split(",")])
    transport_floor()
    keeping_cost([int(n) for n in args.sequences.split(",")], args.steps)


if __name__ == "__main__":
    main()
