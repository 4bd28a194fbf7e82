"""`DecodeLoop`: the decode worker's engine thread.

One thread owns the `LLMEngine`; gRPC threads reach it only through ``inbox`` and read
results from per-request queues (see `decode_worker.messages`). Each iteration::

    drain inbox -> admit remote prefills -> poll KV notifications -> expire -> step -> publish

A remote request goes ``pending`` (waiting for decode blocks) -> ``prefilling`` (blocks
allocated and leased to a prefill worker) -> ``running`` (its KV landed; in the batch). An
abort of a ``prefilling`` request ends the client's stream at once but frees the blocks only
after the prefill worker confirmed it stopped writing them (``aborting``): freeing earlier
would let a late write land in blocks that another sequence already owns. The same holds when
the RemotePrefill call itself failed in transit: the peer may still have received it.

Each attempt to prefill remotely gets its own transfer id (``<request id>#<n>``), which is
what the prefill worker, its notifications and the leases know: a late message of an old
attempt can never be taken for a retry of the same request.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

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
from engine.errors import InvalidRequestError, OutOfBlocksError, PromptTooLongError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from protocol import prefill_notify
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
class _Live:
    req: NewRequest
    state: str  # "local" | "pending" | "prefilling" | "running" | "aborting"
    transfer: str = ""  # transfer id of the current remote prefill attempt
    agent: str = ""  # the prefill worker's transport name, once it accepted
    cached_tokens: int = 0
    counted: bool = False  # prompt tokens added to the status counters
    finished_idx: set[int] = field(default_factory=set)


class DecodeLoop:
    def __init__(
        self, engine: LLMEngine, transport: Any, peers: PrefillPeers | None, cfg: DecodeLoopConfig
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.peers = peers
        self.cfg = cfg
        self.inbox: queue.Queue[InboxMsg] = queue.Queue()
        self.leases = LeaseTable(cfg.lease_s)
        self.timings = LoopTimings()
        self._live: dict[str, _Live] = {}
        self._pending: deque[str] = deque()
        self._transfers: dict[str, str] = {}  # transfer id -> request id (prefilling/aborting)
        self._attempts = itertools.count()
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
                self._admit_pending()
                self._poll_transport()
                self._expire()
                if self.engine.scheduler.has_unfinished():
                    self._step()
            except Exception:  # a bug must not leave streams hanging forever
                log.exception("decode loop iteration failed; failing its requests")
                self._fail_all("INTERNAL", "decode worker error (see its log)")
            self._publish()

    def _wait_time(self) -> float:
        if self.engine.scheduler.has_unfinished():
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
        elif isinstance(m, PrefillReply):
            self._prefill_reply(m)
        elif isinstance(m, PeerAbortDone):
            live = self._by_transfer(m.transfer_id, "aborting")
            if live is not None:
                del self._transfers[m.transfer_id]
                del self._live[live.req.request_id]
                self.engine.abort_request(live.req.request_id)

    def _by_transfer(self, transfer_id: str, state: str) -> _Live | None:
        rid = self._transfers.get(transfer_id)
        live = self._live.get(rid) if rid is not None else None
        return live if live is not None and live.state == state and live.transfer == transfer_id else None

    def _transfer_over(self, live: _Live) -> None:
        """The prefill worker is done with our blocks (landed or refused): stop tracking it."""
        self.leases.remove(live.transfer)
        self._transfers.pop(live.transfer, None)
        if self.peers is not None:
            self.peers.forget(live.transfer)

    def _new_request(self, req: NewRequest) -> None:
        rid = req.request_id
        if rid in self._live:
            req.stream.put(StreamError("INVALID_ARGUMENT", f"request_id: {rid!r} is already running"))
            return
        try:
            ids = self.engine.tokenize(list(req.prompt_token_ids))[1]
            self.engine.validate_prompt(ids)
            if not self.engine.blocks.can_ever_allocate(len(ids) + 1):
                raise PromptTooLongError(f"prompt: {len(ids)} tokens do not fit this worker's KV cache")
            if req.prefill is None:
                self.engine.add_request(rid, ids, req.params)
            elif req.params.n != 1:
                raise InvalidRequestError("n: must be 1 for a disaggregated request (fan out n upstream)")
        except InvalidRequestError as e:
            req.stream.put(StreamError("INVALID_ARGUMENT", str(e)))
            return
        if req.prefill is not None and self.peers is None:
            req.stream.put(StreamError("FAILED_PRECONDITION", "this decode worker has no KV transport"))
            return
        self._live[rid] = _Live(req, "local" if req.prefill is None else "pending")
        if req.deadline is not None:
            self._deadlines[rid] = req.deadline
        if req.prefill is not None:
            self._pending.append(rid)

    def _admit_pending(self) -> None:
        """Allocate decode blocks for waiting remote requests, oldest first, then call prefill."""
        blocks, sched = self.engine.blocks, self.engine.scheduler
        while self._pending and self.peers is not None:
            live = self._live[self._pending[0]]
            req = live.req
            if len(sched.running) + len(self.leases) >= sched.cfg.max_num_seqs:
                return  # the batch is full once these land
            if not blocks.can_allocate(len(req.prompt_token_ids), req.prompt_token_ids):
                return  # wait for running sequences to finish; keep FIFO order
            try:
                rp = self.engine.add_remote_request(req.request_id, list(req.prompt_token_ids), req.params)
            except OutOfBlocksError:
                return
            self._pending.popleft()
            live.state = "prefilling"
            live.transfer = f"{req.request_id}#{next(self._attempts)}"
            self._transfers[live.transfer] = req.request_id
            self.leases.add(live.transfer)
            self.peers.request(req, live.transfer, rp.block_ids, rp.num_cached_tokens // blocks.block_size)

    def _prefill_reply(self, m: PrefillReply) -> None:
        live = self._by_transfer(m.transfer_id, "prefilling")
        if live is None:
            return
        if m.accepted:
            live.agent = m.agent_name
        elif m.refused:  # an answer: it will never write, so the blocks are ours again now
            self._transfer_over(live)
            self._end(live, StreamError(m.code, m.error))
            self.engine.abort_request(live.req.request_id)
            del self._live[live.req.request_id]
        else:  # lost in transit: it may still run, so free only once it confirmed an abort
            self._abort(live.req.request_id, StreamError(m.code, m.error))

    def _poll_transport(self) -> None:
        if self.transport is None:
            return
        for peer, data in self.transport.poll_notifications():
            try:
                note = prefill_notify.decode(data)
            except prefill_notify.BadNotificationError as e:
                log.warning("ignoring a notification from %s: %s", peer, e)
                continue
            live = self._by_transfer(note.request_id, "prefilling")
            if live is None:
                continue  # aborted meanwhile (the abort path frees its blocks), or an old attempt
            if live.agent and peer != live.agent:
                log.warning("notification for %s from %s, expected %s", note.request_id, peer, live.agent)
                continue
            self._transfer_over(live)
            rid = live.req.request_id
            if isinstance(note, prefill_notify.PrefillFailed):
                self._end(live, StreamError("UNAVAILABLE", f"prefill failed: {note.error}"))
                self.engine.abort_request(rid)
                del self._live[rid]
                continue
            live.state = "running"
            live.cached_tokens = note.cached_tokens
            self.timings.prefill_arrived(rid, note.sent_at)
            out = self.engine.complete_remote_request(rid, note.token, note.logprob, note.top)
            if out is not None:
                self._emit(out)

    def _expire(self) -> None:
        for tid in self.leases.pop_expired():
            live = self._by_transfer(tid, "prefilling")
            if live is None:
                continue
            self._abort(live.req.request_id, StreamError(
                "UNAVAILABLE",
                f"prefill worker did not deliver the KV nor renew its lease within {self.cfg.lease_s}s "
                "(transfer timeout or peer death)",
            ))
        if self._deadlines:
            now = time.monotonic()
            for rid in [r for r, t in self._deadlines.items() if t <= now]:
                self._abort(rid, StreamError("DEADLINE_EXCEEDED", "request timed out"))

    def _abort(self, request_id: str, event: StreamEvent) -> None:
        live = self._live.get(request_id)
        if live is None or live.state == "aborting":
            return
        self._end(live, event)
        if live.state == "pending":
            self._pending.remove(request_id)
        elif live.state == "prefilling" and self.peers is not None:
            self.leases.remove(live.transfer)
            live.state = "aborting"  # keep the blocks until the peer confirms (module docstring)
            self.peers.abort(live.transfer, live.req.prefill)  # type: ignore[arg-type]
            return
        else:
            self.engine.abort_request(request_id)
        del self._live[request_id]

    def _end(self, live: _Live, event: StreamEvent) -> None:
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
        t0 = time.monotonic()
        self.timings.step_started(t0)
        outputs = self.engine.step()
        self.timings.step_finished(time.monotonic() - t0)
        for out in outputs:
            self._emit(out)

    def _emit(self, out: RequestOutput) -> None:
        live = self._live.get(out.request_id)
        if live is None:
            return
        remote = live.req.prefill
        cached = live.cached_tokens if remote is not None else out.num_cached_tokens
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
                len(out.prompt_token_ids), cached, remote.worker_id if remote is not None else "", c.index,
            ))
        if out.finished:
            self._deadlines.pop(out.request_id, None)
            del self._live[out.request_id]

    def _fail_all(self, code: str, message: str) -> None:
        for rid in list(self._live):
            self._abort(rid, StreamError(code, message))

    def _shutdown(self) -> None:
        self._fail_all("UNAVAILABLE", "decode worker is shutting down")
        if self.peers is not None:
            self.peers.close()

    def _publish(self) -> None:
        self.kv_events.push(self.engine.blocks.drain_events())
        blocks, sched = self.engine.blocks, self.engine.scheduler
        idle = not sched.has_unfinished() and not self._live
        now = time.monotonic()
        if not idle and now - self._last_publish < self.cfg.publish_every_s:
            return
        self._last_publish = now
        integrity_error = self._integrity.maybe_run(blocks, idle)
        self._snapshot = DecodeSnapshot(
            num_total_blocks=blocks.num_total_blocks,
            num_free_blocks=blocks.num_free_blocks,
            num_running=len(sched.running),
            num_waiting=len(sched.waiting) + len(self._pending),
            num_leases=len(self.leases),
            num_preemptions=sched.num_preemptions,
            prompt_tokens_cached=blocks.num_hit_tokens,
            prompt_tokens_computed=self._tokens_computed,
            timings=self.timings.summary(),
            integrity_error=integrity_error,
        )
