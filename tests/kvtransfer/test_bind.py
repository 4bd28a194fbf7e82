"""A transport whose host is loopback listens on loopback only: UCX (under NIXL) would otherwise
listen on every network device of the machine (issue 15 saw it on the external interface).

Each case runs in a fresh process (UCX reads its environment once per process), without any
``UCX_NET_DEVICES`` of ours, connects two transports, writes once (so UCX endpoints exist), and
reports every listening socket of the process."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import json, os, sys, time
import psutil
from tests.kvtransfer.peer_process import PeerSpec, make_endpoint
a, _ = make_endpoint(PeerSpec(sys.argv[1], "bind-a", num_blocks=8, seed=1))
b, _ = make_endpoint(PeerSpec(sys.argv[1], "bind-b", num_blocks=8, seed=2))
peer = a.add_peer(b.metadata())
b.add_peer(a.metadata())
a.wait(a.write_blocks(peer, [0, 1], [2, 3], notify=b"done"), timeout=30)
listening = [c.laddr.ip for c in psutil.Process().net_connections(kind="inet") if c.status == "LISTEN"]
print(json.dumps({"listening": listening, "ucx_net_devices": os.environ.get("UCX_NET_DEVICES")}))
a.close(); b.close()
"""


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket's view
    return (mapped or addr).is_loopback


@pytest.mark.parametrize("backend", ["nixl", "tcp", "ucxx", "mpi"])
def test_loopback_host_listens_on_loopback_only(backend: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", _CHILD, backend], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["listening"], "the transports listen somewhere"
    assert all(_loopback(ip) for ip in report["listening"]), report
    if backend == "nixl":
        assert report["ucx_net_devices"] == "lo"
