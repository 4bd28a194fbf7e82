"""The data plane's pure parts, without processes or a model: fast, exact."""

from __future__ import annotations

import time

import pytest
import torch

from decode_worker.leases import LeaseTable
from decode_worker.stats import LoopTimings
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from prefill_worker.kv_push import LayerPusher, PushTarget, plan_step
from protocol import prefill_notify
from protocol.wire import params_from_proto, params_to_proto
from protocol.worker_spec import WorkerSpec, WorkerSpecError


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lease_expires_unless_renewed() -> None:
    clock = FakeClock()
    leases = LeaseTable(5.0, clock)
    leases.add("a#0")
    leases.add("b#1")
    clock.t += 4
    assert leases.renew(["a#0", "gone#2"]) == ["gone#2"]  # unknown ids: the peer must drop them
    clock.t += 2
    assert leases.pop_expired() == ["b#1"]
    assert "a#0" in leases and len(leases) == 1
    clock.t += 5
    assert leases.pop_expired() == ["a#0"]
    assert leases.renew(["a#0"]) == ["a#0"]


def test_push_plan_waits_for_full_blocks_and_skips_decode_hits() -> None:
    target = PushTarget("r#0", "decode", dst_blocks=[50, 51, 52, 53, 54], skip_blocks=1)
    table = [7, 8, 9, 10, 11]
    # chunk [0, 40): blocks 0 (decode has it) and 1 complete, block 2 half done -> push block 1 only
    p = plan_step(target, table, end=40, prompt_len=70, block_size=16)
    assert (p.local, p.remote, p.upto, p.completes) == ([8], [51], 2, False)
    target.next_block = p.upto
    # chunk [40, 70) completes the prompt: blocks 2..4, the last one partial, go now
    p = plan_step(target, table, end=70, prompt_len=70, block_size=16)
    assert (p.local, p.remote, p.upto, p.completes) == ([9, 10, 11], [52, 53, 54], 5, True)


def test_push_plan_sends_own_cache_hits_with_the_first_chunk() -> None:
    target = PushTarget("r#0", "decode", dst_blocks=[5, 6, 7], skip_blocks=0)
    # our prefix cache held blocks 0-1; the step computes [32, 40): all three blocks go now
    p = plan_step(target, [1, 2, 3], end=40, prompt_len=40, block_size=16)
    assert (p.local, p.remote, p.completes) == ([1, 2, 3], [5, 6, 7], True)


class RecordingTransport:
    def __init__(self, fail_peer: str = "") -> None:
        self.writes: list[tuple[str, list[int], list[int], list[int] | None]] = []
        self.fail_peer = fail_peer

    def write_blocks(self, peer: str, local: list[int], remote: list[int], layers: list[int] | None = None,
                     notify: bytes | None = None) -> int:
        if peer == self.fail_peer:
            raise ConnectionError("peer gone")
        self.writes.append((peer, list(local), list(remote), layers))
        return len(self.writes)


def test_layer_pusher_holds_the_last_layer_of_finished_prompts() -> None:
    t = RecordingTransport(fail_peer="dead")
    running = plan_step(PushTarget("a", "d1", [9, 10, 11], 0), [1, 2, 3], end=32, prompt_len=48,
                        block_size=16)
    done = plan_step(PushTarget("b", "d1", [20], 0), [4], end=10, prompt_len=10, block_size=16)
    broken = plan_step(PushTarget("c", "dead", [30], 0), [5], end=16, prompt_len=20, block_size=16)
    pusher = LayerPusher(t, [running, done, broken], num_layers=2, device=torch.device("cpu"))
    pusher(0)
    pusher(1)
    pusher.flush()
    assert t.writes == [
        ("d1", [1, 2], [9, 10], [0]), ("d1", [4], [20], [0]),
        ("d1", [1, 2], [9, 10], [1]),  # "done"'s layer 1 waits for its first token
    ]
    assert broken.error and "peer gone" in broken.error and not running.error


def test_prefill_notification_round_trip_and_rejects_garbage() -> None:
    done = prefill_notify.PrefillDone("r#3", 42, -0.5, {42: -0.5, 7: -1.25}, 32, 1234.5)
    assert prefill_notify.decode(prefill_notify.encode(done)) == done
    failed = prefill_notify.PrefillFailed("r#4", "transfer timed out")
    assert prefill_notify.decode(prefill_notify.encode(failed)) == failed
    for junk in (b"", b"\x92\x01\x02", prefill_notify.encode(done)[:-3]):
        with pytest.raises(prefill_notify.BadNotificationError):
            prefill_notify.decode(junk)


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=-3, max_tokens=None, logprobs=0,
                   stop=("\n\n",), stop_token_ids=(5,), min_tokens=2, repetition_penalty=1.1),
])
def test_sampling_params_survive_the_wire(params: SamplingParams) -> None:
    assert params_from_proto(params_to_proto(params)) == params


def test_bad_wire_params_name_the_field() -> None:
    msg = params_to_proto(SamplingParams())
    msg.top_p = 1.5
    with pytest.raises(InvalidRequestError, match="top_p"):
        params_from_proto(msg)


def test_worker_spec_validates_once_naming_the_field() -> None:
    spec = WorkerSpec.from_json('{"role": "decode", "model": "m.gguf", "port": 0}')
    assert WorkerSpec.from_json(spec.to_json()) == spec
    with pytest.raises(WorkerSpecError, match="blocksize: unknown"):
        WorkerSpec.from_dict({"role": "decode", "model": "m", "blocksize": 16})
    with pytest.raises(WorkerSpecError, match="role"):
        WorkerSpec(role="router", model="m")  # type: ignore[arg-type]
    with pytest.raises(WorkerSpecError, match="lease_s"):
        WorkerSpec(role="decode", model="m", lease_s=0)


def test_handover_is_flight_plus_wait_for_the_next_step() -> None:
    timings = LoopTimings()
    timings.prefill_arrived("a", sent_at=time.time() - 0.005)  # 5 ms in flight
    timings.step_started(time.monotonic() + 0.010)  # then 10 ms until the next step started
    timings.step_finished(0.040)
    summary = timings.summary()
    assert summary.num_handovers == 1 and 14.0 < summary.handover_p50_ms < 25.0
    assert summary.step_p50_ms == pytest.approx(40.0)
    timings.step_started(time.monotonic())  # nobody joined since: nothing recorded
    assert timings.summary().num_handovers == 1


@pytest.mark.gpu
def test_layer_pusher_on_cuda_writes_only_after_the_layers_kernels() -> None:
    """The hook returns at once (kernels are only queued); the pusher thread writes layer L
    once L's event fired, so transfers overlap the next layers' launches, never precede them."""
    written_at: list[float] = []

    class TimedTransport(RecordingTransport):
        def write_blocks(self, peer: str, local: list[int], remote: list[int],
                         layers: list[int] | None = None, notify: bytes | None = None) -> int:
            written_at.append(time.perf_counter())
            return super().write_blocks(peer, local, remote, layers, notify)

    t = TimedTransport()
    plan = plan_step(PushTarget("a", "d", [3, 4], 0), [1, 2], end=32, prompt_len=64, block_size=16)
    warm_plan = plan_step(PushTarget("a", "d", [3, 4], 0), [1, 2], end=32, prompt_len=64, block_size=16)
    warm = LayerPusher(RecordingTransport(), [warm_plan], num_layers=2, device=torch.device("cuda"))
    torch.cuda._sleep(1)  # load the sleep kernel and start a pusher once: first-call costs are not the hook's
    warm(0)
    warm.flush()
    pusher = LayerPusher(t, [plan], num_layers=2, device=torch.device("cuda"))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(200_000_000)  # a "layer" that runs ~0.1 s on the GPU
    pusher(0)
    hook_s = time.perf_counter() - t0
    pusher(1)
    pusher.flush()
    assert hook_s < 0.02, "the hook must not wait for the GPU"
    assert written_at[0] - t0 > 0.05, "layer 0 was written before its kernels finished"
    assert [w[3] for w in t.writes] == [[0], [1]]
