"""ucxx backend: tagged UCX messages of block runs, through ucxx's core (non-asyncio) API.

Host memory on CPU (UCX over shared memory / TCP), device memory on GPU (CUDA IPC, RDMA):
UCX sends from and receives into the registered pool's views in place, one message per
coalesced byte range (`descriptors.byte_ranges`), so a layer's push is a few large messages.
The protocol (hello, write, read, notify) is `tagged_transport`'s; the UCX side — one worker
and its sleeping progress thread — is `ucxx_link.ProgressEngine`. A loopback host keeps UCX
on loopback (`ucx_env.bind_ucx_to`).
"""

from __future__ import annotations

from typing import Any

from kvtransfer.tagged_transport import TaggedTransport
from kvtransfer.ucx_env import bind_ucx_to


class UcxxTransport(TaggedTransport):
    """`KVTransport` over ucxx tagged messages."""

    name = "ucxx"

    def _make_engine(self) -> Any:
        bind_ucx_to(self.options.host)
        from kvtransfer.ucxx_link import ProgressEngine  # imports ucxx: after the UCX environment

        return ProgressEngine(self.agent_name, self._on_control, self._on_ep_error)
