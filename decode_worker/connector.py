"""`DecodeKVConnector`: the decode worker's side of the engine's `KVConnector`.

A disaggregated request's prompt is computed by a prefill worker. The engine allocates its
blocks (`on_blocks_allocated`); from then on this connector tracks the *transfer*, in one
typed state (`TransferState`):

* ``PREFILLING``: the blocks are leased to the prefill worker, which was asked to fill them.
  Its notification (`poll`) ends it: the first token (the request joins the batch) or a
  failure; so do a refusal, a lost call, or the lease expiring.
* ``ABORTING``: the request ended while prefilling. The client's stream ends at once, but the
  blocks stay held until the prefill worker confirmed it stopped writing (`PeerAbortDone`):
  freeing earlier would let a late write land in blocks another sequence already owns. The
  same holds when the RemotePrefill call itself failed in transit: the peer may have run it.

Each attempt gets its own transfer id (``<request id>#<n>``), which is what the prefill worker,
its notifications and the leases know: a late message of an old attempt is never taken for a
retry of the same request.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from decode_worker.leases import LeaseTable
from decode_worker.messages import NewRequest, PeerAbortDone, PrefillReply
from decode_worker.prefill_peers import PrefillPeers
from decode_worker.stats import LoopTimings
from engine.kv_connector import KVArrival, KVConnector, KVFailure, KVPoll, KVStepOutcome
from engine.model_runner import StepResult
from engine.outputs import RequestError
from engine.scheduler import ScheduledSeq
from kvtransfer.base import KVTransport
from protocol import prefill_notify

log = logging.getLogger(__name__)


class TransferState(enum.Enum):
    PREFILLING = "prefilling"
    ABORTING = "aborting"


@dataclass
class _Transfer:
    req: NewRequest
    transfer_id: str
    state: TransferState = TransferState.PREFILLING
    agent: str = ""  # the prefill worker's transport name, once it accepted


class DecodeKVConnector(KVConnector):
    def __init__(
        self, transport: KVTransport | None, peers: PrefillPeers | None, leases: LeaseTable, timings: LoopTimings,
        block_size: int,
    ) -> None:
        self.transport = transport
        self.peers = peers
        self.leases = leases
        self.timings = timings
        self.block_size = block_size
        self._by_request: dict[str, _Transfer] = {}
        self._by_id: dict[str, _Transfer] = {}
        self._attempts = itertools.count()
        self._replies: list[PrefillReply | PeerAbortDone] = []
        self._step_started_at = 0.0

    def on_peer_message(self, m: PrefillReply | PeerAbortDone) -> None:
        """An RPC answer (posted to the loop's inbox by `PrefillPeers`); applied at the next poll."""
        self._replies.append(m)

    # ---- scheduler side ----------------------------------------------------------------------

    def num_remote_prompt_tokens(self, request_id: str, prompt_token_ids: Sequence[int], kv_params: object) -> int:
        if kv_params is None:
            return 0
        assert isinstance(kv_params, NewRequest) and kv_params.prefill is not None
        return len(prompt_token_ids)

    def on_blocks_allocated(
        self, request_id: str, kv_params: object, block_ids: list[int], num_cached_tokens: int
    ) -> None:
        assert isinstance(kv_params, NewRequest) and self.peers is not None
        t = _Transfer(kv_params, f"{request_id}#{next(self._attempts)}")
        self._by_request[request_id] = self._by_id[t.transfer_id] = t
        self.leases.add(t.transfer_id)
        self.peers.request(kv_params, t.transfer_id, block_ids, num_cached_tokens // self.block_size)

    def request_finished(self, request_id: str) -> bool:
        t = self._by_request.get(request_id)
        if t is None or t.state is TransferState.ABORTING:
            return t is not None
        # still prefilling: keep the blocks until the peer confirms (module docstring)
        self.leases.remove(t.transfer_id)
        t.state = TransferState.ABORTING
        assert self.peers is not None and t.req.prefill is not None
        self.peers.abort(t.transfer_id, t.req.prefill)
        return True

    def poll(self) -> KVPoll:
        out = KVPoll()
        replies, self._replies = self._replies, []
        for m in replies:
            if isinstance(m, PeerAbortDone):
                t = self._find(m.transfer_id, TransferState.ABORTING)
                if t is not None:
                    self._drop(t)
                    out.released.append(t.req.request_id)
            else:
                self._reply(m, out)
        self._poll_transport(out)
        for tid in self.leases.pop_expired():
            t = self._find(tid, TransferState.PREFILLING)
            if t is not None:  # the engine aborts it: request_finished holds the blocks
                out.failed.append(KVFailure(t.req.request_id, RequestError(
                    "UNAVAILABLE",
                    f"prefill worker did not deliver the KV nor renew its lease within {self.leases.lease_s}s "
                    "(transfer timeout or peer death)",
                )))
        return out

    def _reply(self, m: PrefillReply, out: KVPoll) -> None:
        t = self._find(m.transfer_id, TransferState.PREFILLING)
        if t is None:
            return
        if m.accepted:
            t.agent = m.agent_name
        elif m.refused:  # an answer: it will never write, so the blocks are ours again now
            self._over(t)
            out.failed.append(KVFailure(t.req.request_id, RequestError(m.code, m.error)))
        else:  # lost in transit: it may still run, so free only once it confirmed an abort
            out.failed.append(KVFailure(t.req.request_id, RequestError(m.code, m.error)))

    def _poll_transport(self, out: KVPoll) -> None:
        if self.transport is None:
            return
        for peer, data in self.transport.poll_notifications():
            try:
                note = prefill_notify.decode(data)
            except prefill_notify.BadNotificationError as e:
                log.warning("ignoring a notification from %s: %s", peer, e)
                continue
            t = self._find(note.request_id, TransferState.PREFILLING)
            if t is None:
                continue  # aborted meanwhile (the abort path frees its blocks), or an old attempt
            if t.agent and peer != t.agent:
                log.warning("notification for %s from %s, expected %s", note.request_id, peer, t.agent)
                continue
            self._over(t)
            rid = t.req.request_id
            if isinstance(note, prefill_notify.PrefillFailed):
                out.failed.append(KVFailure(rid, RequestError("UNAVAILABLE", f"prefill failed: {note.error}")))
                continue
            self.timings.prefill_arrived(rid, note.sent_at)
            out.arrived.append(KVArrival(rid, note.token, note.logprob, dict(note.top), note.cached_tokens))

    def _find(self, transfer_id: str, state: TransferState) -> _Transfer | None:
        t = self._by_id.get(transfer_id)
        return t if t is not None and t.state is state else None

    def _over(self, t: _Transfer) -> None:
        """The prefill worker is done with our blocks (landed or refused): stop tracking it."""
        self.leases.remove(t.transfer_id)
        if self.peers is not None:
            self.peers.forget(t.transfer_id)
        self._drop(t)

    def _drop(self, t: _Transfer) -> None:
        self._by_id.pop(t.transfer_id, None)
        if self._by_request.get(t.req.request_id) is t:
            del self._by_request[t.req.request_id]

    # ---- worker side: nothing to push; the step's timing closes hand-overs ---------------------

    def start_step(self, scheduled: Sequence[ScheduledSeq], block_tables: Sequence[Sequence[int]]) -> bool:
        self._step_started_at = time.monotonic()
        self.timings.step_started(self._step_started_at)
        return False

    def end_step(self, scheduled: Sequence[ScheduledSeq], result: StepResult) -> KVStepOutcome:
        return KVStepOutcome()

    def take_step_start(self) -> float:
        """When the step that just ran started (0: it scheduled nothing), for the step timing."""
        t, self._step_started_at = self._step_started_at, 0.0
        return t
