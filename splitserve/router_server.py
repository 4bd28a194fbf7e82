"""The router's HTTP server: uvicorn on a thread of the launcher process.

A thread, not a process: the router is light (tokenize, route, relay streams) and sharing the
launcher's process keeps one Ctrl-C target and one place that owns shutdown order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from splitserve.errors import ClusterStartError


class RouterServer:
    """``port`` 0 picks a free port; after `start` it is the bound one. ``on_exit`` runs on the
    server thread once uvicorn returned (closing what the app held open)."""

    def __init__(self, app: FastAPI, host: str, port: int, on_exit: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._on_exit = on_exit
        self._server = uvicorn.Server(uvicorn.Config(
            app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5, lifespan="on",
        ))
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 30.0) -> RouterServer:
        """Listen, or raise `ClusterStartError` (port taken, no start within ``timeout``)."""
        self._thread = threading.Thread(target=self._run, daemon=True, name="router")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise ClusterStartError(f"the router could not listen on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                raise ClusterStartError(f"the router did not start within {timeout:.0f}s")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop taking requests, let open streams finish briefly, then force. Idempotent."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(10.0)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5.0)

    def _run(self) -> None:
        try:
            self._server.run()
        finally:
            self._on_exit()
