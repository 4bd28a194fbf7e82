"""`WorkerReplica`: one Serve replica = one worker group, running the local launcher's worker process.

The replica is a thin supervisor: it resolves the model on its node, starts the worker as a child
process (`cluster.local_workers.WorkerProcess`, the very spec and environment the local launcher
uses), and answers Serve's ``check_health`` from the worker's own health. Request traffic never
goes through Serve here: the router dials the worker's gRPC endpoint, found in the control plane.

Removal (scale-down, ``down``) drains: the worker is told (`DRAIN_SIGNAL`) to publish itself as
draining, so the router sends it nothing new, finishes what it has, and only then gets SIGTERM. A worker that
dies (kill -9, OOM) fails the next health check and Serve replaces the replica.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from typing import Any

import ray
from ray import serve

from cluster.local_workers import WorkerProcess
from engine.model_store import pull
from protocol.control_plane import ControlPlane
from protocol.decode_client import DecodeClient
from protocol.prefill_client import PrefillClient
from protocol.worker_spec import WorkerSpec
from worker_runtime.agent import PARENT_PID_ENV, REDIS_URL_ENV, REGISTRY_TTL_ENV
from worker_runtime.main import DRAIN_SIGNAL

log = logging.getLogger(__name__)

IDLE_CONFIRM_S = 1.0
"""How long a drained worker must stay idle before it is stopped: the router's view of the
registry lags by its poll interval (0.25 s), so a request chosen just before the worker said
it drains may still arrive."""


def _is_idle(status: Any) -> bool:
    return status.num_running == 0 and status.num_waiting == 0 and status.num_leases == 0


class WorkerReplica:
    """Init args: the pool's `WorkerSpec` as JSON (``model`` is the config's name, resolved here),
    the cluster token, the control-plane URL and the registry TTL."""

    def __init__(self, spec_json: str, token: str, redis_url: str, ttl_s: float,
                 start_timeout_s: float = 600.0, drain_timeout_s: float = 300.0) -> None:
        spec = WorkerSpec.from_json(spec_json)
        replica = serve.get_replica_context().replica_id.unique_id
        spec = spec.replace(model=str(pull(spec.model, progress=False)), worker_id=f"{spec.role}-{replica}",
                            host=ray.util.get_node_ip_address())
        env = {**os.environ, REDIS_URL_ENV: redis_url, REGISTRY_TTL_ENV: str(ttl_s),
               PARENT_PID_ENV: str(os.getpid())}  # the worker stops itself if this replica dies
        self.spec, self.token, self.drain_timeout_s = spec, token, drain_timeout_s
        self._log_dir = tempfile.mkdtemp(prefix=f"splitserve-ray-{spec.worker_id}-")
        self.proc = WorkerProcess(spec, token, env=env, log_dir=self._log_dir).spawn()
        self.proc.wait_ready(start_timeout_s)  # raises with the log tail: Serve reports it
        client_cls = DecodeClient if spec.role == "decode" else PrefillClient
        self.client: DecodeClient | PrefillClient = client_cls(self.proc.address, token)
        self.control_plane = ControlPlane.from_url(redis_url, ttl_s=ttl_s, token=token)
        log.info("%s ready at %s (pid %s)", spec.worker_id, self.proc.address, self.proc.pid)

    def check_health(self) -> None:
        """Raise unless the worker process lives, its engine loop answers ``Status`` with the
        transport registered and a sound block manager, and the control plane answers."""
        code = self.proc.returncode
        if code is not None:
            raise RuntimeError(f"{self.spec.worker_id}: worker exited with {code}:\n{self.proc.log_tail(2000)}")
        status = self.client.status(timeout=5.0)
        if not status.agent_name:
            raise RuntimeError(f"{self.spec.worker_id}: KV transport not registered")
        if status.integrity_error:
            raise RuntimeError(f"{self.spec.worker_id}: block manager integrity: {status.integrity_error}")
        self.control_plane.client.ping()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (`splitserve.ray_deploy.autoscaling`): sequences here."""
        s = self.client.status(timeout=5.0)
        return {"load": float(s.num_running + s.num_waiting)}

    def __del__(self) -> None:
        self.drain_and_stop()

    def drain_and_stop(self) -> None:
        """Mark the worker draining, wait until idle (or ``drain_timeout_s``), then stop it."""
        proc = getattr(self, "proc", None)
        if proc is None or proc.returncode is not None:
            return
        os.kill(proc.pid, DRAIN_SIGNAL)
        deadline = time.monotonic() + self.drain_timeout_s
        idle_since: float | None = None
        while time.monotonic() < deadline and proc.returncode is None:
            try:
                idle = _is_idle(self.client.status(timeout=2.0))
            except Exception:
                break  # not answering: nothing left to wait for
            now = time.monotonic()
            idle_since = (idle_since or now) if idle else None
            if idle_since is not None and now - idle_since >= IDLE_CONFIRM_S:
                break
            time.sleep(0.1)
        proc.stop(timeout=15.0)
        self.client.close()
        self.control_plane.close()
        if proc.returncode in (0, -signal.SIGTERM):
            import shutil

            shutil.rmtree(self._log_dir, ignore_errors=True)
