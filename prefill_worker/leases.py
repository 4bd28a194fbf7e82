"""`LeaseRenewer`: keeps decode's blocks held for our queued and in-flight jobs.

Decode holds a prompt's blocks for us only on a lease (see `decode_worker.leases`). This
thread renews every decode peer's leases, one ``RenewLease`` RPC per peer every third of the
lease. Decode answers with the ids it no longer holds (finished, aborted, expired): we drop
those. A decode worker that stays unreachable for a whole lease has freed our blocks (or is
dead), so its jobs are dropped too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from protocol.grpc_auth import token_channel
from protocol.proto import worker_pb2 as pb
from protocol.proto import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

LeaseView = Callable[[], dict[str, tuple[float, list[str]]] | None]  # address -> (lease_s, ids)


class LeaseRenewer:
    def __init__(
        self, view: LeaseView, drop: Callable[[str], object], token: str, tick_s: float = 0.1
    ) -> None:
        self._view = view
        self._drop = drop
        self._token = token
        self._tick = tick_s
        self._stubs: dict[str, tuple[grpc.Channel, pb_grpc.DecodeWorkerStub]] = {}
        self._last_try: dict[str, float] = {}
        self._last_ok: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        for channel, _ in self._stubs.values():
            channel.close()

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            try:
                self.renew_due(time.monotonic())
            except Exception:
                log.exception("lease renewal failed")

    def renew_due(self, now: float) -> None:
        view = self._view() or {}
        for address in list(self._last_try):
            if address not in view:  # no more jobs there: start afresh next time
                del self._last_try[address]
                self._last_ok.pop(address, None)
        for address, (lease_s, ids) in view.items():
            if now - self._last_try.get(address, -1e9) < lease_s / 3:
                continue
            self._last_try[address] = now
            self._last_ok.setdefault(address, now)
            self._renew(address, lease_s, ids, now)

    def _renew(self, address: str, lease_s: float, ids: list[str], now: float) -> None:
        try:
            reply = self._stub(address).RenewLease(pb.LeaseRequest(request_ids=ids), timeout=lease_s / 3)
        except grpc.RpcError as e:
            if now - self._last_ok[address] > lease_s:
                log.warning("decode %s unreachable for %.1fs (%s): dropping %d jobs", address,
                            now - self._last_ok[address], e.code().name, len(ids))
                for rid in ids:
                    self._drop(rid)
            return
        self._last_ok[address] = now
        for rid in reply.expired:
            self._drop(rid)

    def _stub(self, address: str) -> pb_grpc.DecodeWorkerStub:
        if address not in self._stubs:
            channel = token_channel(address, self._token)
            self._stubs[address] = (channel, pb_grpc.DecodeWorkerStub(channel))
        return self._stubs[address][1]
