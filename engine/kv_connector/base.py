"""`KVConnector`: the seam between `LLMEngine.step` and a KV transport (vLLM v1's shape).

One object, two roles, both driven by the engine thread (connectors need no locks for them):

**Scheduler side** (which requests' KV comes from or goes to a peer, and who owns the blocks)

* `num_remote_prompt_tokens`: how many prompt tokens of a new request a peer computes. A
  decode worker answers the whole prompt for a disaggregated request and 0 for a local one; a
  prefill worker always 0. Partial remote prefixes are not supported yet.
* `on_blocks_allocated`: the engine allocated (and pins) every block of such a prompt, its own
  prefix-cache hits included. From here the connector owns the *contents*: it asks the peer to
  fill them and keeps them leased to it. The engine never reads or frees them until the
  connector reports the request in `KVPoll.arrived` (the request then joins the running batch
  with the peer's first token), `KVPoll.failed`, or the request is finished.
* `request_finished`: the request ended (finished, aborted, failed). Returns True to *hold*
  its blocks: the peer may still be writing into them (an abort of a request whose remote
  prefill is under way), and freeing them now would let a late write land in blocks another
  sequence owns. Held blocks are freed only once the request id appears in
  `KVPoll.released` (the peer confirmed it stopped, or is unreachable and its lease expired).
* `poll`: arrivals, failures and releases since the last call; called at the start of every
  `step()`, also when nothing is scheduled.

**Worker side** (moving the KV of the step that runs now)

* `start_step`: the scheduled batch and its block tables, before the forward; True asks the
  engine to call `save_layer(layer)` once each layer's KV for the whole batch is written.
* `save_layer`: push that layer's new, complete blocks (layer-wise overlap of compute and
  transfer). The engine's source blocks stay pinned and unmodified until `end_step` returns.
* `end_forward`: the forward is over (also when it raised): every save is issued.
* `end_step`: sampling is done: send the last layer of each finished prompt with its first
  token, and wait for every write of the step. When it returns no write is in flight (the
  invariant "between steps nothing reads our blocks" that makes freeing, preemption and abort
  race-free); it reports which requests were fully delivered (the engine finishes them,
  reason ``"prefilled"``) and which failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.model_runner import StepResult
from engine.outputs import RequestError
from engine.scheduler import ScheduledSeq


@dataclass(frozen=True)
class KVArrival:
    """A remote prefill's KV landed in our blocks; the request joins with the peer's first token."""

    request_id: str
    first_token: int
    logprob: float = 0.0
    top: dict[int, float] = field(default_factory=dict)
    num_cached_tokens: int = 0  # prompt tokens the peer served from its own prefix cache


@dataclass(frozen=True)
class KVFailure:
    """A request the connector gave up on; the engine finishes it (``"abort"``) with ``error``."""

    request_id: str
    error: RequestError


@dataclass
class KVPoll:
    arrived: list[KVArrival] = field(default_factory=list)
    failed: list[KVFailure] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # request ids whose held blocks may be freed


@dataclass
class KVStepOutcome:
    done: set[str] = field(default_factory=set)  # request ids whose prompt KV fully landed at the peer
    failed: list[KVFailure] = field(default_factory=list)  # may name requests outside this step


class KVConnector:
    """Both roles with do-nothing defaults: an implementation overrides the side it serves."""

    # ---- scheduler side ---------------------------------------------------------------------

    def num_remote_prompt_tokens(self, request_id: str, prompt_token_ids: Sequence[int], kv_params: object) -> int:
        return 0

    def on_blocks_allocated(
        self, request_id: str, kv_params: object, block_ids: list[int], num_cached_tokens: int
    ) -> None:
        raise NotImplementedError(f"{type(self).__name__} takes no remote prefills")

    def request_finished(self, request_id: str) -> bool:
        return False

    def poll(self) -> KVPoll:
        return KVPoll()

    # ---- worker side ------------------------------------------------------------------------

    def start_step(self, scheduled: Sequence[ScheduledSeq], block_tables: Sequence[Sequence[int]]) -> bool:
        return False

    def save_layer(self, layer: int) -> None:
        return None

    def end_forward(self) -> None:
        return None

    def end_step(self, scheduled: Sequence[ScheduledSeq], result: StepResult) -> KVStepOutcome:
        return KVStepOutcome()
