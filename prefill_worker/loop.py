"""`PrefillLoop`: the prefill worker's engine thread.

It drives the engine's pieces (`Scheduler` with its token budget and chunked prefill,
`ModelRunner`, `BlockManager` with prefix caching) around the KV transport::

    drain inbox -> schedule -> forward (each layer's new KV pushed as it completes)
      -> sample -> last layer + notification for finished prompts -> wait writes -> commit, free

Every write of a step is waited for before the step ends. That keeps one invariant simple:
between steps no write is in flight, so freeing, preempting or aborting a sequence never
races a transfer still reading its blocks, and an abort is answered only once that holds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from engine.llm_engine import LLMEngine
from engine.model_runner import StepResult
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from kvtransfer.errors import TransferTimeoutError
from prefill_worker.kv_push import LayerPusher, PushPlan, PushStats, PushTarget, plan_step
from prefill_worker.messages import AbortJob, Handshake, InboxMsg, PrefillJob, StopMsg
from protocol import prefill_notify
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


@dataclass
class _Job:
    job: PrefillJob
    seq: Sequence
    target: PushTarget


class PrefillLoop:
    def __init__(self, engine: LLMEngine, transport: Any, transfer_timeout_s: float = 10.0) -> None:
        self.engine = engine
        self.transport = transport
        self.transfer_timeout_s = transfer_timeout_s
        self.inbox: queue.Queue[InboxMsg] = queue.Queue()
        self._jobs: dict[str, _Job] = {}
        # decode agents added to the transport, with the metadata they were added with; read
        # (never written) by gRPC threads to skip the loop round trip on known peers
        self.known_peers: dict[str, bytes] = {}
        self._broken: set[str] = set()  # peers whose transfer timed out this step
        # aborted ids, so a RemotePrefill that arrives after its own Abort (a call that decode
        # gave up on in transit, then overtaken) is never run into blocks decode has freed
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self._tokens_computed = 0
        self._push = PushStats()
        self._integrity = IdleIntegrityCheck()
        self.kv_events = KVEventRelay()
        self._snapshot = PrefillSnapshot()
        self._thread = threading.Thread(target=self._run, name="prefill-loop", daemon=True)

    # ---- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._publish()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.inbox.put(StopMsg())
        self._thread.join(timeout)

    def submit(self, job: PrefillJob) -> None:
        self.inbox.put(job)

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
            busy = self.engine.scheduler.has_unfinished()
            msgs = drain_inbox(self.inbox, 0.0 if busy else 0.05)
            if any(isinstance(m, StopMsg) for m in msgs):
                self._shutdown()
                return
            for m in msgs:
                self._handle(m)
            if any(isinstance(m, PrefillJob) for m in msgs):
                # new jobs' leases go to the renewer now, not after their first (maybe long) step
                self._publish()
            if self.engine.scheduler.has_unfinished():
                try:
                    if not self._step():
                        time.sleep(0.005)  # admitted nothing (no blocks): don't spin
                except Exception:
                    log.exception("prefill step failed; failing its requests")
                    for rid in list(self._jobs):
                        self._fail(rid, "prefill worker error (see its log)")
            self._publish()

    def _handle(self, m: InboxMsg) -> None:
        if isinstance(m, Handshake):
            m.done.set_result(self._add_peer(m.agent, m.metadata))
        elif isinstance(m, PrefillJob):
            if m.peer not in self.known_peers:  # the peer was dropped since the handshake
                log.warning("remote prefill %s: peer %s is gone; its lease will expire", m.request_id, m.peer)
                return
            if m.request_id in self._jobs or m.request_id in self._tombstones:
                log.warning("remote prefill %s ignored: duplicate or already aborted", m.request_id)
                return
            seq = Sequence(f"{m.request_id}-p", m.request_id, list(m.prompt_token_ids), m.params)
            target = PushTarget(m.request_id, m.peer, m.dst_blocks, m.skip_blocks)
            self._jobs[m.request_id] = _Job(m, seq, target)
            self.engine.scheduler.add(seq)
        elif isinstance(m, AbortJob):
            j = self._jobs.pop(m.request_id, None)
            if j is not None:
                self.engine.scheduler.finish(j.seq, "abort")
            self._tombstones[m.request_id] = None
            while len(self._tombstones) > _MAX_TOMBSTONES:
                self._tombstones.popitem(last=False)
            if m.done is not None:
                m.done.set_result(j is not None)

    def _add_peer(self, agent: str, metadata: bytes) -> str:
        if self.known_peers.get(agent) == metadata:
            return ""
        if agent in self.known_peers:  # restarted under the same name: the old pool is gone
            for rid in [r for r, j in self._jobs.items() if j.target.peer == agent]:
                self._fail(rid, f"decode agent {agent} restarted")
        try:
            name = self.transport.add_peer(metadata)
        except Exception as e:  # IncompatiblePeerError above all: refused, with every difference
            log.warning("refusing decode agent %s: %s", agent, e)
            return str(e)
        if name != agent:
            self.transport.remove_peer(name)
            return f"decode agent {agent!r} presented transport metadata of {name!r}"
        self.known_peers[agent] = metadata
        return ""

    def _drop_broken_peers(self) -> None:
        """A timed-out write may still be in flight: only tearing the peer's connection down
        guarantees nothing reads our blocks any more, so that comes before freeing them."""
        for peer in self._broken:
            log.warning("KV transfer to %s timed out: dropping the peer and its jobs", peer)
            self.transport.remove_peer(peer)
            self.known_peers.pop(peer, None)
            for rid in [r for r, j in self._jobs.items() if j.target.peer == peer]:
                self._fail(rid, f"KV transfer to {peer} timed out")
        self._broken.clear()

    def _step(self) -> bool:
        sched = self.engine.scheduler.schedule()
        if sched.is_empty:
            return False
        blocks, bs = self.engine.blocks, self.engine.blocks.block_size
        tables = [blocks.block_table(s.seq.seq_id) for s in sched.scheduled]
        plans: list[PushPlan] = []
        for s, table in zip(sched.scheduled, tables):
            j = self._jobs[s.seq.request_id]
            plans.append(plan_step(j.target, table, s.start + s.num_new_tokens, s.seq.num_prompt_tokens, bs))
        pool = self.engine.pool
        pusher = LayerPusher(self.transport, plans, pool.layout.num_layers, pool.device)
        try:
            hidden, meta = self.engine.runner.forward(sched.scheduled, tables, on_layer_done=pusher)
        finally:
            pusher.flush()
        result = self.engine.runner.sample(sched.scheduled, hidden, meta)  # tokens on host: synced
        computed = time.perf_counter()
        self._tokens_computed += sched.num_tokens
        self._wait(plans)
        self._send_first_tokens(sched, plans, result)
        self._wait(plans)
        pushed = sum(len(p.local) for p in plans if not p.error)
        if pushed:
            layout = pool.layout
            self._push.record(pushed * layout.block_bytes_per_layer * layout.num_layers,
                              sum(p.descriptors for p in plans if not p.error), pusher.first_write_at,
                              computed, time.perf_counter())
        self.engine.scheduler.update_from_output(sched, result.tokens())  # commit: blocks become cached
        self._drop_broken_peers()
        for s, plan in zip(sched.scheduled, plans):
            if s.seq.request_id not in self._jobs:
                continue  # failed with its broken peer
            rid = s.seq.request_id
            if plan.error:
                self._fail(rid, plan.error)
            elif plan.completes:
                self.engine.scheduler.finish(s.seq, "prefilled")
                del self._jobs[rid]
            else:
                plan.target.next_block = plan.upto
        return True

    def _send_first_tokens(self, sched: SchedulerOutput, plans: list[PushPlan], result: StepResult) -> None:
        """The last layer's write of each finished prompt carries the notification, so decode
        learns the first token only after every byte of the prompt's KV landed."""
        out = result.output
        rows = {seq_id: i for i, seq_id in enumerate(result.seq_ids)}
        last = self.engine.pool.layout.num_layers - 1
        for s, plan in zip(sched.scheduled, plans):
            if not plan.completes or plan.error:
                continue
            row = rows[s.seq.seq_id]
            assert out is not None
            top: dict[int, float] = {}
            n = s.seq.params.logprobs or 0
            if n > 0 and out.top_ids is not None and out.top_logprobs is not None:
                top = dict(zip(out.top_ids[row, :n].tolist(), out.top_logprobs[row, :n].tolist()))
            note = prefill_notify.PrefillDone(
                s.seq.request_id, int(out.token_ids[row]), float(out.logprobs[row]), top,
                s.seq.num_cached_tokens, time.time(),
            )
            try:
                plan.issued(self.transport.write_blocks(
                    plan.target.peer, plan.local, plan.remote, layers=[last],
                    notify=prefill_notify.encode(note),
                ))
            except Exception as e:
                plan.error = f"KV write to {plan.target.peer} failed: {e}"

    def _wait(self, plans: list[PushPlan]) -> None:
        deadline = time.monotonic() + self.transfer_timeout_s
        for p in plans:
            for h in p.handles:
                try:
                    self.transport.wait(h, max(0.0, deadline - time.monotonic()))
                except TransferTimeoutError as e:
                    p.error = p.error or str(e)
                    self._broken.add(p.target.peer)
                except Exception as e:  # TransferFailedError: the peer died or refused
                    p.error = p.error or f"KV transfer to {p.target.peer} failed: {e}"
            p.handles.clear()

    def _fail(self, request_id: str, error: str) -> None:
        """Give up on a job: free our blocks and tell decode, which frees its own."""
        j = self._jobs.pop(request_id, None)
        if j is None:
            return
        self.engine.scheduler.finish(j.seq, "abort")
        log.warning("remote prefill %s failed: %s", request_id, error)
        try:
            note = prefill_notify.PrefillFailed(request_id, error)
            self.transport.notify(j.target.peer, prefill_notify.encode(note))
        except Exception:  # decode is gone too: its lease frees its blocks
            log.info("could not tell %s that %s failed", j.target.peer, request_id)

    def _shutdown(self) -> None:
        for rid in list(self._jobs):
            self._fail(rid, "prefill worker is shutting down")

    def _publish(self) -> None:
        self.kv_events.push(self.engine.blocks.drain_events())
        blocks, sched = self.engine.blocks, self.engine.scheduler
        leased: dict[str, tuple[float, list[str]]] = {}
        queued = 0
        for rid, j in self._jobs.items():
            lease, ids = leased.setdefault(j.job.decode_address, (j.job.lease_s, []))
            ids.append(rid)
            leased[j.job.decode_address] = (min(lease, j.job.lease_s), ids)
            queued += j.seq.num_prompt_tokens - j.seq.num_computed_tokens
        integrity_error = self._integrity.maybe_run(blocks, idle=not self._jobs)
        self._snapshot = PrefillSnapshot(
            num_total_blocks=blocks.num_total_blocks,
            num_free_blocks=blocks.num_free_blocks,
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            queued_prefill_tokens=queued,
            prompt_tokens_computed=self._tokens_computed,
            prompt_tokens_cached=blocks.num_hit_tokens,
            leased=leased,
            integrity_error=integrity_error,
            kv_bytes_pushed=self._push.bytes,
            kv_push_descriptors=self._push.descriptors,
            kv_push_seconds=self._push.seconds,
            kv_push_tail_ms_p50=self._push.tail_ms_p50(),
        )
