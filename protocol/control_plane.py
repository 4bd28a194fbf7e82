"""The Redis control plane: who is alive, how loaded, what is cached, how big each pool should be.

Liveness is Redis key expiry, not a clock comparison: a worker's record lives for ``ttl_s``
after its last heartbeat, so a crashed worker drops out of `list_workers` on the Redis
server's clock with no reaper process. Per-pool sets index the records and are cleaned lazily
when a listed id's record has expired.

KV events go to one Redis Stream in publish order; the router tails it (`read_kv_events`) to
keep an exact prefix index. The stream is capped (approximately) at ``stream_maxlen`` entries;
a router that starts after older entries were trimmed only under-reports cache hits.

Everything stored is msgpack (see `protocol.registry`): a value read from Redis is never
unpickled. With the cluster ``token`` every record and KV event batch is sealed with an
HMAC of it (`protocol.registry.seal`), and one without a valid MAC is ignored (logged once
per key): a process that can write to Redis but does not hold the token cannot add a worker,
fake a load or poison the prefix index.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Sequence

import redis

from protocol.registry import (
    POOLS,
    KVEvent,
    KVEventBatch,
    LoadSnapshot,
    PoolName,
    WorkerInfo,
    pack,
    record_mac,
    seal,
    unpack,
    unseal,
)

log = logging.getLogger(__name__)


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool: must be one of {POOLS}, got {pool!r}")


class ControlPlane:
    """Worker registry, heartbeats, load snapshots, KV event stream and pool targets."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "splitserve",
        ttl_s: float = 10.0,
        stream_maxlen: int = 1_000_000,
        token: str = "",
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: must be positive, got {ttl_s}")
        self.client = client
        self.ns = namespace
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.stream_maxlen = stream_maxlen
        self._token = token  # "" : records are neither sealed nor checked (development set-up)
        self._warned: set[str] = set()

    @classmethod
    def from_url(
        cls, url: str, *, namespace: str = "splitserve", ttl_s: float = 10.0, stream_maxlen: int = 1_000_000,
        token: str = "", **client_kw: object,
    ) -> ControlPlane:
        """``url`` may carry a password (redis://:pw@host) and use TLS (rediss://);
        ``client_kw`` go to `redis.Redis.from_url` (timeouts, ``password``, ``ssl_ca_certs``)."""
        client = redis.Redis.from_url(url, decode_responses=False, **client_kw)  # type: ignore[arg-type]
        return cls(client, namespace=namespace, ttl_s=ttl_s, stream_maxlen=stream_maxlen, token=token)

    def close(self) -> None:
        self.client.close()

    # keys -----------------------------------------------------------------------------------
    def server_id(self) -> str:
        """The Redis server's run id: it changes when the server restarts (an empty store, a
        new KV event stream), which is how a reader knows to start the stream over."""
        info = self.client.info("server")
        return str(info.get("run_id", ""))

    def _worker_key(self, worker_id: str) -> str:
        return f"{self.ns}:worker:{worker_id}"

    def _load_key(self, worker_id: str) -> str:
        return f"{self.ns}:load:{worker_id}"

    def _pool_key(self, pool: str) -> str:
        return f"{self.ns}:pool:{pool}"

    def _target_key(self, pool: str) -> str:
        return f"{self.ns}:target:{pool}"

    @property
    def _stream_key(self) -> str:
        return f"{self.ns}:kv_events"

    def _seal(self, key: str, payload: bytes) -> bytes:
        return seal(self._token, key, payload)

    def _open(self, key: str, data: bytes) -> bytes | None:
        payload = unseal(self._token, key, data)
        if payload is None:
            self._refuse(key)
        return payload

    def _refuse(self, key: str) -> None:
        if key not in self._warned:  # bounded by what an attacker writes; the log is not
            self._warned.add(key)
            log.warning("ignoring %s: not sealed with this cluster's token (written by something outside it?)", key)
    # registry -------------------------------------------------------------------------------
    def register_worker(self, info: WorkerInfo, load: LoadSnapshot | None = None) -> None:
        """Announce (or re-announce after expiry) a worker; it is live for ``ttl_s``."""
        pipe = self.client.pipeline(transaction=True)
        for pool in POOLS:
            if pool != info.pool:  # a worker id moving pools must not be listed twice
                pipe.srem(self._pool_key(pool), info.worker_id)
        key = self._worker_key(info.worker_id)
        pipe.set(key, self._seal(key, info.to_wire()), px=self.ttl_ms)
        pipe.sadd(self._pool_key(info.pool), info.worker_id)
        load = load or LoadSnapshot(free_blocks=info.num_blocks, total_blocks=info.num_blocks)
        key = self._load_key(info.worker_id)
        pipe.set(key, self._seal(key, load.to_wire()), px=self.ttl_ms)
        pipe.execute()

    def heartbeat(self, worker_id: str, load: LoadSnapshot) -> bool:
        """Extend the worker's lease and publish its load.

        Returns False when the registration had already expired: the worker was declared dead
        (the router dropped its prefix index), so it must `register_worker` again and republish
        its cache contents before it is routed to.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.pexpire(self._worker_key(worker_id), self.ttl_ms)
        key = self._load_key(worker_id)
        pipe.set(key, self._seal(key, load.to_wire()), px=self.ttl_ms)
        alive, _ = pipe.execute()
        if not alive:
            self.client.delete(self._load_key(worker_id))
        return bool(alive)

    def deregister_worker(self, worker_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._worker_key(worker_id), self._load_key(worker_id))
        for pool in POOLS:
            pipe.srem(self._pool_key(pool), worker_id)
        pipe.execute()

    def live_workers(self, pool: PoolName | None = None) -> list[tuple[WorkerInfo, LoadSnapshot | None]]:
        """Live workers with their latest load, sorted by id (two round trips)."""
        pools: Sequence[str] = POOLS if pool is None else (pool,)
        for p in pools:
            _check_pool(p)
        pipe = self.client.pipeline(transaction=False)
        for p in pools:
            pipe.smembers(self._pool_key(p))
        members = pipe.execute()
        ids = sorted({m.decode() for ms in members for m in ms})
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        pipe.mget([self._worker_key(i) for i in ids])
        pipe.mget([self._load_key(i) for i in ids])
        infos, loads = pipe.execute()
        live: list[tuple[WorkerInfo, LoadSnapshot | None]] = []
        dead: list[str] = []
        for wid, raw_info, raw_load in zip(ids, infos, loads):
            if raw_info is None:
                dead.append(wid)
                continue
            info_bytes = self._open(self._worker_key(wid), raw_info)
            if info_bytes is None:
                continue  # not written by a member of this cluster: never routed to, never sent the token
            load_bytes = self._open(self._load_key(wid), raw_load) if raw_load is not None else None
            try:
                info = WorkerInfo.from_wire(info_bytes)
                load = LoadSnapshot.from_wire(load_bytes) if load_bytes is not None else None
            except (TypeError, ValueError, KeyError):
                continue  # a record from an incompatible or buggy peer is not a live worker
            if info.worker_id != wid:
                self._refuse(self._worker_key(wid))
                continue
            if pool is not None and info.pool != pool:
                continue
            live.append((info, load))
        if dead:
            self._forget(dead, pools)
        return live

    def list_workers(self, pool: PoolName | None = None) -> list[WorkerInfo]:
        """Workers whose lease has not expired, sorted by id."""
        return [info for info, _ in self.live_workers(pool)]

    def get_load(self, worker_id: str) -> LoadSnapshot | None:
        key = self._load_key(worker_id)
        raw = self.client.get(key)
        payload = self._open(key, raw) if raw is not None else None
        try:
            return LoadSnapshot.from_wire(payload) if payload is not None else None
        except (TypeError, ValueError, KeyError):
            return None

    def _forget(self, worker_ids: Iterable[str], pools: Sequence[str]) -> None:
        ids = list(worker_ids)
        pipe = self.client.pipeline(transaction=False)
        for p in pools:
            pipe.srem(self._pool_key(p), *ids)
        pipe.execute()

    # KV events ------------------------------------------------------------------------------
    def publish_kv_events(self, worker_id: str, events: Sequence[KVEvent]) -> str | None:
        """Append one worker's cache changes to the stream; returns the entry id (None if empty)."""
        if not events:
            return None
        payload = pack([e.to_obj() for e in events])
        fields = {b"w": worker_id.encode(), b"e": payload}
        if self._token:
            fields[b"m"] = record_mac(self._token, self._event_context(worker_id), payload)
        entry_id = self.client.xadd(
            self._stream_key,
            fields,  # type: ignore[arg-type]
            maxlen=self.stream_maxlen,
            approximate=True,
        )
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def read_kv_events(
        self, last_id: str = "0-0", block_ms: int | None = None, count: int = 1000
    ) -> tuple[str, list[KVEventBatch]]:
        """Entries after ``last_id`` (block up to ``block_ms`` for the first one, None: don't wait).

        Returns the id to pass next time (``last_id`` itself when nothing arrived) and the
        batches in stream order. Pass ``"$"`` to skip history and read only new events.
        """
        if last_id == "$":
            # resolve "$" now so the caller's next call cannot miss entries added in between
            info = (
                self.client.xinfo_stream(self._stream_key) if self.client.exists(self._stream_key) else None
            )
            last_id = info["last-generated-id"].decode() if info else "0-0"
        resp = self.client.xread({self._stream_key: last_id}, count=count, block=block_ms)
        batches: list[KVEventBatch] = []
        for _key, entries in resp or []:
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                last_id = eid
                try:
                    worker_id = fields[b"w"].decode()
                    if not self._event_authentic(worker_id, fields):
                        continue
                    events = tuple(KVEvent.from_obj(o) for o in unpack(fields[b"e"]))
                except (KeyError, ValueError, TypeError):
                    continue  # a malformed entry from a buggy peer must not stall the tail
                batches.append(KVEventBatch(eid, worker_id, events))
        return last_id, batches

    def _event_context(self, worker_id: str) -> str:
        return f"{self._stream_key}:{worker_id}"

    def _event_authentic(self, worker_id: str, fields: dict[bytes, bytes]) -> bool:
        if not self._token:
            return True
        mac = fields.get(b"m", b"")
        want = record_mac(self._token, self._event_context(worker_id), fields[b"e"])
        if isinstance(mac, bytes) and hmac.compare_digest(mac, want):
            return True
        self._refuse(self._event_context(worker_id))
        return False

    # pool targets (for a future autoscaler) ----------------------------------------------------
    def set_pool_target(self, pool: PoolName, replicas: int) -> None:
        _check_pool(pool)
        if replicas < 0:
            raise ValueError(f"replicas: must be >= 0, got {replicas}")
        key = self._target_key(pool)
        self.client.set(key, self._seal(key, pack(replicas)))

    def get_pool_target(self, pool: PoolName) -> int | None:
        _check_pool(pool)
        key = self._target_key(pool)
        raw = self.client.get(key)
        payload = self._open(key, raw) if raw is not None else None
        return int(unpack(payload)) if payload is not None else None

