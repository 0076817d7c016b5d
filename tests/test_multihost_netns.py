"""Several hosts, as network namespaces joined by a bridge: the daemon in one, each
remote worker in its own, an outsider in another on the same network. The pipeline
generates the local pipeline's tokens; a killed worker is replaced by one from a new
host and the output is unchanged; the outsider is refused by the registry (joins and
the rendezvous store alike) and by each worker before anything is parsed; the daemon
listens on the --join-listen address only. Nothing touches the root namespace's
network: a bridge in a namespace of its own, no default route, all removed after."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.client import Client

SUBNET = "10.231.7"
ROLES = {"daemon": 1, "w1": 2, "w2": 3, "w3": 4, "out": 5}
PROMPT = ["abracadabra", "--raw", "--max-tokens", "16", "--json", "--device", "cpu"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts():
    """Namespace names by role, with addresses SUBNET.N on one bridge."""
    usable = os.geteuid() == 0 and shutil.which("ip") is not None
    if usable:
        probe = f"mtpdprobe{os.getpid()}"
        usable = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
        if usable:
            _ip("netns", "del", probe)
    if not usable:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root with iproute2: network namespaces must work there")
        pytest.skip("needs root and `ip netns` (iproute2)")
    tag = f"m{os.getpid() % 100000}"
    names = {role: f"{tag}{role}" for role in [*ROLES, "br"]}
    made = []
    try:
        for name in names.values():
            _ip("netns", "add", name)
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")  # `ip netns add` leaves it down
        bridge = names["br"]
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for role, n in ROLES.items():
            ns, port, end = names[role], f"p{tag}{n}", f"v{n}"
            _ip("-n", bridge, "link", "add", port, "type", "veth", "peer", "name", end, "netns", ns)
            _ip("-n", bridge, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{n}/24", "dev", end)
            _ip("-n", ns, "link", "set", end, "up")
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _in(ns: str, *command: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *command], **kwargs)


OUTSIDER = """
import json, sys, grpc
from mtpd.v1 import worker_pb2 as pb
codes = {}
def call(address, method, payload):
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary(method, request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
        try:
            raw(payload, timeout=20)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name
registry, workers = sys.argv[1], sys.argv[2:]
get = pb.StoreRequest(op=pb.StoreRequest.OP_GET, keys=["0"]).SerializeToString()
codes["join"] = call(registry, "/mtpd.v1.WorkerRegistry/Join", b"\\xff" * 1000)
codes["store"] = call(registry, "/mtpd.v1.WorkerRegistry/Store", get)
codes["workers"] = [call(w, "/mtpd.v1.Worker/Load", b"\\xff" * 1000) for w in workers]
print(json.dumps(codes))
"""


def test_a_pipeline_across_hosts_holds_and_keeps_outsiders_out(hosts, tmp_path):
    model = tmp_path / "model"
    write_tiny_model(model, "llama", layers=4, vocab=98)
    write_char_tokenizer(model)
    token = tmp_path / "token"
    token.write_text("across-hosts\n")
    mtpd = [sys.executable, "-m", "mtpd"]
    run = subprocess.run(
        [*mtpd, "run", "--model", str(model), *PROMPT, "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    local = json.loads(run.stdout)["token_ids"]

    join = f"{SUBNET}.{ROLES['daemon']}:7400"
    socket = tmp_path / "mtpd.sock"
    log = (tmp_path / "daemon.log").open("w")
    serve = [*mtpd, "serve", "--model", str(model), "--workers", "2", "--device", "cpu"]
    serve += ["--join-listen", join, "--token-file", str(token), "--socket", str(socket)]
    serve += ["--rejoin-timeout", "120", "--threads", "1"]
    processes = [_in(hosts["daemon"], *serve, stderr=log)]

    def worker(role: str) -> tuple[subprocess.Popen, str]:
        listen = f"{SUBNET}.{ROLES[role]}:7500"
        command = [*mtpd, "worker", "--listen", listen, "--join", join, "--threads", "1"]
        command += ["--token-file", str(token), "--model", str(model)]
        process = _in(hosts[role], *command, stderr=subprocess.DEVNULL)
        processes.append(process)
        return process, listen

    try:
        (_, first), (second, listen_2) = worker("w1"), worker("w2")
        with Client(str(socket), timeout=120) as client:
            client.wait_ready(timeout=300)
            ask = {"max_tokens": 16, "ignore_eos": True}
            assert client.generate("abracadabra", **ask).token_ids == local
            # In the daemon's host only the --join-listen address listens (the registry,
            # the rendezvous store with it).
            sockets = subprocess.run(
                ["ip", "netns", "exec", hosts["daemon"], "ss", "-ltnH"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split("\n")
            listening = {line.split()[3] for line in sockets if line.strip()}
            assert listening in ({join}, {f"[::ffff:{SUBNET}.1]:7400"}), listening

            outsider = _in(
                hosts["out"],
                sys.executable,
                "-c",
                OUTSIDER,
                join,
                first,
                listen_2,
                stdout=subprocess.PIPE,
                text=True,
            )
            codes = json.loads(outsider.communicate(timeout=120)[0])
            assert codes == {
                "join": "UNAUTHENTICATED",
                "store": "UNAUTHENTICATED",
                "workers": ["UNAUTHENTICATED", "UNAUTHENTICATED"],
            }

            # A worker dies; its replacement joins from another host.
            second.kill()
            second.wait(timeout=30)  # dead before the next request
            worker("w3")
            deadline = time.monotonic() + 180
            while True:
                try:
                    result = client.generate("abracadabra", timeout=60, **ask)
                    break
                except Exception:
                    assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
                    time.sleep(1)
            assert result.token_ids == local
            # (ranks follow the join order: the killed one may be either)
            assert sum(w.restarts for w in client.stats().workers) == 1
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)
        log.close()
        Path(socket).unlink(missing_ok=True)
