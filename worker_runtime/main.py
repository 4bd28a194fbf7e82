"""Process entry point of one prefill or decode worker.

    python -m decode_worker --spec '{"role": "decode", "model": "/models/smollm2", ...}'
    python -m prefill_worker --spec-file decode.json

The spec is a `WorkerSpec` as JSON; the cluster token comes from ``SPLITSERVE_CLUSTER_TOKEN``.
Once serving, the worker prints one ``READY {json}`` line (worker_id, address, agent_name, pid)
and, when the spec names a ``ready_file``, writes the same JSON there (atomically), which is
what `cluster.local_workers.WorkerProcess` waits for. SIGTERM or SIGINT stop it cleanly:
engine loop, transport, then gRPC server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from protocol.grpc_auth import set_process_tls
from protocol.worker_spec import TOKEN_ENV, WorkerSpec, WorkerSpecError
from worker_runtime.agent import PARENT_PID_ENV
from worker_runtime.group import is_sharded, join_as_rank0, leave_as_rank0
from worker_runtime.runtime import RunningWorker

log = logging.getLogger("splitserve.worker")


Starter = Callable[[WorkerSpec, str], RunningWorker]
DRAIN_SIGNAL = signal.SIGUSR1
"""Sent by a launcher that removes this worker (a Ray Serve scale-down): stop taking work, finish the rest."""


def _write_ready(path: str, info: dict[str, object]) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def run(starter: Starter, spec: WorkerSpec, token: str) -> int:
    if spec.num_threads > 0:
        import torch

        torch.set_num_threads(spec.num_threads)
    stop, drain = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(DRAIN_SIGNAL, lambda *_: drain.set())
    set_process_tls(spec.grpc_tls())  # its clients (prefill peers, lease renewals) verify with the CA
    t0 = time.monotonic()
    log.info("starting %s worker: loading %s (%s on %s)", spec.role, spec.model, spec.dtype, spec.device)
    if is_sharded(spec):  # rank 0 of a tp x pp group: the followers must be there before the engine
        join_as_rank0(spec)
    worker = starter(spec, token)
    info = {"worker_id": worker.worker_id, "address": worker.address, "agent_name": worker.agent_name,
            "pid": os.getpid(), "role": spec.role}
    log.info("%s ready in %.1fs at %s", worker.worker_id, time.monotonic() - t0, worker.address)
    if spec.ready_file:
        _write_ready(spec.ready_file, info)
    print("READY " + json.dumps(info), flush=True)
    _serve_until_stopped(worker, stop, drain)
    log.info("%s stopping", worker.worker_id)
    worker.stop()
    if is_sharded(spec):
        leave_as_rank0()
    return 0


def _serve_until_stopped(worker: RunningWorker, stop: threading.Event, drain: threading.Event) -> None:
    """Wait for SIGTERM; a `DRAIN_SIGNAL` first marks the worker draining in the control plane
    (the router sends it nothing new; streams in flight finish here). The launcher watch here
    doubles the agent's, which keeps running while the worker drains."""
    parent = int(os.environ[PARENT_PID_ENV]) if os.environ.get(PARENT_PID_ENV) else None
    drained = False
    while not stop.wait(0.2):
        if drain.is_set() and not drained:
            log.info("%s draining: taking nothing new, finishing what it has", worker.worker_id)
            worker.drain()
            drained = True
        if drained and parent is not None and os.getppid() != parent:
            log.warning("%s: launcher %s is gone while draining; stopping", worker.worker_id, parent)
            return


def main(starter: Starter, argv: list[str] | None = None) -> int:
    """The process entry of a worker package (``python -m decode_worker``): ``starter`` builds it."""
    ap = argparse.ArgumentParser(prog="splitserve-worker", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="WorkerSpec as a JSON object")
    src.add_argument("--spec-file", help="path of a JSON WorkerSpec")
    ap.add_argument("--log-level", default=os.environ.get("SPLITSERVE_LOG_LEVEL", "INFO"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        text = args.spec if args.spec is not None else Path(args.spec_file).read_text()
        spec = WorkerSpec.from_json(text)
    except (OSError, ValueError, WorkerSpecError) as e:
        print(f"error: worker spec: {e}", file=sys.stderr)
        return 2
    return run(starter, spec, os.environ.get(TOKEN_ENV, ""))
