"""`splitserve serve`: a whole disaggregated cluster on this machine, behind the router.

`LocalCluster` composes the pieces that `serve` and the end-to-end tests share. Start-up order
is what lets each piece trust the one before: control plane (`RedisService`: a private
``redis-server`` on a free port, or the configured URL) -> worker groups, started through a
`Launcher` (they load the model in parallel, then register themselves through
`worker_runtime.agent`) -> wait until every one is registered -> the router (`RouterServer`,
uvicorn) on ``router.host:port``. Shutdown runs the same steps backwards: the router stops taking
requests, the launcher stops the workers (SIGTERM, SIGKILL after a grace period), Redis stops last.

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
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from fastapi import FastAPI

from cluster.config import ClusterConfig, ConfigError, load_config
from cluster.group_processes import group_rank_specs
from cluster.group_shapes import check_pairing, kv_groups
from cluster.launcher import Launcher, StartCancelled, WorkerGroupHandle, WorkerGroupSpec, WorkerStartError
from cluster.local_launcher import LocalProcessLauncher
from cluster.supervisor import SupervisionPolicy, Supervisor
from engine.errors import SplitserveError
from protocol.control_plane import ControlPlane
from protocol.grpc_auth import GrpcTls
from protocol.worker_spec import WorkerSpec
from router.settings import RouterSettings
from splitserve.errors import ClusterStartError, StartupInterrupted
from splitserve.redis_service import RedisService
from splitserve.router_server import RouterServer
from splitserve.router_settings import router_settings
from worker_runtime.agent import DEFAULT_TTL_S, PARENT_PID_ENV, REDIS_URL_ENV, REGISTRY_TTL_ENV

log = logging.getLogger(__name__)

__all__ = ["ClusterStartError", "LocalCluster", "StartupInterrupted", "serve", "worker_groups", "worker_specs"]

LauncherFactory = Callable[[str, Mapping[str, str]], Launcher]
"""Builds the cluster's launcher from the cluster token and the environment its workers need
(control-plane URL, TTL, the launcher's pid), known only once Redis runs, hence a factory."""


def worker_specs(
    config: ClusterConfig, model: str, overrides: dict[str, Any] | None = None
) -> list[WorkerSpec]:
    """One `WorkerSpec` per worker process: ``prefill.replicas`` prefill, ``decode.replicas`` decode.

    A sharded pool's spec is its groups' rank 0 (tp/pp/ep sizes set); `worker_groups` adds the ranks.
    """
    check_pairing(config)
    n_workers = config.prefill.replicas * config.prefill.world_size + config.decode.replicas * config.decode.world_size
    threads = max(1, (os.cpu_count() or 1) // n_workers) if config.device == "cpu" else 0
    common: dict[str, Any] = dict(
        model=model, dtype=config.dtype, device=config.device, block_size=config.block_size,
        kv_cache_memory=int(config.kv_cache_memory), max_model_len=config.max_model_len,
        max_num_batched_tokens=config.prefill.chunk_size, transport=config.kvtransfer.backend,
        transfer_timeout_s=config.kvtransfer.transfer_timeout_s, num_threads=threads,
        random_weights=config.random_weights, seed=config.seed, exact_attention=config.exact_attention,
        tls_cert_file=config.tls.cert_file, tls_key_file=config.tls.key_file, tls_ca_file=config.tls.ca_file,
        kv_groups=kv_groups(config),
    )
    seqs = config.decode.max_num_seqs
    own: dict[str, dict[str, Any]] = {
        "prefill": dict(max_queued_requests=config.prefill.max_queued_requests,
                        max_queued_prompt_tokens=config.prefill.max_queued_prompt_tokens,
                        gpu_memory_utilization=config.prefill.gpu_memory_utilization,
                        cuda_graphs=False),  # every prefill step pushes KV per layer: eager
        "decode": dict(gpu_memory_utilization=config.decode.gpu_memory_utilization,
                       cuda_graphs=config.decode.cuda_graphs,
                       overlap_scheduling=config.decode.overlap_scheduling),
    }
    shape: dict[str, dict[str, Any]] = {
        pool: dict(tp_size=sec.tp, pp_size=sec.pp, ep_size=getattr(sec, "ep", 1))
        for pool, sec in (("prefill", config.prefill), ("decode", config.decode))
    }
    specs = [
        WorkerSpec(role=role, worker_id=f"{role}-{i}", max_num_seqs=seqs, **common, **own[role], **shape[role])
        for role, n in (("prefill", config.prefill.replicas), ("decode", config.decode.replicas))
        for i in range(n)
    ]
    return [s.replace(**(overrides or {})) for s in specs]


def worker_groups(
    config: ClusterConfig, model: str, overrides: dict[str, Any] | None = None
) -> list[WorkerGroupSpec]:
    """The worker groups of a config: a group of tp x pp rank specs per worker (shapes checked on the model)."""
    specs = worker_specs(config, model, overrides)
    if any(s.tp_size * s.pp_size > 1 for s in specs):
        config.check_model(model)
    return [
        WorkerGroupSpec(group_rank_specs(s, s.tp_size, s.pp_size, s.ep_size), tp=s.tp_size, pp=s.pp_size)
        for s in specs
    ]


def create_router_app(settings: RouterSettings, model: str, token: str, redis_url: str,
                      ttl_s: float, tls: GrpcTls | None = None) -> tuple[FastAPI, ControlPlane]:
    """The router's app and the control-plane client it reads (closed when the server stops);
    ``tls``: the workers serve TLS, verified against its CA."""
    from engine.tokenizer import load_tokenizer
    from router.app import create_app
    from router.grpc_backend import GrpcBackend

    backend = GrpcBackend(load_tokenizer(model), token, tls=tls)
    router_cp = ControlPlane.from_url(redis_url, ttl_s=ttl_s, token=token)
    app = create_app(settings, backend, router_cp)
    view = app.state.router.cluster
    backend.set_lookup(lambda wid: next((w.info for w in view.workers() if w.worker_id == wid), None))
    return app, router_cp


class LocalCluster:
    """Redis, worker groups (through a `Launcher`) and the router of one config; a context manager.

    ``router_port`` overrides ``router.port`` (0: a free port, see `url`); ``worker_overrides``
    are `WorkerSpec` fields applied to every worker (tests shorten leases with them);
    ``log_dir`` is where local workers log (default: a temp folder, removed after a clean stop);
    ``make_launcher`` replaces the local process launcher.
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
        make_launcher: LauncherFactory | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.config = config
        self.router_settings = router_settings(config)  # a bad router.* field fails here, before any start
        self.router_host = config.router.host
        self.router_port = config.router.port if router_port is None else router_port
        self.worker_overrides = dict(worker_overrides or {})
        self.registry_ttl_s = registry_ttl_s
        self.startup_timeout_s = startup_timeout_s
        self.out = out
        self.token = secrets.token_urlsafe(32)  # fresh per cluster: workers of another run can't join
        self._make_launcher = make_launcher or (
            lambda token, extra: LocalProcessLauncher(token, env={**os.environ, **extra}, log_dir=log_dir)
        )
        self.redis: RedisService | None = None
        self.launcher: Launcher | None = None
        self.workers: list[WorkerGroupHandle] = []
        self.router: RouterServer | None = None
        self.supervisor: Supervisor | None = None
        self._started = False
        self._model: str | None = None

    # ---- what tests and callers read ----------------------------------------------------------

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.router_host in ("0.0.0.0", "::", "") else self.router_host
        return f"http://{host}:{self.router_port}"

    @property
    def app(self) -> FastAPI | None:
        return self.router.app if self.router is not None else None

    @property
    def control_plane(self) -> ControlPlane | None:
        return self.redis.control_plane if self.redis is not None else None

    @property
    def router_alive(self) -> bool:
        return self.router is not None and self.router.alive

    def pool(self, role: str) -> list[WorkerGroupHandle]:
        return [w for w in self.workers if w.role == role]

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
        groups = worker_groups(self.config, model, self.worker_overrides)
        self.redis = RedisService.start(self.config.redis, self.registry_ttl_s, self.token)
        self.launcher = self._make_launcher(self.token, {
            REDIS_URL_ENV: self.redis.url, REGISTRY_TTL_ENV: str(self.registry_ttl_s),
            PARENT_PID_ENV: str(os.getpid()),
        })
        c = self.config
        self._say(f"starting {c.prefill.replicas} prefill + {c.decode.replicas} decode workers "
                  f"({Path(model).name}, {c.device}, KV over {c.kvtransfer.backend}); "
                  f"logs in {self.launcher.log_location}")
        self.workers = self.launcher.start(groups)
        self._wait_ready(cancelled)
        self._wait_registered(cancelled)
        tls = GrpcTls(c.tls.ca_file, c.tls.cert_file, c.tls.key_file) if c.tls.enabled else None
        app, router_cp = create_router_app(self.router_settings, model, self.token, self.redis.url,
                                           self.registry_ttl_s, tls)
        self.router = RouterServer(app, self.router_host, self.router_port, on_exit=router_cp.close)
        self.router.start()
        self.router_port = self.router.port
        self.supervisor = self._supervise()

    def _supervise(self) -> Supervisor | None:
        """Restart dead workers and a dead embedded Redis (``supervision:``), counted in /metrics."""
        s = self.config.supervision
        if not (s.restart_workers or s.restart_redis) or self.launcher is None:
            return None
        assert self.redis is not None and self.router is not None
        metrics = self.router.app.state.router.metrics
        policy = SupervisionPolicy(s.restart_workers, s.restart_redis, s.max_restarts, s.backoff_s)
        return Supervisor(self.launcher, self.workers, policy, self.redis.server,
                          on_restart=lambda name: metrics.worker_restarts.labels(name).inc()).start()

    def _wait_ready(self, cancelled: Callable[[], bool]) -> None:
        assert self.launcher is not None
        try:
            self.launcher.wait_ready(self.workers, self.startup_timeout_s, cancelled)
        except StartCancelled:
            raise StartupInterrupted("interrupted while the workers were starting") from None
        except WorkerStartError as e:
            raise ClusterStartError(str(e)) from None
        for w in self.workers:
            self._say(f"{w.worker_id} ready at {w.address}")

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
        if self.supervisor is not None:  # first: a deliberate stop must not be undone
            self.supervisor.stop()
        if self.router is not None:
            self.router.stop()
        if self.launcher is not None:
            self._stop_workers(self.launcher, grace_s)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def _stop_workers(self, launcher: Launcher, grace_s: float) -> None:
        workers, self.workers = self.workers, []
        for w, st in zip(workers, launcher.stop(workers, grace_s)):
            if st.exit_code not in (0, None):
                log.warning("%s exited with %s (log: %s)", w.worker_id, st.exit_code, st.log)
        kept = launcher.close()
        if kept is not None:
            self._say(f"a worker did not stop cleanly: worker logs kept in {kept}", logging.WARNING)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _say(self, message: str, level: int = logging.INFO) -> None:
        if self.out is not None:
            print(f"splitserve: {message}", file=self.out, flush=True)
        else:
            log.log(level, message)


def launcher_factory(name: str, log_dir: str | Path | None = None) -> LauncherFactory | None:
    """``local`` (None: `LocalCluster`'s default) or ``mpi`` (one ``mpiexec`` job, `cluster.mpi_launcher`)."""
    if name == "local":
        return None
    if name == "mpi":
        from cluster.mpi_launcher import MpiLauncher

        return lambda token, extra: MpiLauncher(token, env={**os.environ, **extra}, log_dir=log_dir)
    raise ConfigError(f"--launcher: unknown launcher {name!r}; choose local or mpi")


def check_launcher(config: ClusterConfig, launcher: str) -> None:
    """The mpi transport reaches peers by rank: only workers of one MPI job can use it."""
    if config.kvtransfer.backend == "mpi" and launcher != "mpi":
        raise ConfigError("kvtransfer.backend: mpi connects ranks of one MPI job; start with --launcher mpi")


def serve(config_path: str | Path | None, overrides: Mapping[str, Any] | None = None,
          launcher: str = "local") -> int:
    """The ``splitserve serve`` command: start, print where the router listens and ``ready``,
    run until SIGINT/SIGTERM, stop everything. Returns the exit code.

    ``overrides`` are dotted config paths set over the file (the CLI flags); the router's port
    is checked before anything starts, so a taken port costs a second, not a model load."""
    from splitserve.launch_options import apply_overrides, check_port_free, exposure_warning

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = apply_overrides(load_config(config_path), overrides or {})
        router_settings(config)  # the router's own checks (policy name) at load time too
        config.check_runs_here()
        if (warning := exposure_warning(config)) is not None:
            print(f"splitserve: warning: {warning}", file=sys.stderr, flush=True)
        check_port_free(config.router.host, config.router.port)
        check_launcher(config, launcher)
        make_launcher = launcher_factory(launcher)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cluster = LocalCluster(config, out=sys.stderr, make_launcher=make_launcher)
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
                print(f"splitserve: warning: {w.worker_id} exited (log: {w.status().log})",
                      file=sys.stderr, flush=True)
        if not cluster.router_alive:
            print("splitserve: error: the router stopped", file=sys.stderr, flush=True)
            return
