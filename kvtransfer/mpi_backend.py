"""mpi backend: block runs as non-blocking MPI point-to-point messages (mpi4py + MPICH).

The protocol (hello with HMAC, write + ack, read, notify, leases through the workers) is
`tagged_transport`'s, the same as ucxx's; `mpi_link.MpiEngine` posts ``Isend``/``Irecv`` of
each coalesced byte range and progresses them on one thread. Workers are either ranks of
one MPI job (``splitserve serve --launcher mpi``, ``mpirun -n N splitserve worker``) or
separate ``mpiexec -n 1`` jobs joined by an intercommunicator at handshake; see `mpi_link`.
The MPI library comes from the ``mpich`` wheel; no system MPI is needed.
"""

from __future__ import annotations

from typing import Any

from kvtransfer.tagged_transport import TaggedTransport
from kvtransfer.ucx_env import bind_ucx_to


class MpiTransport(TaggedTransport):
    """`KVTransport` over MPI point-to-point messages."""

    name = "mpi"

    def _make_engine(self) -> Any:
        bind_ucx_to(self.options.host)  # the wheel's MPICH runs over UCX (ch4:ucx): same exposure rule
        from kvtransfer.mpi_link import MpiEngine  # initializes MPI (thread level: multiple)

        return MpiEngine(self.agent_name, self._on_control, self._on_ep_error)
