"""The tagged-message KV protocol shared by the ucxx and mpi backends.

Both move block runs as *tagged point-to-point messages* (UCX tags, MPI tags); only how a
message is posted and progressed differs, which a backend's progress engine provides
(`ucxx_link.ProgressEngine`, `mpi_link.MpiEngine`: ``connect``, ``send_ctrl``, ``send``,
``recv``, ``track``, ``submit``, ``call``, ``close``, ``address``). All engine calls, and every
handler below, run on the engine's one progress thread.

Connection: `add_peer` opens an endpoint from the peer's address (in the signed handshake
metadata) and sends a *hello*: our agent name, a random link id, our address and an HMAC
over them and the peer's per-start nonce with the cluster token, plus the compat digest. The
peer verifies it, opens an endpoint back to us and answers ``ok`` (or ``e``, e.g. a compat
mismatch: `add_peer` raises `PeerAuthError`). A hello with a wrong MAC gets no endpoint and no
answer (its sender's `add_peer` times out). Only then does the peer accept transfers on that link.

Transfers (see `ucxx_wire` for the message format):

* **write**: header (remote ranges, first data slot, notification) then one data message
  per range; the owner posts a receive into its pool per range (after checking the ranges),
  and once all landed queues the notification and acks. Done = acked = in the peer's pool.
* **read**: the initiator posts receives into its pool, then sends the request; the owner
  sends its ranges and, once they have left its pool, queues the notification.
* **notify**: a control message; control messages of a link are ordered, so it follows
  every write already acked.

Write data and read data use separate slot ranges (`_OutLink.next_slots`), so the two
directions of one pair never share a tag. A failed endpoint (peer died) fails the link's
outstanding handles; `remove_peer` closes it.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from engine.kv_cache_pool import KVCachePool
from kvtransfer import ucxx_wire as wire
from kvtransfer.base import KVTransport, Op, TransferHandle, TransferPlan, TransportOptions
from kvtransfer.errors import KVTransferError, PeerAuthError, ProtocolError, TransferFailedError
from protocol import kv_handshake as handshake
from protocol.kv_handshake import PeerInfo

SLOT_SPAN = 1 << 18  # data slots per direction; MPI tags hold 2 * SLOT_SPAN of them


@dataclass(eq=False)
class _Pending:
    """Completion of one handle, set on the progress thread, read by the caller's thread."""

    parts: int
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    def part_done(self, error: str | None) -> None:
        if self.done.is_set():
            return
        self.parts -= 1
        if error is not None or self.parts <= 0:
            self.error = error
            self.done.set()


@dataclass(eq=False)
class _OutLink:
    """Our connection to a peer we initiate transfers to."""

    peer: str
    link: int
    ep: Any
    slots: count = field(default_factory=count)
    pending: dict[int, _Pending] = field(default_factory=dict)
    hello: Future | None = None
    dead: str | None = None
    ep_failed: bool = False  # closing an endpoint after its error callback crashes UCX

    def next_slots(self, n: int, read: bool) -> int:
        """``n`` consecutive data slots: writes in ``[0, SLOT_SPAN)``, reads in ``[SLOT_SPAN, 2 * SLOT_SPAN)``."""
        first = next(self.slots) % SLOT_SPAN
        if first + n > SLOT_SPAN:  # never wrap inside one message group
            first = 0
        for _ in range(n - 1):
            next(self.slots)
        return first + (SLOT_SPAN if read else 0)


@dataclass(eq=False)
class _InLink:
    """A peer's connection to us (after its hello was verified)."""

    peer: str
    ep: Any
    reads: dict[int, list[Any]] = field(default_factory=dict)  # id -> [parts in flight, notification]


class TaggedTransport(KVTransport):
    """`KVTransport` over a tagged-message engine (see the module docstring)."""

    def __init__(self, agent_name: str, options: TransportOptions | None = None) -> None:
        super().__init__(agent_name, options)
        self._nonce = secrets.token_bytes(16)
        self._views: wire.PoolViews | None = None
        self._out: dict[str, _OutLink] = {}
        self._out_by_link: dict[int, _OutLink] = {}
        self._in: dict[int, _InLink] = {}
        self._notifs: deque[tuple[str, bytes]] = deque()
        self._engine = self._make_engine()

    def _make_engine(self) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ set-up
    def _register(self, pool: KVCachePool) -> None:
        self._views = wire.PoolViews(pool)
        self._engine.pool_device(pool.kv.device)

    def _endpoint(self) -> dict[str, Any]:
        return {"address": self._engine.address, "nonce": self._nonce}

    def _connect(self, info: PeerInfo) -> None:
        address, nonce = info.endpoint.get("address"), info.endpoint.get("nonce")
        if not isinstance(address, bytes) or not isinstance(nonce, bytes):
            raise KVTransferError(f"peer {info.agent!r} sent no {self.name} address")
        link = secrets.randbits(32)
        hello = {"t": "h", "link": link, "agent": self.agent_name, "addr": self._engine.address,
                 "mac": wire.hello_mac(self.options.token, nonce, self.agent_name, link, self._engine.address),
                 "compat": handshake.compat_digest(self._compat)}

        def open_link() -> _OutLink:
            out = _OutLink(info.agent, link, self._engine.connect(address, link, None), hello=Future())
            self._out_by_link[link] = out
            self._engine.send_ctrl(out.ep, link, hello, lambda err: err and _settle(out.hello, err))
            return out

        out = self._engine.call(open_link)
        try:
            answer = out.hello.result(self.options.connect_timeout_s)  # type: ignore[union-attr]
        except TimeoutError:
            answer = "no answer to our hello"
        if answer != "ok":
            self._engine.call(lambda: self._drop_out(out, f"hello refused: {answer}"))
            raise PeerAuthError(f"peer {info.agent!r} refused us: {answer}")
        self._out[info.agent] = out

    def _disconnect(self, peer: str) -> None:
        out = self._out.pop(peer, None)
        if out is not None:
            self._engine.call(lambda: self._drop_out(out, "peer removed"))

    # ------------------------------------------------------------------ transfers
    def _start(
        self, handle: TransferHandle, info: PeerInfo, plan: TransferPlan, notify: bytes | None
    ) -> None:
        out, views = self._out[info.agent], self._views
        assert views is not None
        ranges = plan.ranges
        parts = range(0, len(ranges), wire.RANGES_PER_PART)
        pending = _Pending(len(parts))
        handle.state = pending
        if out.dead is not None:
            raise TransferFailedError(f"connection to {info.agent!r} is down: {out.dead}")

        def post() -> None:
            out.pending[handle.id] = pending
            for start in parts:
                end = min(start + wire.RANGES_PER_PART, len(ranges))
                local = [views.view(int(o), int(n)) for o, n in zip(ranges.local[start:end], ranges.nbytes[start:end])]
                slot0 = out.next_slots(len(local), plan.op is Op.READ)
                msg = {"t": "w" if plan.op is Op.WRITE else "r", "link": out.link, "id": handle.id,
                       "s": slot0, "nt": notify if end == len(ranges) else None,
                       **wire.pack_ranges(ranges.remote[start:end], ranges.nbytes[start:end])}
                self._post_part(out, pending, msg, local)

        self._engine.submit(post)

    def _post_part(self, out: _OutLink, pending: _Pending, msg: dict[str, Any], local: list[Any]) -> None:
        if out.dead is not None:
            pending.part_done(f"connection to {out.peer!r} is down: {out.dead}")
            return
        hid = msg["id"]

        def fail(error: str | None) -> None:
            if error is not None:
                self._part_done(out, hid, pending, error)

        if msg["t"] == "w":  # done on the owner's ack (`_on_answer`)
            self._engine.send_ctrl(out.ep, out.link, msg, fail)
            self._engine.track(self._engine.send(out.ep, out.link, msg["s"], local), fail, keep=local)
        else:  # receives first, so the owner's data never arrives unexpected; done once they land
            landed = lambda err: self._part_done(out, hid, pending, err)  # noqa: E731
            self._engine.track(self._engine.recv(out.ep, out.link, msg["s"], local), landed, keep=local)
            self._engine.send_ctrl(out.ep, out.link, msg, fail)

    @staticmethod
    def _part_done(out: _OutLink, hid: int, pending: _Pending, error: str | None) -> None:
        pending.part_done(error)
        if pending.done.is_set():
            out.pending.pop(hid, None)

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
        out = self._out[peer]
        if out.dead is not None:
            raise TransferFailedError(f"connection to {peer!r} is down: {out.dead}")
        self._engine.submit(lambda: self._engine.send_ctrl(out.ep, out.link, {"t": "n", "link": out.link,
                                                                              "m": bytes(msg)}))

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        out = []
        while self._notifs:
            out.append(self._notifs.popleft())
        return out

    # ------------------------------------------------------------------ control messages (progress thread)
    def _on_control(self, msg: dict[str, Any]) -> None:
        kind, link = msg["t"], msg["link"]
        if kind == "h":
            self._on_hello(msg)
        elif kind in ("ok", "a", "e") and link in self._out_by_link:
            self._on_answer(self._out_by_link[link], msg)
        elif link in self._in:
            inbound = self._in[link]
            try:
                {"w": self._on_write, "r": self._on_read, "n": self._on_notify}[kind](link, inbound, msg)
            except (ProtocolError, KeyError) as exc:
                self._engine.send_ctrl(inbound.ep, link, {"t": "e", "link": link, "id": msg.get("id"),
                                                          "why": str(exc)})
        # anything else: a link we do not know (closed, or never authenticated): ignored

    def _on_hello(self, msg: dict[str, Any]) -> None:
        link, agent, addr, mac = msg["link"], msg.get("agent"), msg.get("addr"), msg.get("mac")
        if not isinstance(agent, str) or not isinstance(addr, bytes) or not isinstance(mac, bytes):
            return
        if not hmac.compare_digest(wire.hello_mac(self.options.token, self._nonce, agent, link, addr), mac):
            return  # not from a cluster member: no endpoint to an address it chose, no answer
        ep = self._engine.connect(addr, link, msg)
        why = None
        if self._views is None:
            why = "no KV pool registered yet"
        elif msg.get("compat") != handshake.compat_digest(self._compat):
            why = "incompatible KV cache (compat key differs)"
        elif link in self._in:
            why = "link id already in use"
        if why is None:
            self._in[link] = _InLink(agent, ep)
        answer = {"t": "ok" if why is None else "e", "link": link, "why": why}
        self._engine.send_ctrl(ep, link, answer, None if why is None else lambda _err: ep.close())

    def _on_answer(self, out: _OutLink, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "ok" or (kind == "e" and msg.get("id") is None and out.hello and not out.hello.done()):
            _settle(out.hello, "ok" if kind == "ok" else str(msg.get("why")))
            return
        hid = msg.get("id")
        pending = out.pending.get(hid)  # type: ignore[arg-type]
        if pending is not None:
            self._part_done(out, hid, pending, None if kind == "a" else f"peer refused: {msg.get('why')}")  # type: ignore[arg-type]

    def _on_write(self, link: int, inbound: _InLink, msg: dict[str, Any]) -> None:
        assert self._views is not None
        offsets, nbytes = wire.unpack_ranges(msg)
        self._views.check(offsets, nbytes)
        views = [self._views.view(int(o), int(n)) for o, n in zip(offsets, nbytes)]
        nt, hid = msg.get("nt"), msg.get("id")

        def landed(error: str | None) -> None:
            if error is None and isinstance(nt, bytes):
                self._notifs.append((inbound.peer, nt))
            if link in self._in:
                answer = {"t": "a", "link": link, "id": hid} if error is None else {
                    "t": "e", "link": link, "id": hid, "why": error}
                self._engine.send_ctrl(inbound.ep, link, answer)

        self._engine.track(self._engine.recv(inbound.ep, link, int(msg["s"]), views), landed, keep=views)

    def _on_read(self, link: int, inbound: _InLink, msg: dict[str, Any]) -> None:
        assert self._views is not None
        offsets, nbytes = wire.unpack_ranges(msg)
        self._views.check(offsets, nbytes)
        views = [self._views.view(int(o), int(n)) for o, n in zip(offsets, nbytes)]
        nt = msg.get("nt")

        def sent(error: str | None) -> None:
            if error is None and isinstance(nt, bytes):
                self._notifs.append((inbound.peer, nt))  # our blocks are no longer needed

        self._engine.track(self._engine.send(inbound.ep, link, int(msg["s"]), views), sent, keep=views)

    def _on_notify(self, link: int, inbound: _InLink, msg: dict[str, Any]) -> None:
        m = msg.get("m")
        if not isinstance(m, bytes):
            raise ProtocolError("notification must be bytes")
        self._notifs.append((inbound.peer, m))

    def _on_ep_error(self, link: int, *_: Any) -> None:
        out = self._out_by_link.get(link)
        if out is not None:
            out.ep_failed = True
            self._drop_out(out, "endpoint failed (peer gone?)")
        self._in.pop(link, None)

    # ------------------------------------------------------------------ teardown (progress thread)
    def _drop_out(self, out: _OutLink, why: str) -> None:
        out.dead = out.dead or why
        self._out_by_link.pop(out.link, None)
        for pending in list(out.pending.values()):
            pending.part_done(f"connection to {out.peer!r} lost ({out.dead})")
        out.pending.clear()
        if out.hello is not None:
            _settle(out.hello, why)
        if not out.ep_failed:
            out.ep_failed = True  # closed once
            with contextlib.suppress(Exception):
                out.ep.close()

    def _shutdown(self) -> None:
        def drop_all() -> None:
            for inbound in self._in.values():
                with contextlib.suppress(Exception):
                    inbound.ep.close()
            self._in.clear()

        with contextlib.suppress(Exception):
            self._engine.call(drop_all, timeout=5)
        self._engine.close()


def _settle(fut: Future | None, value: str) -> None:
    if fut is not None and not fut.done():
        fut.set_result(value)
