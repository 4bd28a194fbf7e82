"""`LeaseTable`: decode blocks held for a prefill worker, each on a lease that the peer renews.

Decode allocates a prompt's blocks before the prefill worker writes them. If that worker dies
or stalls, nothing else would ever free them, so each hold expires unless the prefill worker
renews it (``RenewLease``, one RPC per peer per interval). The engine thread adds, removes and
expires entries; gRPC threads renew them, hence the lock (the only one in the decode worker).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable


class LeaseTable:
    def __init__(self, lease_s: float, clock=time.monotonic) -> None:
        self.lease_s = lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._deadline: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._deadline)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._deadline

    def add(self, request_id: str) -> None:
        with self._lock:
            self._deadline[request_id] = self._clock() + self.lease_s

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._deadline.pop(request_id, None)

    def renew(self, request_ids: Iterable[str]) -> list[str]:
        """Extend the leases the peer still wants; returns the ids we no longer hold (the peer
        must stop working on them: they finished, were aborted or already expired)."""
        unknown = []
        with self._lock:
            until = self._clock() + self.lease_s
            for rid in request_ids:
                if rid in self._deadline:
                    self._deadline[rid] = until
                else:
                    unknown.append(rid)
        return unknown

    def pop_expired(self) -> list[str]:
        now = self._clock()
        with self._lock:
            gone = [rid for rid, t in self._deadline.items() if t <= now]
            for rid in gone:
                del self._deadline[rid]
        return gone
