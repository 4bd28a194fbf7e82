"""`PrefillClient`: the decode worker's (and tests') handle on one prefill worker's gRPC API."""

from __future__ import annotations

from protocol.grpc_auth import GrpcTls, token_channel
from protocol.proto import worker_pb2 as pb
from protocol.proto import worker_pb2_grpc as pb_grpc


class PrefillClient:
    def __init__(self, address: str, token: str = "", tls: GrpcTls | None = None) -> None:
        self.address = address
        self._channel = token_channel(address, token, tls)
        self._stub = pb_grpc.PrefillWorkerStub(self._channel)

    def remote_prefill(
        self, request: pb.RemotePrefillRequest, timeout: float = 10.0
    ) -> pb.RemotePrefillReply:
        return self._stub.RemotePrefill(request, timeout=timeout)

    def abort(self, request_id: str, timeout: float = 10.0) -> bool:
        """True when the worker knew the request; it has stopped writing its KV when this returns."""
        return self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout).found

    def status(self, timeout: float = 5.0) -> pb.WorkerStatus:
        return self._stub.Status(pb.StatusRequest(), timeout=timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PrefillClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
