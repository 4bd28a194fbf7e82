"""The decode worker's gRPC service, and how one is started inside a process.

Servicer methods run on gRPC threads: they validate, hand messages to the `DecodeLoop`, and
stream its per-request queue back. A stream whose client went away (cancel, deadline,
disconnect) is aborted through ``context.add_callback`` (or at once, if it left before the
handler ran), so its blocks are freed on both sides.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from decode_worker.loop import DecodeLoop, DecodeLoopConfig
from decode_worker.messages import NewRequest, StreamError
from decode_worker.prefill_peers import PrefillPeers
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from protocol.proto import worker_pb2 as pb
from protocol.proto import worker_pb2_grpc as pb_grpc
from protocol.wire import chunk_to_proto, params_from_proto, prefill_target_from_proto
from protocol.worker_spec import WorkerSpec
from worker_runtime.runtime import (
    RunningWorker,
    agent_name_for,
    bind_server,
    compat_text,
    join_control_plane,
    open_worker_transport,
    worker_id_for,
)

log = logging.getLogger(__name__)


class DecodeServicer(pb_grpc.DecodeWorkerServicer):
    def __init__(
        self, loop: DecodeLoop, *, worker_id: str, agent_name: str = "", metadata: bytes = b"",
        compat_key: str = "", default_timeout_s: float = 0.0,
    ) -> None:
        self.loop = loop
        self.worker_id = worker_id
        self.agent_name = agent_name
        self.metadata = metadata
        self.compat_key = compat_key
        self.default_timeout_s = default_timeout_s

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        req = self._parse(request, context)
        done = threading.Event()

        def client_gone() -> None:  # only an unfinished stream needs the abort
            if not done.is_set():
                self.loop.abort(req.request_id, "client gone")

        # submit first: the abort must reach the loop after the request, or it finds nothing to
        # abort and the request runs to its end for nobody. A client that left before the
        # callback was registered gets no callback (add_callback returns False): abort here.
        stream = self.loop.submit(req)
        if not context.add_callback(client_gone):
            client_gone()
        remaining = req.params.n
        while remaining:
            try:
                ev = stream.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    client_gone()  # idempotent with the callback: aborting twice finds nothing
                    return
                continue
            if isinstance(ev, StreamError):
                done.set()
                context.abort(grpc.StatusCode[ev.code], ev.message)
            yield chunk_to_proto(ev)
            if ev.finish_reason is not None:
                remaining -= 1
        done.set()

    def _parse(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> NewRequest:
        if not request.request_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        try:
            params = params_from_proto(request.params)
            prefill = prefill_target_from_proto(request)
        except InvalidRequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.timeout_s < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"timeout_s: must be >= 0, got {request.timeout_s}")
        timeout = request.timeout_s or self.default_timeout_s
        deadline = time.monotonic() + timeout if timeout > 0 else None
        return NewRequest(request.request_id, list(request.prompt_token_ids), params, prefill, deadline)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        found = self.loop.abort(request.request_id, "abort rpc")
        return pb.AbortReply(found=found.result(timeout=10.0))

    def RenewLease(self, request: pb.LeaseRequest, context: grpc.ServicerContext) -> pb.LeaseReply:
        return pb.LeaseReply(expired=self.loop.leases.renew(request.request_ids))

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.WorkerStatus:
        s = self.loop.snapshot()
        t = s.timings
        return pb.WorkerStatus(
            worker_id=self.worker_id, pool="decode",
            num_total_blocks=s.num_total_blocks, num_free_blocks=s.num_free_blocks,
            num_running=s.num_running, num_waiting=s.num_waiting,
            prompt_tokens_computed=s.prompt_tokens_computed, prompt_tokens_cached=s.prompt_tokens_cached,
            agent_name=self.agent_name, transport_metadata=self.metadata, compat_key=self.compat_key,
            handover_p50_ms=t.handover_p50_ms, handover_max_ms=t.handover_max_ms,
            num_handovers=t.num_handovers, decode_step_p50_ms=t.step_p50_ms,
            num_preemptions=s.num_preemptions, num_leases=s.num_leases, integrity_error=s.integrity_error,
        )


def start_decode_worker(spec: WorkerSpec, token: str) -> RunningWorker:
    """Load the model, open the transport, start the engine thread and the gRPC server."""
    engine = LLMEngine(spec.engine_config())
    server, address = bind_server(spec, token, spec.grpc_workers)
    worker_id = worker_id_for(spec, address)
    agent_name = agent_name_for(worker_id)
    worker = RunningWorker(worker_id, address, agent_name)
    transport = open_worker_transport(spec, agent_name, token, engine)
    worker.on_stop(transport.close)
    metadata = transport.metadata()
    cfg = DecodeLoopConfig(lease_s=spec.lease_s)
    peers = PrefillPeers(
        token=token, post=lambda m: loop.inbox.put(m), agent_name=agent_name, metadata=metadata,
        decode_address=address, lease_s=spec.lease_s,
    )
    loop = DecodeLoop(engine, transport, peers, cfg)
    servicer = DecodeServicer(
        loop, worker_id=worker_id, agent_name=agent_name, metadata=metadata,
        compat_key=compat_text(spec, engine.layout, transport), default_timeout_s=spec.request_timeout_s,
    )
    pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    loop.start()
    worker.on_stop(loop.stop)
    server.start()
    worker.on_stop(lambda: server.stop(grace=1.0).wait())
    join_control_plane(worker, spec, engine, loop)
    log.info("decode worker %s serving on %s (transport %s)", worker_id, address, spec.transport)
    return worker
