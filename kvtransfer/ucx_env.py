"""UCX process environment shared by the UCX-based backends (nixl, ucxx).

UCX's TCP transport listens on every network device it finds, so a worker whose host is
loopback would still accept UCX connections on the machine's external interfaces. For a
loopback host `bind_ucx_to` restricts UCX to the loopback device (``UCX_NET_DEVICES=lo``;
shared memory and CUDA IPC are not network devices and stay available); an operator's own
``UCX_NET_DEVICES`` wins. It must run before the process's first UCX context.
"""

from __future__ import annotations

import ipaddress
import os
import sys


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_ucx_to(host: str) -> None:
    if is_loopback(host) and sys.platform == "linux":
        os.environ.setdefault("UCX_NET_DEVICES", "lo")
