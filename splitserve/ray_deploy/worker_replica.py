"""`WorkerReplica`: one Serve replica = one worker group, running the local launcher's worker process.

The replica is a thin supervisor: it resolves the model on its node, starts the worker as a child
process (`cluster.local_workers.WorkerProcess`, the very spec and environment the local launcher
uses), and answers Serve's ``check_health`` from the worker's own health. In a sharded pool
(tp x pp > 1) that worker is rank 0 and the other ranks run in the other bundles of the replica's
placement group (`splitserve.ray_deploy.follower_ranks`); the group lives and dies as one: a dead
rank fails the health check, and the replacement stops every rank left. Request traffic never
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

from cluster.config import ConfigError
from cluster.group_processes import free_group_address, group_rank_specs
from cluster.launcher import WorkerStartError
from cluster.local_workers import WorkerProcess
from engine.model_store import pull
from protocol.control_plane import ControlPlane
from protocol.decode_client import DecodeClient
from protocol.prefill_client import PrefillClient
from protocol.worker_spec import WorkerSpec
from splitserve.ray_deploy.follower_ranks import dead_follower, start_followers, stop_followers, wait_followers_ready
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
        env = {REDIS_URL_ENV: redis_url, REGISTRY_TTL_ENV: str(ttl_s),
               PARENT_PID_ENV: str(os.getpid())}  # the worker stops itself if this replica dies
        self.spec, self.token, self.drain_timeout_s = spec, token, drain_timeout_s
        self._log_dir = tempfile.mkdtemp(prefix=f"splitserve-ray-{spec.worker_id}-")
        self.followers: list[Any] = []
        try:
            self.proc = self._start_group(env, start_timeout_s)
        except BaseException:
            stop_followers(self.followers, timeout=0.0)
            raise
        client_cls = DecodeClient if spec.role == "decode" else PrefillClient
        self.client: DecodeClient | PrefillClient = client_cls(self.proc.address, token)
        self.control_plane = ControlPlane.from_url(redis_url, ttl_s=ttl_s, token=token)
        log.info("%s ready at %s (pid %s, %d ranks)", spec.worker_id, self.proc.address, self.proc.pid,
                 len(self.followers) + 1)

    def _start_group(self, env: dict[str, str], timeout: float) -> WorkerProcess:
        """Rank 0 here, the followers in bundles 1.. (all on the group's rendezvous address: this
        node's IP and a free port, where rank 0 listens); returns rank 0 once every rank is ready."""
        spec = self.spec
        ranks = [spec]
        if spec.tp_size * spec.pp_size > 1:
            _check_shape(spec)
            address = free_group_address(ray.util.get_node_ip_address())
            ranks = [r.replace(group_address=address)
                     for r in group_rank_specs(spec, spec.tp_size, spec.pp_size, spec.ep_size)]
            self.followers = start_followers(ranks[1:], self.token, env)
        proc = WorkerProcess(ranks[0], self.token, env={**os.environ, **env}, log_dir=self._log_dir).spawn()
        deadline = time.monotonic() + timeout
        try:  # a follower that dies would leave rank 0 waiting at the rendezvous: watch every rank
            while not (wait_followers_ready(self.followers, deadline) & proc.poll_ready()):
                if proc.returncode is not None:
                    raise WorkerStartError(f"{spec.worker_id}: rank 0 exited with {proc.returncode}:\n"
                                           f"{proc.log_tail()}")
                if time.monotonic() > deadline:
                    raise WorkerStartError(f"{spec.worker_id}: not ready after {timeout:g}s:\n{proc.log_tail()}")
                time.sleep(0.2)
        except BaseException:
            proc.kill()
            raise
        return proc

    def check_health(self) -> None:
        """Raise unless the worker process lives, its engine loop answers ``Status`` with the
        transport registered and a sound block manager, and the control plane answers."""
        code = self.proc.returncode
        if code is not None:
            raise RuntimeError(f"{self.spec.worker_id}: worker exited with {code}:\n{self.proc.log_tail(2000)}")
        if self.followers and (dead := dead_follower(self.followers)) is not None:
            raise RuntimeError(f"{self.spec.worker_id}: {dead}")
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
        """Mark the worker draining, wait until idle (or ``drain_timeout_s``), then stop it and
        its followers (which rank 0 releases as it stops)."""
        proc = getattr(self, "proc", None)
        if proc is not None and proc.returncode is None:
            self._drain_and_stop_rank0(proc)
        followers, self.followers = getattr(self, "followers", []), []
        stop_followers(followers)

    def _drain_and_stop_rank0(self, proc: WorkerProcess) -> None:
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


def _check_shape(spec: WorkerSpec) -> None:
    """`ConfigError` naming the pool's field when tp/pp/ep cannot split the model (before any rank starts)."""
    from engine.config import ModelConfig
    from engine.distributed.shapes import GroupShapeError, check_group_shape
    from engine.weights import resolve_model

    pool = spec.role
    try:
        check_group_shape(ModelConfig.from_hf_dict(resolve_model(spec.model)[0]), spec.tp_size, spec.pp_size,
                          spec.ep_size, fields=(f"{pool}.tp", f"{pool}.pp", f"{pool}.ep"))
    except GroupShapeError as e:
        raise ConfigError(str(e)) from None
