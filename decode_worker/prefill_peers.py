"""`PrefillPeers`: the decode worker's calls to prefill workers, off the engine thread.

A RemotePrefill or Abort RPC can take a network round trip or a timeout; the engine thread
must not wait on either, so calls run on a small thread pool and their answers come back as
inbox messages (`PrefillReply`, `PeerAbortDone`). An abort is chained behind the request's
RemotePrefill call: sent earlier, it could overtake it, and the prefill worker would then
start writing into blocks we had already freed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import grpc

from decode_worker.messages import InboxMsg, NewRequest, PeerAbortDone, PrefillReply, PrefillTarget
from protocol.prefill_client import PrefillClient
from protocol.proto import worker_pb2 as pb
from protocol.wire import params_to_proto

log = logging.getLogger(__name__)

# status codes a prefill worker uses for a request it will never take: no point retrying elsewhere
_PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


class PrefillPeers:
    def __init__(
        self, *, token: str, post: Callable[[InboxMsg], None], agent_name: str, metadata: bytes,
        decode_address: str, lease_s: float, rpc_timeout_s: float = 10.0, max_workers: int = 8,
    ) -> None:
        self._token = token
        self._post = post
        self._agent_name = agent_name
        self._metadata = metadata
        self._decode_address = decode_address
        self._lease_s = lease_s
        self._timeout = rpc_timeout_s
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="prefill-rpc")
        self._clients: dict[str, PrefillClient] = {}
        self._clients_lock = threading.Lock()
        self._inflight: dict[str, Future[None]] = {}  # engine thread only

    def request(self, req: NewRequest, transfer_id: str, dst_blocks: list[int], skip_blocks: int) -> None:
        """Ask ``req.prefill`` to fill ``dst_blocks`` (all of the prompt's, in order)."""
        assert req.prefill is not None
        msg = pb.RemotePrefillRequest(
            request_id=transfer_id,
            prompt_token_ids=req.prompt_token_ids,
            params=params_to_proto(req.params),
            decode_agent=self._agent_name,
            decode_metadata=self._metadata,
            dst_block_ids=dst_blocks,
            skip_blocks=skip_blocks,
            lease_s=self._lease_s,
            decode_address=self._decode_address,
        )
        self._inflight[transfer_id] = self._pool.submit(self._call_prefill, req.prefill, msg)

    def abort(self, transfer_id: str, target: PrefillTarget) -> None:
        """Tell the prefill worker now; `PeerAbortDone` arrives once it stopped writing (or is gone)."""
        call = self._inflight.pop(transfer_id, None)

        def send(_: object = None) -> None:
            self._pool.submit(self._call_abort, transfer_id, target)

        if call is None or call.done():
            send()
        else:
            call.add_done_callback(send)

    def forget(self, transfer_id: str) -> None:
        self._inflight.pop(transfer_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._clients_lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()

    # ---- pool threads -------------------------------------------------------------------------

    def _client(self, address: str) -> PrefillClient:
        with self._clients_lock:
            c = self._clients.get(address)
            if c is None:
                c = self._clients[address] = PrefillClient(address, self._token)
            return c

    def _call_prefill(self, target: PrefillTarget, msg: pb.RemotePrefillRequest) -> None:
        tid = msg.request_id
        who = target.worker_id or target.address
        try:
            reply = self._client(target.address).remote_prefill(msg, timeout=self._timeout)
        except grpc.RpcError as e:
            answered = e.code() in _PASS_THROUGH  # the worker itself said no
            code = e.code() if answered else grpc.StatusCode.UNAVAILABLE
            self._post(PrefillReply(tid, False, answered, f"prefill worker {who}: {e.details()}", code.name))
            return
        except Exception as e:  # never lose the answer: the request would hang on its lease
            log.exception("RemotePrefill %s failed", tid)
            self._post(PrefillReply(tid, False, False, f"prefill call failed: {e}", "INTERNAL"))
            return
        if reply.accepted:
            self._post(PrefillReply(tid, True, agent_name=reply.agent_name))
        else:
            text = f"prefill worker {who} refused: {reply.error}"
            self._post(PrefillReply(tid, False, True, text, "FAILED_PRECONDITION"))

    def _call_abort(self, transfer_id: str, target: PrefillTarget) -> None:
        try:
            self._client(target.address).abort(transfer_id, timeout=self._timeout)
        except grpc.RpcError as e:
            # refused connection: it is dead. A timeout: it is hung, and if it ever wakes up its
            # tombstone for this id and the expired lease keep it from writing
            log.info("Abort %s on %s: %s", transfer_id, target.address, e.code().name)
        except Exception:
            log.exception("Abort %s failed", transfer_id)
        finally:
            self._post(PeerAbortDone(transfer_id))
