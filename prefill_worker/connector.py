"""`PrefillKVConnector`: the prefill worker's side of the engine's `KVConnector`.

It owns the transport's peers (decode agents added through the handshake) and each job's
`PushTarget`, and turns the engine's step into the push::

    start_step: plan the blocks each sequence completes -> save_layer: push each layer as it
    completes -> end_step: last layer + first token of finished prompts -> wait every write

Every write of a step is waited for before `end_step` returns. That keeps one invariant simple:
between steps no write is in flight, so freeing, preempting or aborting a sequence never races
a transfer still reading its blocks, and an abort is answered only once that holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from engine.kv_cache_pool import KVLayout
from engine.kv_connector import KVConnector, KVFailure, KVStepOutcome
from engine.model_runner import StepResult
from engine.outputs import RequestError
from engine.scheduler import ScheduledSeq
from kvtransfer.base import KVTransport
from kvtransfer.errors import TransferTimeoutError
from prefill_worker.kv_push import LayerPusher, PushPlan, PushStats, PushTarget, plan_step
from protocol import prefill_notify
from worker_runtime.rank_kv import Push

log = logging.getLogger(__name__)


class PrefillKVConnector(KVConnector):
    def __init__(
        self, transport: KVTransport, layout: KVLayout, device: torch.device, transfer_timeout_s: float = 10.0
    ) -> None:
        self.transport = transport
        self.transfer_timeout_s = transfer_timeout_s
        self.layout = layout
        self.device = device
        # decode agents added to the transport, with the metadata they were added with; read
        # (never written) by gRPC threads to skip the loop round trip on known peers
        self.known_peers: dict[str, bytes] = {}
        self.push = PushStats()
        self.tokens_computed = 0
        self._targets: dict[str, PushTarget] = {}
        self._broken: set[str] = set()  # peers whose transfer timed out this step
        self._plans: list[PushPlan] = []
        self._pusher: LayerPusher | None = None

    # ---- jobs and peers (the loop, between steps) ----------------------------------------------

    def add_job(self, target: PushTarget) -> None:
        self._targets[target.request_id] = target

    def add_peer(self, agent: str, metadata: bytes) -> tuple[str, list[str]]:
        """("", []) once ``agent`` is our peer, else why it was refused; plus the jobs failed
        because the agent restarted under the same name (its old pool is gone)."""
        if self.known_peers.get(agent) == metadata:
            return "", []
        failed: list[str] = []
        if agent in self.known_peers:
            failed = self.fail_peer(agent, f"decode agent {agent} restarted")
        try:
            name = self.transport.add_peer(metadata)
        except Exception as e:  # IncompatiblePeerError above all: refused, with every difference
            log.warning("refusing decode agent %s: %s", agent, e)
            return str(e), failed
        if name != agent:
            self.transport.remove_peer(name)
            return f"decode agent {agent!r} presented transport metadata of {name!r}", failed
        self.known_peers[agent] = metadata
        return "", failed

    def fail_peer(self, peer: str, error: str) -> list[str]:
        rids = [r for r, t in self._targets.items() if t.peer == peer]
        for rid in rids:
            self.fail(rid, error)
        return rids

    def fail(self, request_id: str, error: str) -> bool:
        """Give up on a job: tell decode, which frees its own blocks (the engine frees ours)."""
        target = self._targets.pop(request_id, None)
        if target is None:
            return False
        log.warning("remote prefill %s failed: %s", request_id, error)
        try:
            self.transport.notify(target.peer, prefill_notify.encode(prefill_notify.PrefillFailed(request_id, error)))
        except Exception:  # decode is gone too: its lease frees its blocks
            log.info("could not tell %s that %s failed", target.peer, request_id)
        return True

    # ---- scheduler side ----------------------------------------------------------------------

    def request_finished(self, request_id: str) -> bool:
        self._targets.pop(request_id, None)
        return False  # end_step waited for every write: nothing to hold

    # ---- worker side -------------------------------------------------------------------------

    def start_step(self, scheduled: Sequence[ScheduledSeq], block_tables: Sequence[Sequence[int]]) -> bool:
        bs = self.layout.block_size
        self._plans = [
            plan_step(self._targets[s.seq.request_id], list(table), s.start + s.num_new_tokens,
                      s.seq.num_prompt_tokens, bs)
            for s, table in zip(scheduled, block_tables)
        ]  # fmt: skip
        self.tokens_computed += sum(s.num_new_tokens for s in scheduled)
        begin = getattr(self.transport, "begin_step", None)
        if begin is not None:  # a worker group (`GroupTransport`): the followers write their slices too
            begin([Push(p.target.peer, p.local, p.remote) for p in self._plans if p.local])
        self._pusher = LayerPusher(self.transport, self._plans, self.layout.num_layers, self.device)
        return True

    def save_layer(self, layer: int) -> None:
        assert self._pusher is not None
        self._pusher(layer)

    def end_forward(self) -> None:
        if self._pusher is not None:
            self._pusher.flush()

    def end_step(self, scheduled: Sequence[ScheduledSeq], result: StepResult) -> KVStepOutcome:
        plans, pusher = self._plans, self._pusher
        assert pusher is not None
        self._plans, self._pusher = [], None
        computed = time.perf_counter()  # tokens are on the host: compute and sampling are done
        self._wait(plans)
        self._send_first_tokens(scheduled, plans, result)
        self._wait(plans)
        pushed = sum(len(p.local) for p in plans if not p.error)
        if pushed:
            lay = self.layout
            self.push.record(pushed * lay.block_bytes_per_layer * lay.num_layers,
                             sum(p.descriptors for p in plans if not p.error), pusher.first_write_at,
                             computed, time.perf_counter())  # fmt: skip
        outcome = KVStepOutcome()
        for peer in self._drop_broken_peers():
            for rid in self.fail_peer(peer, f"KV transfer to {peer} timed out"):
                outcome.failed.append(KVFailure(rid, RequestError("UNAVAILABLE", f"KV transfer to {peer} timed out")))
        for s, plan in zip(scheduled, plans):
            rid = s.seq.request_id
            if rid not in self._targets:
                continue  # failed with its broken peer
            if plan.error:
                self.fail(rid, plan.error)
                outcome.failed.append(KVFailure(rid, RequestError("UNAVAILABLE", plan.error)))
            elif plan.completes:
                outcome.done.add(rid)
            else:
                plan.target.next_block = plan.upto
        return outcome

    def _drop_broken_peers(self) -> list[str]:
        """A timed-out write may still be in flight: only tearing the peer's connection down
        guarantees nothing reads our blocks any more, so that comes before freeing them."""
        broken = sorted(self._broken)
        for peer in broken:
            log.warning("KV transfer to %s timed out: dropping the peer and its jobs", peer)
            self.transport.remove_peer(peer)
            self.known_peers.pop(peer, None)
        self._broken.clear()
        return broken

    def _send_first_tokens(self, scheduled: Sequence[ScheduledSeq], plans: list[PushPlan], result: StepResult) -> None:
        """The last layer's write of each finished prompt carries the notification, so decode
        learns the first token only after every byte of the prompt's KV landed."""
        out = result.output
        rows = {seq_id: i for i, seq_id in enumerate(result.seq_ids)}
        last = self.layout.num_layers - 1
        for s, plan in zip(scheduled, plans):
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
                    plan.target.peer, plan.local, plan.remote, layers=[last], notify=prefill_notify.encode(note),
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
