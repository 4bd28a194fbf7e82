"""`DecodeLoop`: the decode worker's engine thread.

One thread owns the `LLMEngine`; gRPC threads reach it only through ``inbox`` and read
results from per-request queues (see `decode_worker.messages`). Each iteration::

    drain inbox -> engine.step() -> emit -> publish

Remote prefills are the engine's `DecodeKVConnector` (`decode_worker.connector`): it polls
the prefill workers' notifications and RPC answers inside the step, leases the blocks, and
holds an aborted request's blocks until its prefill worker confirmed it stopped writing.
This loop only tracks the client streams: which sequences of a request have ended, and
its deadline.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from decode_worker.connector import DecodeKVConnector
from decode_worker.leases import LeaseTable
from decode_worker.messages import (
    AbortMsg,
    InboxMsg,
    NewRequest,
    PeerAbortDone,
    PrefillReply,
    StopMsg,
    StreamError,
    StreamEvent,
    TokenChunk,
    TokenLogprob,
)
from decode_worker.prefill_peers import PrefillPeers
from decode_worker.stats import DecodeSnapshot, LoopTimings
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from kvtransfer.base import KVTransport
from worker_runtime.agent import KVEventRelay
from worker_runtime.engine_loop import IdleIntegrityCheck, drain_inbox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeLoopConfig:
    lease_s: float = 10.0
    idle_wait_s: float = 0.05  # nothing to do: how often leases/deadlines are still checked
    notify_poll_s: float = 0.001  # only remote prefills in flight: how often to poll the transport
    integrity_every_s: float = 0.5  # idle BlockManager.check_integrity() cadence
    publish_every_s: float = 0.01  # Status snapshot refresh while busy


@dataclass
class _Stream:
    """A client stream: open until each of its ``n`` sequences ended."""

    req: NewRequest
    counted: bool = False  # prompt tokens added to the status counters
    finished_idx: set[int] = field(default_factory=set)


class DecodeLoop:
    def __init__(
        self, engine: LLMEngine, transport: KVTransport | None, peers: PrefillPeers | None, cfg: DecodeLoopConfig
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.peers = peers
        self.cfg = cfg
        self.inbox: queue.Queue[InboxMsg] = queue.Queue()
        self.leases = LeaseTable(cfg.lease_s)
        self.timings = LoopTimings()
        self.connector = DecodeKVConnector(transport, peers, self.leases, self.timings, engine.layout.block_size)
        engine.attach_kv_connector(self.connector)
        self._live: dict[str, _Stream] = {}
        self._deadlines: dict[str, float] = {}
        self._tokens_computed = 0
        self._integrity = IdleIntegrityCheck(cfg.integrity_every_s)
        self._last_publish = 0.0
        self.kv_events = KVEventRelay()
        self._snapshot = DecodeSnapshot()
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)

    # ---- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._publish()
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.inbox.put(StopMsg())
        self._thread.join(timeout)

    def submit(self, req: NewRequest) -> queue.Queue[StreamEvent]:
        self.inbox.put(req)
        return req.stream

    def abort(self, request_id: str, reason: str) -> Future[bool]:
        """``reason`` "abort rpc" ends the stream with finish_reason "abort"; others with CANCELLED."""
        found: Future[bool] = Future()
        self.inbox.put(AbortMsg(request_id, reason, found))
        return found

    def snapshot(self) -> DecodeSnapshot:
        return self._snapshot

    # ---- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                msgs = drain_inbox(self.inbox, self._wait_time())
                if any(isinstance(m, StopMsg) for m in msgs):
                    self._shutdown()
                    return
                for m in msgs:
                    self._handle(m)
                self._expire()
                self._step()
            except Exception:  # a bug must not leave streams hanging forever
                log.exception("decode loop iteration failed; failing its requests")
                self._fail_all("INTERNAL", "decode worker error (see its log)")
            self._publish()

    def _wait_time(self) -> float:
        if self.engine.has_schedulable_requests():
            return 0.0
        if self.leases:
            return self.cfg.notify_poll_s
        return self.cfg.idle_wait_s

    def _handle(self, m: InboxMsg) -> None:
        if isinstance(m, NewRequest):
            self._new_request(m)
        elif isinstance(m, AbortMsg):
            if m.found is not None:
                m.found.set_result(m.request_id in self._live)
            if m.reason == "abort rpc":
                self._abort(m.request_id, TokenChunk([], "", None, "abort", None, 0, 0, ""))
            else:
                self._abort(m.request_id, StreamError("CANCELLED", m.reason))
        elif isinstance(m, PrefillReply | PeerAbortDone):
            self.connector.on_peer_message(m)

    def _new_request(self, req: NewRequest) -> None:
        rid = req.request_id
        if rid in self._live:
            req.stream.put(StreamError("INVALID_ARGUMENT", f"request_id: {rid!r} is already running"))
            return
        try:  # the ids are checked once, by add_request (vocabulary, length, KV capacity)
            ids = req.prompt_token_ids
            if req.prefill is not None and req.params.n != 1:
                raise InvalidRequestError("n: must be 1 for a disaggregated request (fan out n upstream)")
            if req.prefill is not None and self.peers is None:
                req.stream.put(StreamError("FAILED_PRECONDITION", "this decode worker has no KV transport"))
                return
            self.engine.add_request(rid, ids, req.params, kv_params=req if req.prefill is not None else None)
        except InvalidRequestError as e:
            req.stream.put(StreamError("INVALID_ARGUMENT", str(e)))
            return
        self._live[rid] = _Stream(req)
        if req.deadline is not None:
            self._deadlines[rid] = req.deadline

    def _expire(self) -> None:
        if self._deadlines:
            now = time.monotonic()
            for rid in [r for r, t in self._deadlines.items() if t <= now]:
                self._abort(rid, StreamError("DEADLINE_EXCEEDED", "request timed out"))

    def _abort(self, request_id: str, event: StreamEvent) -> None:
        """End the stream now; the engine frees the blocks (or its connector holds them until
        the prefill worker confirmed it stopped writing)."""
        live = self._live.pop(request_id, None)
        if live is None:
            return
        self._end(live, event)
        self.engine.abort_request(request_id)

    def _end(self, live: _Stream, event: StreamEvent) -> None:
        if isinstance(event, TokenChunk):  # an abort: each unfinished sequence ends with it
            n_prompt = len(live.req.prompt_token_ids)
            for i in range(live.req.params.n):
                if i not in live.finished_idx:
                    live.req.stream.put(dataclasses.replace(event, index=i, prompt_tokens=n_prompt))
        else:
            live.req.stream.put(event)
        self._deadlines.pop(live.req.request_id, None)
        self.timings.forget(live.req.request_id)

    def _step(self) -> None:
        try:
            for out in self.engine.poll_kv():  # first tokens go out now, not after the next decode step
                self._emit(out)
            outputs = self.engine.step()
        except Exception as e:
            self._fail_step(e)
            return
        started = self.connector.take_step_start()
        if started:
            self.timings.step_finished(time.monotonic() - started)
        for out in outputs:
            self._emit(out)

    def _emit(self, out: RequestOutput) -> None:
        live = self._live.get(out.request_id)
        if live is None:
            return
        if out.error is not None:  # the remote prefill failed: the engine already ended it
            del self._live[out.request_id]
            self._end(live, StreamError(out.error.code, out.error.message))
            return
        remote = live.req.prefill
        if not live.counted and remote is None:
            live.counted = True
            self._tokens_computed += len(out.prompt_token_ids) - out.num_cached_tokens
        for c in out.outputs:
            if c.index in live.finished_idx or (not c.delta_token_ids and not c.finished):
                continue
            n = len(c.delta_token_ids)
            lps = None
            if c.logprobs is not None and c.top_logprobs is not None:
                new = zip(c.logprobs[-n:], c.top_logprobs[-n:]) if n else ()
                lps = [TokenLogprob(lp, top) for lp, top in new]
            if c.finished:
                live.finished_idx.add(c.index)
            live.req.stream.put(TokenChunk(
                list(c.delta_token_ids), c.delta_text, lps, c.finish_reason,
                None if c.stop_reason is None else str(c.stop_reason),
                len(out.prompt_token_ids), out.num_cached_tokens, remote.worker_id if remote is not None else "",
                c.index,
            ))
        if out.finished:
            self._deadlines.pop(out.request_id, None)
            del self._live[out.request_id]

    def _fail_step(self, error: Exception) -> None:
        """A step raised: end only the requests it can be attributed to (the engine frees their
        blocks); the loop goes on serving the rest. Nothing attributable: every live request,
        so a failure that repeats cannot spin forever."""
        log.exception("decode step failed; failing the requests it ran")
        ids = self.engine.failed_step_requests(error) or list(self._live)
        for rid in ids:
            out = self.engine.fail_request(rid, f"decode step failed: {error}")
            if out is not None:
                self._emit(out)
            self._abort(rid, StreamError("INTERNAL", f"decode step failed: {error}"))  # no-op once emitted

    def _fail_all(self, code: str, message: str) -> None:
        for rid in list(self._live):
            self._abort(rid, StreamError(code, message))

    def _shutdown(self) -> None:
        self._fail_all("UNAVAILABLE", "decode worker is shutting down")
        if self.peers is not None:
            self.peers.close()

    def _publish(self) -> None:
        self.kv_events.push(self.engine.drain_kv_events())
        stats = self.engine.stats()
        idle = stats.idle and not self._live
        now = time.monotonic()
        if not idle and now - self._last_publish < self.cfg.publish_every_s:
            return
        self._last_publish = now
        integrity_error = self._integrity.maybe_run(self.engine.check_integrity, idle)
        self._snapshot = DecodeSnapshot(
            num_total_blocks=stats.num_total_blocks,
            num_free_blocks=stats.num_free_blocks,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            num_leases=len(self.leases),
            num_preemptions=stats.num_preemptions,
            prompt_tokens_cached=stats.prefix_hit_tokens,
            prompt_tokens_computed=self._tokens_computed,
            timings=self.timings.summary(),
            integrity_error=integrity_error,
        )
