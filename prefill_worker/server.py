"""The prefill worker's gRPC service, and how one is started inside a process.

``RemotePrefill`` validates on the gRPC thread and queues the job for the `PrefillLoop`. The
first contact with a decode agent is the KV handshake, run by the engine thread (which alone
drives the transport): ``transport.add_peer`` compares the compatibility keys (model, dtype,
KV layout, block size, head split), and a mismatch is refused with ``accepted=false`` and the
reason, never by writing KV the peer would misread.
"""

from __future__ import annotations

import logging

import grpc

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.llm_engine import LLMEngine
from prefill_worker.leases import LeaseRenewer
from prefill_worker.loop import PrefillLoop
from prefill_worker.messages import PrefillJob
from protocol.proto import worker_pb2 as pb
from protocol.proto import worker_pb2_grpc as pb_grpc
from protocol.wire import params_from_proto
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


class PrefillServicer(pb_grpc.PrefillWorkerServicer):
    def __init__(
        self, loop: PrefillLoop, *, worker_id: str, agent_name: str, metadata: bytes, compat_key: str,
        max_queued_requests: int = 0, max_queued_prompt_tokens: int = 0,
    ) -> None:
        self.loop = loop
        self.max_queued_requests = max_queued_requests  # this worker's own admission limits (0: none)
        self.max_queued_prompt_tokens = max_queued_prompt_tokens
        self.worker_id = worker_id
        self.agent_name = agent_name
        self.metadata = metadata
        self.compat_key = compat_key

    def RemotePrefill(
        self, request: pb.RemotePrefillRequest, context: grpc.ServicerContext
    ) -> pb.RemotePrefillReply:
        # handshake first: a block-size mismatch must read as one, not as a wrong block count
        refused = self.loop.handshake(request.decode_agent, request.decode_metadata)
        if refused:
            return pb.RemotePrefillReply(accepted=False, error=refused, agent_name=self.agent_name)
        try:
            job = self._job(request, request.decode_agent)
        except PromptTooLongError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except InvalidRequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if context.time_remaining() is not None and context.time_remaining() <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "decode gave up on this call; not queued")
        full = self.loop.try_submit(job, self.max_queued_requests, self.max_queued_prompt_tokens)
        if full:  # decode passes RESOURCE_EXHAUSTED on; the router tries another worker or answers 429
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill worker {self.worker_id} is full: {full}")
        queued = self.loop.snapshot().queued_prefill_tokens + len(job.prompt_token_ids)
        return pb.RemotePrefillReply(accepted=True, queued_tokens=queued, agent_name=self.agent_name)

    def _job(self, request: pb.RemotePrefillRequest, peer: str) -> PrefillJob:
        engine = self.loop.engine
        params = params_from_proto(request.params)
        ids = engine.tokenize(list(request.prompt_token_ids))[1]
        engine.validate_prompt(ids)  # length and KV capacity
        need = engine.kv_blocks_for(len(ids))
        if len(request.dst_block_ids) != need:
            got = len(request.dst_block_ids)
            raise InvalidRequestError(f"dst_block_ids: {got} given, the prompt needs {need}")
        if not 0 <= request.skip_blocks < need:
            raise InvalidRequestError(f"skip_blocks: must be in [0, {need}), got {request.skip_blocks}")
        if request.lease_s <= 0 or not request.decode_address:
            raise InvalidRequestError("lease_s and decode_address: required for lease renewal")
        return PrefillJob(
            request.request_id, ids, params, peer, request.decode_address, list(request.dst_block_ids),
            request.skip_blocks, request.lease_s,
        )

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        # answered between steps, when no write of the job is in flight (see PrefillLoop)
        return pb.AbortReply(found=self.loop.abort(request.request_id).result(timeout=60.0))

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.WorkerStatus:
        s = self.loop.snapshot()
        return pb.WorkerStatus(
            worker_id=self.worker_id, pool="prefill",
            num_total_blocks=s.num_total_blocks, num_free_blocks=s.num_free_blocks,
            num_running=s.num_running, num_waiting=s.num_waiting,
            queued_prefill_tokens=s.queued_prefill_tokens,
            prompt_tokens_computed=s.prompt_tokens_computed, prompt_tokens_cached=s.prompt_tokens_cached,
            agent_name=self.agent_name, transport_metadata=self.metadata, compat_key=self.compat_key,
            integrity_error=s.integrity_error, kv_bytes_pushed=s.kv_bytes_pushed,
            kv_push_descriptors=s.kv_push_descriptors,
            kv_push_seconds=s.kv_push_seconds, kv_push_tail_ms_p50=s.kv_push_tail_ms_p50,
        )


def start_prefill_worker(spec: WorkerSpec, token: str) -> RunningWorker:
    """Load the model, open the transport, start the engine thread, lease renewer and server."""
    engine = LLMEngine(spec.engine_config())
    server, address = bind_server(spec, token, max_workers=32)
    worker_id = worker_id_for(spec, address)
    agent_name = agent_name_for(worker_id)
    worker = RunningWorker(worker_id, address, agent_name)
    transport = open_worker_transport(spec, agent_name, token, engine)
    worker.on_stop(transport.close)
    metadata = transport.metadata()
    loop = PrefillLoop(engine, transport, spec.transfer_timeout_s)
    renewer = LeaseRenewer(lambda: loop.snapshot().leased, loop.abort, token)
    servicer = PrefillServicer(
        loop, worker_id=worker_id, agent_name=agent_name, metadata=metadata,
        compat_key=compat_text(spec, engine.layout, transport), max_queued_requests=spec.max_queued_requests,
        max_queued_prompt_tokens=spec.max_queued_prompt_tokens,
    )
    pb_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
    loop.start()
    worker.on_stop(loop.stop)
    renewer.start()
    worker.on_stop(renewer.stop)
    server.start()
    worker.on_stop(lambda: server.stop(grace=1.0).wait())
    join_control_plane(worker, spec, engine, loop)
    log.info("prefill worker %s serving on %s (transport %s)", worker_id, address, spec.transport)
    return worker
