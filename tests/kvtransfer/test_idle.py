"""An idle transport costs no CPU: its threads block on events, none spins.

NIXL's progress thread used to busy-poll its UCX workers (the Python wrapper sets the poll
timeout to 0): a whole core per worker while no request ran. Two connected transports sit in
this process, one write goes through (so UCX endpoints and TCP links exist), then the process
must stay under 2 % of a core for a few idle seconds.
"""

from __future__ import annotations

import time

import psutil
import pytest

from tests.kvtransfer.peer_process import PeerSpec, make_endpoint

IDLE_S = 3.0
BUDGET = 0.02  # of one core


@pytest.mark.parametrize("backend", ["nixl", "tcp", "ucxx", "mpi"])
def test_connected_idle_transports_use_no_cpu(backend: str) -> None:
    a, _ = make_endpoint(PeerSpec(backend, "prefill-idle", num_blocks=8, seed=1))
    b, _ = make_endpoint(PeerSpec(backend, "decode-idle", num_blocks=8, seed=2))
    try:
        peer = a.add_peer(b.metadata())
        b.add_peer(a.metadata())
        a.wait(a.write_blocks(peer, [0, 1], [2, 3], notify=b"done"), timeout=30)
        deadline = time.monotonic() + 30
        while not b.poll_notifications():  # the notification arrives while b only polls
            assert time.monotonic() < deadline, "no notification"
            time.sleep(0.001)
        me = psutil.Process()
        time.sleep(0.5)
        before, t0 = me.cpu_times(), time.monotonic()
        time.sleep(IDLE_S)
        after, wall = me.cpu_times(), time.monotonic() - t0
        used = (after.user + after.system - before.user - before.system) / wall
        assert used < BUDGET, f"{backend}: {100 * used:.1f}% of a core while idle"
    finally:
        a.close()
        b.close()
