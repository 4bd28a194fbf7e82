"""`PrefillLoop`: the prefill worker's engine thread.

It drives `LLMEngine.step()` with a `PrefillKVConnector` plugged in (which pushes each layer's
new KV as it completes, then the last layer with the first token, and waits every write
before the step ends; see `prefill_worker.connector`)::

    drain inbox (jobs, handshakes, aborts) -> engine.step() -> forget finished jobs -> publish

Because no write is in flight between steps, an abort is answered only once that holds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from kvtransfer.base import KVTransport
from prefill_worker.connector import PrefillKVConnector
from prefill_worker.kv_push import PushTarget
from prefill_worker.messages import AbortJob, Handshake, InboxMsg, PrefillJob, StopMsg
from worker_runtime.agent import KVEventRelay
from worker_runtime.engine_loop import IdleIntegrityCheck, drain_inbox

log = logging.getLogger(__name__)

_MAX_TOMBSTONES = 65536  # ids are unique per attempt; this only bounds memory


@dataclass(frozen=True)
class PrefillSnapshot:
    num_total_blocks: int = 0
    num_free_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0
    queued_prefill_tokens: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    leased: dict[str, tuple[float, list[str]]] | None = None  # decode address -> (lease_s, request ids)
    integrity_error: str = ""  # BlockManager.check_integrity() when last idle; "" = fine
    kv_bytes_pushed: int = 0
    kv_push_descriptors: int = 0
    kv_push_seconds: float = 0.0  # summed per step: first write issued -> last write landed
    kv_push_tail_ms_p50: float = 0.0  # per step: compute+sample done -> last write landed


class PrefillLoop:
    def __init__(self, engine: LLMEngine, transport: KVTransport, transfer_timeout_s: float = 10.0) -> None:
        self.engine = engine
        self.transport = transport
        self.connector = PrefillKVConnector(
            transport, engine.layout, engine.kv_cache_pool.device, transfer_timeout_s
        )
        engine.attach_kv_connector(self.connector)
        self.inbox: queue.Queue[InboxMsg] = queue.Queue()
        self._jobs: dict[str, PrefillJob] = {}
        # aborted ids, so a RemotePrefill that arrives after its own Abort (a call that decode
        # gave up on in transit, then overtaken) is never run into blocks decode has freed
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self._integrity = IdleIntegrityCheck()
        self.kv_events = KVEventRelay()
        self._snapshot = PrefillSnapshot()
        # jobs submitted but not yet in a published snapshot: (requests, prompt tokens)
        self._pending_lock = threading.RLock()  # try_submit holds it around submit
        self._pending = (0, 0)
        self._thread = threading.Thread(target=self._run, name="prefill-loop", daemon=True)

    @property
    def known_peers(self) -> dict[str, bytes]:
        """Decode agents already handshaken (read by gRPC threads; written by the engine thread)."""
        return self.connector.known_peers

    # ---- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._publish()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.inbox.put(StopMsg())
        self._thread.join(timeout)

    def submit(self, job: PrefillJob) -> None:
        with self._pending_lock:
            self._pending = (self._pending[0] + 1, self._pending[1] + len(job.prompt_token_ids))
        self.inbox.put(job)

    def try_submit(self, job: PrefillJob, max_requests: int, max_tokens: int) -> str:
        """Queue ``job`` unless it would pass the worker's own limits (0: none); returns why not.

        Counts what the last snapshot shows plus what was submitted since, under one lock, so
        a burst of concurrent calls cannot all pass on the same stale snapshot. A job alone
        larger than a limit is taken when nothing is queued (it could never run otherwise)."""
        with self._pending_lock:
            snap = self._snapshot
            requests = snap.num_waiting + snap.num_running + self._pending[0]
            tokens = snap.queued_prefill_tokens + self._pending[1]
            if max_requests and requests and requests + 1 > max_requests:
                return f"{requests} requests queued (max_queued_requests={max_requests})"
            if max_tokens and tokens and tokens + len(job.prompt_token_ids) > max_tokens:
                return f"{tokens} prompt tokens queued (max_queued_prompt_tokens={max_tokens})"
            self.submit(job)
        return ""

    def handshake(self, agent: str, metadata: bytes, timeout: float = 60.0) -> str:
        """"" once ``agent`` is our transport peer, else why it was refused (compat mismatch...)."""
        if self.known_peers.get(agent) == metadata:
            return ""
        done: Future[str] = Future()
        self.inbox.put(Handshake(agent, metadata, done))
        return done.result(timeout)

    def abort(self, request_id: str) -> Future[bool]:
        """Resolves (found?) between steps, when none of the job's writes is in flight."""
        done: Future[bool] = Future()
        self.inbox.put(AbortJob(request_id, done))
        return done

    def snapshot(self) -> PrefillSnapshot:
        return self._snapshot

    # ---- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            busy = self.engine.has_schedulable_requests()
            msgs = drain_inbox(self.inbox, 0.0 if busy else 0.05)
            if any(isinstance(m, StopMsg) for m in msgs):
                self._shutdown()
                return
            for m in msgs:
                self._handle(m)
            jobs = [m for m in msgs if isinstance(m, PrefillJob)]
            if jobs:
                # new jobs' leases go to the renewer now, not after their first (maybe long) step
                self._publish()
                with self._pending_lock:  # the snapshot counts them now
                    n, tokens = self._pending
                    self._pending = (n - len(jobs), tokens - sum(len(j.prompt_token_ids) for j in jobs))
            if self.engine.has_schedulable_requests():
                try:
                    if not self._step():
                        time.sleep(0.005)  # admitted nothing (no blocks): don't spin
                except Exception as e:  # only the requests it ran fail, never the worker
                    log.exception("prefill step failed; failing the requests it ran")
                    for rid in self.engine.failed_step_requests(e) or list(self._jobs):
                        self._fail(rid, f"prefill step failed: {e}")
            self._publish()

    def _handle(self, m: InboxMsg) -> None:
        if isinstance(m, Handshake):
            refused, failed = self.connector.add_peer(m.agent, m.metadata)
            for rid in failed:
                self._forget(rid)
            m.done.set_result(refused)
        elif isinstance(m, PrefillJob):
            if m.peer not in self.known_peers:  # the peer was dropped since the handshake
                log.warning("remote prefill %s: peer %s is gone; its lease will expire", m.request_id, m.peer)
                return
            if m.request_id in self._jobs or m.request_id in self._tombstones:
                log.warning("remote prefill %s ignored: duplicate or already aborted", m.request_id)
                return
            self.connector.add_job(PushTarget(m.request_id, m.peer, m.dst_blocks, m.skip_blocks))
            self._jobs[m.request_id] = m
            try:
                self.engine.add_request(m.request_id, list(m.prompt_token_ids), m.params)
            except InvalidRequestError as e:  # the servicer validated it: only a bug lands here
                self._fail(m.request_id, str(e))
        elif isinstance(m, AbortJob):
            found = m.request_id in self._jobs
            self._forget(m.request_id)
            self._tombstones[m.request_id] = None
            while len(self._tombstones) > _MAX_TOMBSTONES:
                self._tombstones.popitem(last=False)
            if m.done is not None:
                m.done.set_result(found)

    def _step(self) -> bool:
        """One engine step; False when it ran nothing (no blocks to admit a waiting prompt)."""
        outputs = self.engine.step()
        for out in outputs:
            if out.finished:  # pushed and notified, or failed (decode was told)
                self._jobs.pop(out.request_id, None)
        return bool(outputs) or self.engine.stats().num_running > 0

    def _fail(self, request_id: str, error: str) -> None:
        """Give up on a job: tell decode (which frees its blocks), free ours."""
        self.connector.fail(request_id, error)
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._jobs.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _shutdown(self) -> None:
        for rid in list(self._jobs):
            self._fail(rid, "prefill worker is shutting down")

    def _publish(self) -> None:
        self.kv_events.push(self.engine.drain_kv_events())
        stats = self.engine.stats()
        leased: dict[str, tuple[float, list[str]]] = {}
        for rid, job in self._jobs.items():
            lease, ids = leased.setdefault(job.decode_address, (job.lease_s, []))
            ids.append(rid)
            leased[job.decode_address] = (min(lease, job.lease_s), ids)
        integrity_error = self._integrity.maybe_run(self.engine.check_integrity, idle=not self._jobs)
        push = self.connector.push
        self._snapshot = PrefillSnapshot(
            num_total_blocks=stats.num_total_blocks,
            num_free_blocks=stats.num_free_blocks,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            queued_prefill_tokens=stats.queued_prompt_tokens,
            prompt_tokens_computed=self.connector.tokens_computed,
            prompt_tokens_cached=stats.prefix_hit_tokens,
            leased=leased,
            integrity_error=integrity_error,
            kv_bytes_pushed=push.bytes,
            kv_push_descriptors=push.descriptors,
            kv_push_seconds=push.seconds,
            kv_push_tail_ms_p50=push.tail_ms_p50(),
        )
