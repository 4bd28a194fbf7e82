"""Every backend, same tests: two real worker processes, each with its own `KVCachePool`.

The pools differ in size (16 vs 24 blocks, so layer strides differ) and hold different random
data; every transfer is checked byte for byte on the destination, and everything else in
both pools must stay untouched.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest
import torch

from kvtransfer import (
    IncompatiblePeerError,
    PeerAuthError,
    TransportUnavailableError,
    UnknownTransportError,
    create_transport,
    known_transports,
    tcp_wire,
)
from kvtransfer.registry import TransportSpec, register_transport, unregister_transport
from protocol import kv_handshake as handshake
from tests.kvtransfer import peer_process
from tests.kvtransfer.mpi_peers import RankProcess, start_mpi_ranks
from tests.kvtransfer.peer_process import PeerSpec

BACKENDS = ["nixl", "tcp", "ucxx", "mpi"]
TIMEOUT = 30.0  # generous ceiling for one command; the whole file runs in seconds


class RemoteError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class Peer:
    """Test-side handle of one worker process."""

    def __init__(self, spec: PeerSpec, rank: tuple[Connection, RankProcess] | None = None) -> None:
        self.spec = spec
        self.proc: Any
        if rank is None:
            ctx = mp.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=peer_process.run, args=(spec, child), daemon=True)
            self.proc.start()
        else:  # a rank of an MPI job (`mpi_peers`): the mpi backend connects ranks of one job
            self.conn, self.proc = rank
        self.metadata = b""
        self.pid = 0

    def ready(self) -> Peer:
        assert self.conn.poll(TIMEOUT), f"{self.spec.agent} did not start"
        _, self.metadata, self.pid = self.conn.recv()
        if isinstance(self.proc, RankProcess):
            self.proc.pid = self.pid
        return self

    def call(self, cmd: str, *args: Any, timeout: float = TIMEOUT) -> Any:
        self.conn.send((cmd, args))
        assert self.conn.poll(timeout), f"{self.spec.agent} did not answer {cmd}"
        reply = self.conn.recv()
        if reply[0] == "err":
            raise RemoteError(reply[1], reply[2])
        return reply[1]

    def close(self) -> float:
        """Close the transport; the process must exit on its own, promptly and cleanly."""
        self.conn.send(("close", ()))
        assert self.conn.poll(TIMEOUT), f"{self.spec.agent} did not close"
        _, seconds = self.conn.recv()
        self.proc.join(TIMEOUT)
        assert self.proc.exitcode == 0, f"{self.spec.agent} exited with {self.proc.exitcode}"
        return seconds


def start_pair(backend: str, device: str = "cpu") -> tuple[Peer, Peer]:
    specs = [PeerSpec(backend, "prefill-0", num_blocks=16, seed=1, device=device),
             PeerSpec(backend, "decode-0", num_blocks=24, seed=2, device=device)]
    if backend == "mpi":
        conns, procs = start_mpi_ranks(specs)
        prefill, decode = (Peer(s, (c, p)) for s, c, p in zip(specs, conns, procs))
    else:
        prefill, decode = Peer(specs[0]), Peer(specs[1])
    prefill.ready(), decode.ready()
    assert prefill.call("add_peer", decode.metadata) == "decode-0"
    assert decode.call("add_peer", prefill.metadata) == "prefill-0"
    return prefill, decode


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Peer, Peer]]:
    prefill, decode = start_pair(request.param)
    yield prefill, decode
    for peer in (prefill, decode):
        if peer.proc.is_alive():
            assert peer.close() < 5.0


def expected_after(dst: torch.Tensor, src: torch.Tensor, src_blocks: Sequence[int],
                   dst_blocks: Sequence[int], layers: Sequence[int] | None) -> torch.Tensor:
    out = dst.clone()
    for layer in range(src.shape[0]) if layers is None else layers:
        out[layer, list(dst_blocks)] = src[layer, list(src_blocks)]
    return out


def push_and_check(prefill: Peer, decode: Peer, local: list[int], remote: list[int],
                   layers: list[int] | None) -> dict[str, Any]:
    src0, dst0 = prefill.call("snapshot"), decode.call("snapshot")
    info = prefill.call("write", "decode-0", local, remote, layers, None, TIMEOUT)
    assert torch.equal(decode.call("snapshot"), expected_after(dst0, src0, local, remote, layers))
    assert torch.equal(prefill.call("snapshot"), src0)
    return info


def test_push_one_layer_non_contiguous(pair: tuple[Peer, Peer]) -> None:
    prefill, decode = pair
    # pairs: 1→20 | 5→3, 6→4, 7→5 | 12→0 | 13→9 (local continues, remote does not)
    info = push_and_check(prefill, decode, [1, 5, 6, 7, 12, 13], [20, 3, 4, 5, 0, 9], layers=[2])
    assert info["nbytes"] == 6 * prefill.spec.layout.block_bytes_per_layer
    assert info["descriptors"] == 4
    if info["merged"] is not None:  # what NIXL actually posted
        assert info["merged"] == 4


def test_push_all_layers_contiguous(pair: tuple[Peer, Peer]) -> None:
    prefill, decode = pair
    info = push_and_check(prefill, decode, list(range(2, 10)), list(range(10, 18)), layers=None)
    assert info["descriptors"] == 4  # one run per layer
    if info["merged"] is not None:
        assert info["merged"] == 4


def test_push_some_layers_mixed(pair: tuple[Peer, Peer]) -> None:
    prefill, decode = pair
    # remote runs backwards (23, 22) and local jumps back (15, 4): four runs, in two layers
    info = push_and_check(prefill, decode, [0, 1, 15, 4], [23, 22, 6, 7], layers=[0, 3])
    assert info["descriptors"] == 2 * 4


def test_pull_with_notification(pair: tuple[Peer, Peer]) -> None:
    prefill, decode = pair
    remote, local, layers = [3, 4, 9], [7, 8, 1], [0, 3]
    src0, dst0 = prefill.call("snapshot"), decode.call("snapshot")
    info = decode.call("read", "prefill-0", remote, local, layers, b"read-done", TIMEOUT)
    assert info["descriptors"] == 2 * 2
    assert torch.equal(decode.call("snapshot"), expected_after(dst0, src0, remote, local, layers))
    assert torch.equal(prefill.call("snapshot"), src0)
    peer, msg, _ = prefill.call("wait_notification", 10.0)
    assert (peer, msg) == ("decode-0", b"read-done")


def test_notification_arrives_after_data(pair: tuple[Peer, Peer]) -> None:
    prefill, decode = pair
    local, remote = list(range(16)), list(range(8, 24))  # the whole source pool
    src0, dst0 = prefill.call("snapshot"), decode.call("snapshot")
    decode.conn.send(("wait_notification", (20.0,)))  # decode polls while prefill pushes
    prefill.call("write", "decode-0", local, remote, None, b"req-7:done", TIMEOUT)
    assert decode.conn.poll(TIMEOUT)
    reply = decode.conn.recv()
    assert reply[0] == "ok", reply
    peer, msg, seen = reply[1]
    assert (peer, msg) == ("prefill-0", b"req-7:done")
    assert torch.equal(seen, expected_after(dst0, src0, local, remote, None))
    # a standalone notification after a completed write
    prefill.call("notify", "decode-0", b"hello")
    assert decode.call("wait_notification", 10.0)[:2] == ("prefill-0", b"hello")


def test_empty_transfer_still_notifies(pair: tuple[Peer, Peer]) -> None:
    prefill, decode = pair
    info = prefill.call("write", "decode-0", [], [], None, b"nothing-to-send", TIMEOUT)
    assert info["nbytes"] == 0
    assert decode.call("wait_notification", 10.0)[:2] == ("prefill-0", b"nothing-to-send")


def test_bad_requests_are_refused(pair: tuple[Peer, Peer]) -> None:
    prefill, _ = pair
    cases = [
        (["decode-0", [0], [24], None], "ValueError"),  # decode has 24 blocks
        (["decode-0", [0, 1], [3, 3], None], "ValueError"),  # two sources into one block
        (["decode-0", [0], [1], [4]], "ValueError"),  # 4 layers
        (["decode-0", [0, 1], [1], None], "ValueError"),
        (["nobody", [0], [1], None], "UnknownPeerError"),
    ]
    for args, kind in cases:
        with pytest.raises(RemoteError) as err:
            prefill.call("write", *args, None, TIMEOUT)
        assert err.value.kind == kind


def test_incompatible_peer_is_refused(pair: tuple[Peer, Peer]) -> None:
    prefill, _ = pair
    backend = prefill.spec.backend
    odd = PeerSpec(backend, "odd-0", num_blocks=16, seed=3, num_kv_heads=4, model="other-model")
    transport, _ = peer_process.make_endpoint(odd)
    try:
        with pytest.raises(IncompatiblePeerError) as err:
            transport.add_peer(prefill.metadata)
        assert {"model", "kv.num_kv_heads", "kv.block_bytes"} == set(err.value.differences)
        assert "kv.num_kv_heads: ours=4 theirs=2" in str(err.value)
        with pytest.raises(RemoteError) as remote_err:  # and the other way round
            prefill.call("add_peer", transport.metadata())
        assert remote_err.value.kind == "IncompatiblePeerError"
    finally:
        transport.close()


def test_wrong_token_is_refused(pair: tuple[Peer, Peer]) -> None:
    prefill, _ = pair
    stranger = PeerSpec(prefill.spec.backend, "stranger-0", num_blocks=16, seed=4, token="not-the-token")
    transport, _ = peer_process.make_endpoint(stranger)
    try:
        with pytest.raises(PeerAuthError):
            transport.add_peer(prefill.metadata)
        with pytest.raises(RemoteError) as err:
            prefill.call("add_peer", transport.metadata())
        assert err.value.kind == "PeerAuthError"
    finally:
        transport.close()


def raw_tcp_hello(peer: Peer, token: str) -> tuple[socket.socket, dict[str, Any], handshake.PeerInfo]:
    """Speak the TCP backend's hello by hand, as a foreign client would."""
    info = handshake.decode(peer.metadata, peer.spec.token)
    sock = socket.create_connection((info.endpoint["host"], info.endpoint["port"]), timeout=5)
    nonce = tcp_wire.recv_header(sock)["nonce"]
    mac = tcp_wire.hello_mac(token, nonce, "intruder")
    tcp_wire.send_header(sock, {"t": "h", "agent": "intruder", "mac": mac,
                                "compat": handshake.compat_digest(info.compat)})
    return sock, tcp_wire.recv_header(sock), info


@pytest.mark.parametrize("pair", ["tcp"], indirect=True)
def test_tcp_connection_with_wrong_token_is_dropped(pair: tuple[Peer, Peer]) -> None:
    sock, answer, _ = raw_tcp_hello(pair[0], "guessed")
    with sock:
        assert answer == {"t": "e", "why": "wrong cluster token"}
        assert sock.recv(1) == b""  # closed before any pool byte could be written


@pytest.mark.parametrize("pair", ["tcp"], indirect=True)
def test_tcp_out_of_pool_write_is_refused(pair: tuple[Peer, Peer]) -> None:
    prefill, _ = pair
    before = prefill.call("snapshot")
    bb = prefill.spec.layout.block_bytes_per_layer
    nbytes = prefill.spec.layout.total_bytes
    for offset in (nbytes, nbytes - bb // 2, 1):  # past the end, straddling it, not block-aligned
        sock, answer, _ = raw_tcp_hello(prefill, prefill.spec.token)
        with sock:
            assert answer == {"t": "ok"}
            ranges = tcp_wire.pack_ranges(np.array([offset]), np.array([bb]))
            tcp_wire.send_header(sock, {"t": "w", "id": 7, "nt": b"evil", **ranges})
            sock.sendall(b"\xff" * bb)
            reply = tcp_wire.recv_header(sock)
            assert (reply["t"], reply["id"]) == ("e", 7) and "outside the pool" in reply["why"]
    assert torch.equal(prefill.call("snapshot"), before)
    assert prefill.call("poll") == []


def freeze(pid: int) -> None:
    """SIGSTOP, then wait until every thread is really stopped (the signal is asynchronous)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    tasks = f"/proc/{pid}/task"
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(tasks):
            with open(f"{tasks}/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(s in ("T", "t") for s in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop")


def freeze_then_resume(prefill: Peer, decode: Peer) -> None:
    """Freeze decode right after the handshake (stuck process, paused container), push, resume.

    While it is frozen the push cannot complete: TCP needs its ack, NIXL needs it to accept
    the UCX connection (wire-up happens on the first transfer). `wait` must give up on time
    and the handle stay valid: once the peer resumes, the same transfer lands and notifies.
    """
    src0, dst0 = prefill.call("snapshot"), decode.call("snapshot")
    local, remote = list(range(16)), list(range(24))[::-1][:16]
    freeze(decode.pid)
    try:
        info = prefill.call("write", "decode-0", local, remote, None, b"late", None)
        start = time.monotonic()
        with pytest.raises(RemoteError) as err:
            prefill.call("wait", info["id"], 0.5)
        assert err.value.kind == "TransferTimeoutError"
        assert time.monotonic() - start < 5
    finally:
        os.kill(decode.pid, signal.SIGCONT)
    prefill.call("wait", info["id"], TIMEOUT)
    assert decode.call("wait_notification", 10.0)[:2] == ("prefill-0", b"late")
    assert torch.equal(decode.call("snapshot"), expected_after(dst0, src0, local, remote, None))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "mpi"])
def test_hung_then_dead_peer(backend: str) -> None:
    """A decode worker that freezes, later resumes, and finally dies: a dead peer fails the
    next transfer instead of hanging it, and close still returns fast."""
    prefill, decode = start_pair(backend)
    freeze_then_resume(prefill, decode)
    decode.proc.kill()
    decode.proc.join(TIMEOUT)
    time.sleep(0.2)
    with pytest.raises(RemoteError) as err:
        info = prefill.call("write", "decode-0", [0, 1], [0, 1], None, b"x", None)
        prefill.call("wait", info["id"], 10.0)
    assert err.value.kind == "TransferFailedError"
    assert prefill.close() < 5.0


def test_mpi_hung_peer_resumes() -> None:
    """The frozen half only: MPI is not fault tolerant, a rank's death ends its job (MPICH and
    mpiexec take the other ranks down), so there is no surviving peer to fail a transfer; the
    decode side's leases are what protect memory from a stalled prefill rank."""
    prefill, decode = start_pair("mpi")
    freeze_then_resume(prefill, decode)
    for peer in (prefill, decode):
        assert peer.close() < 5.0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_pools(backend: str) -> None:
    """VRAM to VRAM (NIXL: CUDA IPC / UCX; TCP: through pinned host memory)."""
    prefill, decode = start_pair(backend, device="cuda")
    try:
        push_and_check(prefill, decode, [1, 5, 6, 7, 12, 13], [20, 3, 4, 5, 0, 9], layers=[2])
        push_and_check(prefill, decode, list(range(16)), list(range(8, 24)), layers=None)
        src0, dst0 = prefill.call("snapshot"), decode.call("snapshot")
        decode.call("read", "prefill-0", [3, 4, 9], [7, 8, 1], None, b"read-done", TIMEOUT)
        assert torch.equal(decode.call("snapshot"), expected_after(dst0, src0, [3, 4, 9], [7, 8, 1], None))
        assert prefill.call("wait_notification", 10.0)[:2] == ("decode-0", b"read-done")
    finally:
        for peer in (prefill, decode):
            assert peer.close() < 5.0


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(UnknownTransportError, match="known transports: mpi, nccl, nixl, tcp, ucxx"):
        create_transport("infiniband-magic", "a")
    assert {"mpi", "nccl", "nixl", "tcp", "ucxx"} <= set(known_transports())


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nixl", None)  # as if `nixl` were not installed
    monkeypatch.setitem(sys.modules, "nixl._api", None)
    with pytest.raises(TransportUnavailableError, match=r"pip install 'nixl>=0\.6'"):
        create_transport("nixl", "a")
    register_transport(TransportSpec("mpi-missing", "kvtransfer.mpi_backend", "MpiTransport", "no_mpi4py", "mpi4py"))
    try:
        with pytest.raises(TransportUnavailableError, match="mpi4py"):
            create_transport("mpi-missing", "a")
    finally:
        unregister_transport("mpi-missing")
