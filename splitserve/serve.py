"""`splitserve serve`: a whole disaggregated cluster on this machine, behind the router.

`LocalCluster` is the launcher that `serve` and the end-to-end tests share. Start-up order is
what lets each piece trust the one before: control plane (a private ``redis-server`` on a free
port, or the configured URL) -> worker processes (they load the model in parallel, then
register themselves through `worker_runtime.agent`) -> wait until every one is registered ->
the router (uvicorn) on ``router.host:port``. Shutdown runs the same steps backwards: the router
stops taking requests, workers get SIGTERM (SIGKILL after a grace period), Redis stops last.

Nothing may outlive the launcher: a failed start-up stops what was already started, an
``atexit`` hook covers an interpreter exit, and each worker watches its launcher's pid
(``SPLITSERVE_PARENT_PID``) and stops itself if the launcher disappears, even by SIGKILL.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import uvicorn
from fastapi import FastAPI

from cluster.config import ClusterConfig, ConfigError, load_config
from cluster.local_workers import WorkerProcess, WorkerStartError
from cluster.redis_server import EmbeddedRedis, RedisServerError
from engine.errors import SplitserveError
from protocol.control_plane import ControlPlane
from protocol.worker_spec import WorkerSpec
from worker_runtime.agent import DEFAULT_TTL_S, PARENT_PID_ENV, REDIS_URL_ENV, REGISTRY_TTL_ENV

log = logging.getLogger(__name__)


class ClusterStartError(SplitserveError):
    """The local cluster could not be started; everything it had started is stopped again."""


class StartupInterrupted(ClusterStartError):
    """A signal (Ctrl-C, SIGTERM) arrived while the cluster was starting."""


def worker_specs(
    config: ClusterConfig, model: str, overrides: dict[str, Any] | None = None
) -> list[WorkerSpec]:
    """One `WorkerSpec` per worker process: ``prefill.replicas`` prefill, ``decode.replicas`` decode.

    The local launcher runs one rank per worker; TP/PP groups need the Ray launcher.
    """
    for pool in ("prefill", "decode"):
        section = getattr(config, pool)
        if section.tp * section.pp != 1:
            raise ConfigError(f"{pool}.tp/{pool}.pp: the local launcher runs single-rank workers (tp=pp=1)")
    n_workers = config.prefill.replicas + config.decode.replicas
    threads = max(1, (os.cpu_count() or 1) // n_workers) if config.device == "cpu" else 0
    common: dict[str, Any] = dict(
        model=model, dtype=config.dtype, device=config.device, block_size=config.block_size,
        kv_cache_memory=int(config.kv_cache_memory), max_model_len=config.max_model_len,
        max_num_batched_tokens=config.prefill.chunk_size, transport=config.kvtransfer.backend,
        transfer_timeout_s=config.kvtransfer.transfer_timeout_s, num_threads=threads,
        random_weights=config.random_weights, seed=config.seed, exact_attention=config.exact_attention,
    )
    seqs = config.decode.max_num_seqs
    specs = [
        WorkerSpec(role=role, worker_id=f"{role}-{i}", max_num_seqs=seqs, **common)
        for role, n in (("prefill", config.prefill.replicas), ("decode", config.decode.replicas))
        for i in range(n)
    ]
    return [s.replace(**(overrides or {})) for s in specs]


class LocalCluster:
    """Redis, worker processes and the router of one config; a context manager.

    ``router_port`` overrides ``router.port`` (0: a free port, see `url`); ``worker_overrides``
    are `WorkerSpec` fields applied to every worker (tests shorten leases with them).
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        router_port: int | None = None,
        worker_overrides: dict[str, Any] | None = None,
        registry_ttl_s: float = DEFAULT_TTL_S,
        startup_timeout_s: float = 600.0,
        log_dir: str | Path | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.config = config
        self.router_host = config.router.host
        self.router_port = config.router.port if router_port is None else router_port
        self.worker_overrides = dict(worker_overrides or {})
        self.registry_ttl_s = registry_ttl_s
        self.startup_timeout_s = startup_timeout_s
        # one folder for the cluster's worker logs, kept after exit for post-mortems
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="splitserve-logs-"))
        self.out = out
        self.token = secrets.token_urlsafe(32)  # fresh per cluster: workers of another run can't join
        self.redis: EmbeddedRedis | None = None
        self.redis_url = ""
        self.control_plane: ControlPlane | None = None
        self.workers: list[WorkerProcess] = []
        self.app: FastAPI | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._model: str | None = None

    # ---- what tests and callers read ----------------------------------------------------------

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.router_host in ("0.0.0.0", "::", "") else self.router_host
        return f"http://{host}:{self.router_port}"

    @property
    def router_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pool(self, role: str) -> list[WorkerProcess]:
        return [w for w in self.workers if w.spec.role == role]

    # ---- start --------------------------------------------------------------------------------

    def start(self, cancelled: Callable[[], bool] = lambda: False) -> LocalCluster:
        """Start everything; on any failure (or ``cancelled()`` turning true) stop what started."""
        atexit.register(self.stop)
        self._started = True
        try:
            self._start(cancelled)
        except BaseException:
            self.stop()
            raise
        return self

    def model_path(self) -> str:
        """The model folder, fetched and converted on first use (the embedded SmolLM2)."""
        if self._model is None:
            from engine.model_store import pull

            self._model = str(pull(self.config.model, progress=True))
        return self._model

    def _start(self, cancelled: Callable[[], bool]) -> None:
        model = self.model_path()
        specs = worker_specs(self.config, model, self.worker_overrides)
        self._start_redis()
        env = {
            **os.environ, REDIS_URL_ENV: self.redis_url, REGISTRY_TTL_ENV: str(self.registry_ttl_s),
            PARENT_PID_ENV: str(os.getpid()),
        }
        c = self.config
        self._say(f"starting {c.prefill.replicas} prefill + {c.decode.replicas} decode workers "
                  f"({Path(model).name}, {c.device}, KV over {c.kvtransfer.backend}); logs in {self.log_dir}")
        for i, spec in enumerate(specs):
            self.workers.append(WorkerProcess(spec, self.token, env=_device_env(env, spec, i),
                                              log_dir=self.log_dir).spawn())
        self._wait_workers(cancelled)
        self._wait_registered(cancelled)
        self._start_router()

    def _start_redis(self) -> None:
        if self.config.redis.embedded:
            try:
                self.redis = EmbeddedRedis().start()
            except RedisServerError as e:
                raise ClusterStartError(str(e)) from None
            self.redis_url = self.redis.url
        else:
            self.redis_url = self.config.redis.url
        self.control_plane = ControlPlane.from_url(self.redis_url, ttl_s=self.registry_ttl_s)
        try:
            self.control_plane.client.ping()
        except Exception as e:
            raise ClusterStartError(f"redis at {self.redis_url} is not reachable: {e}") from None

    def _wait_workers(self, cancelled: Callable[[], bool]) -> None:
        """Model loads run in parallel; wait for each ready file, checking for a signal."""
        deadline = time.monotonic() + self.startup_timeout_s
        for w in self.workers:
            while not w.ready_file.exists() and w.alive():
                if cancelled():
                    raise StartupInterrupted("interrupted while the workers were starting")
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            try:
                w.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
            except WorkerStartError as e:
                raise ClusterStartError(f"{w.spec.worker_id}: {e}\n(log: {w.log_path})") from None
            self._say(f"{w.worker_id} ready at {w.address} (pid {w.pid})")

    def _wait_registered(self, cancelled: Callable[[], bool], timeout: float = 30.0) -> None:
        assert self.control_plane is not None
        want = {w.worker_id for w in self.workers}
        deadline = time.monotonic() + timeout
        while True:
            have = {info.worker_id for info in self.control_plane.list_workers()}
            if want <= have:
                return
            dead = [w.worker_id for w in self.workers if not w.alive()]
            if dead:
                raise ClusterStartError(f"worker(s) exited during start-up: {dead}")
            if cancelled():
                raise StartupInterrupted("interrupted while the workers were registering")
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    f"worker(s) {sorted(want - have)} did not register in the control plane within "
                    f"{timeout:.0f}s (a worker joins it through worker_runtime.agent.attach_worker_agent)"
                )
            time.sleep(0.05)

    def _start_router(self) -> None:
        from engine.tokenizer import load_tokenizer
        from router.app import create_app
        from router.grpc_backend import GrpcBackend

        model = self.workers[0].spec.model
        backend = GrpcBackend(load_tokenizer(model), self.token)
        router_cp = ControlPlane.from_url(self.redis_url, ttl_s=self.registry_ttl_s)
        app = create_app(self.config, backend, router_cp)
        view = app.state.router.cluster
        backend.set_lookup(lambda wid: next((w.info for w in view.workers() if w.worker_id == wid), None))
        self.app = app
        config = uvicorn.Config(
            app, host=self.router_host, port=self.router_port, log_level="warning",
            timeout_graceful_shutdown=5, lifespan="on",
        )
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve_router, args=(server, router_cp), daemon=True,
                                        name="router")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not self._thread.is_alive():
                where = f"{self.router_host}:{self.router_port}"
                raise ClusterStartError(f"the router could not listen on {where}")
            if time.monotonic() > deadline:
                raise ClusterStartError("the router did not start within 30s")
            time.sleep(0.02)
        self.router_port = server.servers[0].sockets[0].getsockname()[1]

    @staticmethod
    def _serve_router(server: uvicorn.Server, control_plane: ControlPlane) -> None:
        try:
            server.run()
        finally:
            control_plane.close()

    # ---- stop ---------------------------------------------------------------------------------

    def stop(self, grace_s: float = 15.0) -> None:
        """Router, then workers (SIGTERM, SIGKILL after ``grace_s``), then Redis. Idempotent.

        Workers and redis-server run in sessions of their own, so a Ctrl-C in the terminal
        reaches only this launcher, which then stops them in this order, each exactly once.
        """
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10.0)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(5.0)
        workers, self.workers = self.workers, []
        if workers:
            with ThreadPoolExecutor(len(workers)) as pool:  # in parallel: each may take its grace period
                codes = list(pool.map(lambda w: w.stop(grace_s), workers))
            for w, code in zip(workers, codes):
                if code not in (0, None):
                    log.warning("%s exited with %s (log: %s)", w.spec.worker_id, code, w.log_path)
        if self.control_plane is not None:
            self.control_plane.close()
            self.control_plane = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _say(self, message: str) -> None:
        if self.out is not None:
            print(f"splitserve: {message}", file=self.out, flush=True)


def _device_env(env: dict[str, str], spec: WorkerSpec, index: int) -> dict[str, str]:
    """GPU workers take one device each, round-robin, unless the user pinned devices already."""
    if spec.device != "cuda" or "CUDA_VISIBLE_DEVICES" in env:
        return env
    import torch

    count = torch.cuda.device_count()
    return {**env, "CUDA_VISIBLE_DEVICES": str(index % count)} if count else env


def serve(config_path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> int:
    """The ``splitserve serve`` command: start, print where the router listens and ``ready``,
    run until SIGINT/SIGTERM, stop everything. Returns the exit code.

    ``overrides`` are dotted config paths set over the file (the CLI flags); the router's port
    is checked before anything starts, so a taken port costs a second, not a model load."""
    from splitserve.launch_options import apply_overrides, check_port_free, exposure_warning

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = apply_overrides(load_config(config_path), overrides or {})
        config.check_runs_here()
        if (warning := exposure_warning(config)) is not None:
            print(f"splitserve: warning: {warning}", file=sys.stderr, flush=True)
        check_port_free(config.router.host, config.router.port)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cluster = LocalCluster(config, out=sys.stderr)
    try:  # a download is the one long step before anything runs: plain Ctrl-C may abort it
        cluster.model_path()
    except KeyboardInterrupt:
        return 130
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            print(f"splitserve: {signal.Signals(signum).name}: shutting down", file=sys.stderr, flush=True)
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            cluster.start(cancelled=stop.is_set)
        except StartupInterrupted:
            return 0
        except (SplitserveError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        n_pre, n_dec = len(cluster.pool("prefill")), len(cluster.pool("decode"))
        print(f"splitserve: router listening on http://{cluster.router_host}:{cluster.router_port} "
              f"({n_pre} prefill, {n_dec} decode workers)", flush=True)
        print("ready", flush=True)
        _watch(cluster, stop)
        return 0
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch(cluster: LocalCluster, stop: threading.Event) -> None:
    """Wait for a signal; a worker that dies meanwhile is reported (the router routes around it)."""
    reported: set[str] = set()
    while not stop.wait(0.5):
        for w in cluster.workers:
            if not w.alive() and w.worker_id not in reported:
                reported.add(w.worker_id)
                print(f"splitserve: warning: {w.worker_id} exited (log: {w.log_path})",
                      file=sys.stderr, flush=True)
        if not cluster.router_alive:
            print("splitserve: error: the router stopped", file=sys.stderr, flush=True)
            return
