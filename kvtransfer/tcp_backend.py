"""TCP backend: the standard library and torch only, for machines without UCX.

Each transport listens on one socket (port 0 picks a free one, advertised in `metadata()`).
Adding a peer opens one connection to it, owned by the initiator, with two threads: a
sender that streams frames in call order (block bytes sent straight from pool memory) and a
receiver for acks and read data. The owner serves each accepted connection on its own thread:
it copies written bytes into its pool at the requested blocks, then queues the attached
notification, then acks. One ordered stream per peer is what makes "notification after
data" hold, and a write counts as done only on the ack, i.e. once the bytes are in the peer's
pool (the same meaning as an RDMA write's remote completion).

Peers authenticate with an HMAC challenge over the cluster token and a compat digest; a wrong
token or key closes the connection before any pool byte is touched, and every range a peer
sends is bounds- and alignment-checked against our pool.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.kv_cache_pool import KVCachePool
from kvtransfer.base import KVTransport, Op, TransferHandle, TransferPlan, TransportOptions
from kvtransfer.errors import KVTransferError, PeerAuthError, ProtocolError, TransferFailedError
from kvtransfer.tcp_wire import (
    PoolBytes,
    hello_mac,
    pack_ranges,
    recv_header,
    send_header,
    unpack_ranges,
)
from protocol import kv_handshake as handshake
from protocol.kv_handshake import PeerInfo


@dataclass(eq=False)
class _Pending:
    """Completion state of one handle, set by a link's threads, read by the caller's thread."""

    op: Op
    local: tuple[np.ndarray, np.ndarray]  # our byte ranges (offsets, nbytes)
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    def finish(self, error: str | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class _PeerLink:
    """Our outgoing connection to one peer: a sender thread and a receiver thread."""

    def __init__(self, peer: str, sock: socket.socket, pool: PoolBytes) -> None:
        self.peer, self.sock = peer, sock
        self._send_bytes, self._recv_bytes = pool.fork(), pool.fork()
        self._jobs: queue.SimpleQueue[tuple[dict[str, Any], _Pending | None] | None] = queue.SimpleQueue()
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self.dead: str | None = None
        self._threads = [
            threading.Thread(target=self._send_loop, name=f"kv-tcp-send-{peer}", daemon=True),
            threading.Thread(target=self._recv_loop, name=f"kv-tcp-recv-{peer}", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def submit(self, header: dict[str, Any], pending: _Pending | None) -> None:
        with self._lock:  # checked under the lock `_die` takes, so no pending is ever orphaned
            if self.dead is not None:
                raise TransferFailedError(f"connection to {self.peer!r} is down: {self.dead}")
            if pending is not None:
                self._pending[header["id"]] = pending
        self._jobs.put((header, pending))

    def _send_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            header, pending = job
            try:
                send_header(self.sock, header)
                if header["t"] == "w" and pending is not None:
                    self._send_bytes.send(self.sock, *pending.local)
            except OSError as exc:
                self._die(f"send failed: {exc}")
                return

    def _recv_loop(self) -> None:
        pending: _Pending | None = None
        try:
            while True:
                header = recv_header(self.sock)
                kind, hid = header["t"], header.get("id")
                with self._lock:
                    pending = self._pending.pop(hid, None) if isinstance(hid, int) else None
                if pending is None:
                    raise ProtocolError(f"peer sent {kind!r} ({header.get('why')}) for no known transfer")
                if kind == "d":
                    self._recv_bytes.recv(self.sock, *pending.local)
                pending.finish(None if kind in ("a", "d") else f"peer refused: {header.get('why')}")
        except (OSError, KVTransferError, ValueError) as exc:
            if pending is not None:  # popped, so `_die` would not see it: a read cut off mid-data
                pending.finish(f"connection to {self.peer!r} lost: {exc}")
            self._die(f"{type(exc).__name__}: {exc}")

    def _die(self, why: str) -> None:
        with self._lock:
            self.dead = self.dead or why
            pending, self._pending = list(self._pending.values()), {}
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        for p in pending:
            p.finish(f"connection to {self.peer!r} lost ({self.dead})")

    def close(self) -> None:
        self._die("peer removed")
        self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self.sock.close()


class TcpTransport(KVTransport):
    """`KVTransport` over plain TCP sockets (no dependency beyond the standard library and torch)."""

    name = "tcp"

    def __init__(self, agent_name: str, options: TransportOptions | None = None) -> None:
        super().__init__(agent_name, options)
        self._listener = socket.create_server((self.options.host, self.options.port), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._bytes: PoolBytes | None = None
        self._links: dict[str, _PeerLink] = {}
        self._served: set[socket.socket] = set()
        self._serve_threads: list[threading.Thread] = []
        self._notifs: deque[tuple[str, bytes]] = deque()
        self._guard = threading.Lock()
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="kv-tcp-accept", daemon=True)
        self._acceptor.start()

    # ------------------------------------------------------------------ set-up
    def _register(self, pool: KVCachePool) -> None:
        self._bytes = PoolBytes(pool)

    def _endpoint(self) -> dict[str, Any]:
        host = self.options.advertise_host or self.options.host
        if host in ("", "0.0.0.0", "::"):  # listening on every interface: peers dial our name
            host = socket.gethostname()
        return {"host": host, "port": self.port}

    def _connect(self, info: PeerInfo) -> None:
        host, port = info.endpoint.get("host"), info.endpoint.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise KVTransferError(f"peer {info.agent!r} sent no TCP endpoint")
        try:
            sock = socket.create_connection((host, port), timeout=self.options.connect_timeout_s)
            challenge = recv_header(sock)
            nonce = challenge.get("nonce")
            if challenge["t"] != "c" or not isinstance(nonce, bytes):
                raise ProtocolError(f"peer {info.agent!r} did not start with a challenge")
            mac = hello_mac(self.options.token, nonce, self.agent_name)
            compat = handshake.compat_digest(self._compat)
            send_header(sock, {"t": "h", "agent": self.agent_name, "mac": mac, "compat": compat})
            answer = recv_header(sock)
        except (OSError, ProtocolError) as exc:
            raise KVTransferError(f"cannot connect to peer {info.agent!r} at {host}:{port}: {exc}") from exc
        if answer["t"] != "ok":
            sock.close()
            raise PeerAuthError(f"peer {info.agent!r} refused us: {answer.get('why')}")
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self._bytes is not None
        self._links[info.agent] = _PeerLink(info.agent, sock, self._bytes)

    def _disconnect(self, peer: str) -> None:
        link = self._links.pop(peer, None)
        if link is not None:
            link.close()

    # ------------------------------------------------------------------ transfers
    def _start(
        self, handle: TransferHandle, info: PeerInfo, plan: TransferPlan, notify: bytes | None
    ) -> None:
        ranges = plan.ranges
        pending = _Pending(plan.op, (ranges.local, ranges.nbytes))
        handle.state = pending
        header = {"t": "w" if plan.op is Op.WRITE else "r", "id": handle.id, "nt": notify,
                  **pack_ranges(ranges.remote, ranges.nbytes)}
        self._links[info.agent].submit(header, pending)

    def _check(self, handle: TransferHandle) -> bool:
        pending: _Pending = handle.state
        if not pending.done.is_set():
            return False
        if pending.error is not None:
            raise TransferFailedError(f"{handle.op.value} {handle.id} to {handle.peer!r}: {pending.error}")
        return True

    def _block(self, handle: TransferHandle, seconds: float) -> None:
        handle.state.done.wait(seconds)

    def notify(self, peer: str, msg: bytes) -> None:
        self._peer(peer)
        self._links[peer].submit({"t": "n", "m": bytes(msg)}, None)

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        out = []
        while self._notifs:
            out.append(self._notifs.popleft())
        return out

    # ------------------------------------------------------------------ serving peers
    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            t = threading.Thread(target=self._serve, args=(conn,), name="kv-tcp-serve", daemon=True)
            with self._guard:
                self._served.add(conn)
                self._serve_threads = [*(x for x in self._serve_threads if x.is_alive()), t]
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        """One peer's connection: authenticate, then apply its frames in order until it closes."""
        try:
            conn.settimeout(self.options.connect_timeout_s)
            peer = self._authenticate(conn)
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert self._bytes is not None  # _authenticate refuses peers before register_pool
            pool = self._bytes.fork()
            handlers: dict[str, Callable[[socket.socket, str, PoolBytes, dict[str, Any]], None]] = {
                "w": self._on_write, "r": self._on_read, "n": self._on_notify,
            }
            while True:
                header = recv_header(conn)
                try:
                    handler = handlers.get(header["t"])
                    if handler is None:
                        raise ProtocolError(f"unknown frame type {header['t']!r}")
                    handler(conn, peer, pool, header)
                except ProtocolError as exc:  # tell the initiator why, then drop the connection
                    send_header(conn, {"t": "e", "id": header.get("id"), "why": str(exc)})
                    raise
        except (OSError, KVTransferError, ValueError):
            pass  # peer gone or misbehaving: drop the connection; its initiator sees the failure
        finally:
            with self._guard:
                self._served.discard(conn)
            conn.close()

    def _authenticate(self, conn: socket.socket) -> str:
        nonce = os.urandom(16)
        send_header(conn, {"t": "c", "nonce": nonce})
        hello = recv_header(conn)
        agent, mac = hello.get("agent"), hello.get("mac")
        why = None
        if hello["t"] != "h" or not isinstance(agent, str) or not isinstance(mac, bytes):
            why = "malformed hello"
        elif not hmac.compare_digest(hello_mac(self.options.token, nonce, agent), mac):
            why = "wrong cluster token"
        elif self._bytes is None:
            why = "no KV pool registered yet"
        elif hello.get("compat") != handshake.compat_digest(self._compat):
            why = "incompatible KV cache (compat key differs)"
        if why is not None:
            send_header(conn, {"t": "e", "why": why})
            raise PeerAuthError(why)
        send_header(conn, {"t": "ok"})
        return agent

    def _on_write(self, conn: socket.socket, peer: str, pool: PoolBytes, header: dict[str, Any]) -> None:
        offsets, nbytes = unpack_ranges(header)
        pool.check(offsets, nbytes)
        pool.recv(conn, offsets, nbytes)
        self._queue_notification(peer, header.get("nt"))
        send_header(conn, {"t": "a", "id": header.get("id")})

    def _on_read(self, conn: socket.socket, peer: str, pool: PoolBytes, header: dict[str, Any]) -> None:
        offsets, nbytes = unpack_ranges(header)
        pool.check(offsets, nbytes)
        send_header(conn, {"t": "d", "id": header.get("id")})
        pool.send(conn, offsets, nbytes)
        self._queue_notification(peer, header.get("nt"))  # our blocks are no longer needed

    def _on_notify(self, conn: socket.socket, peer: str, pool: PoolBytes, header: dict[str, Any]) -> None:
        self._queue_notification(peer, header.get("m"))

    def _queue_notification(self, peer: str, msg: object) -> None:
        if msg is None:
            return
        if not isinstance(msg, bytes):
            raise ProtocolError("notification must be bytes")
        self._notifs.append((peer, msg))

    # ------------------------------------------------------------------ teardown
    def _shutdown(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(timeout=5)
        with self._guard:
            served, threads = list(self._served), list(self._serve_threads)
        for conn in served:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout=5)
