"""The ranks of a sharded worker group (tp x pp > 1) inside worker processes.

Rank 0 is the worker: gRPC server, KV transport, registration, scheduler; it joins the group's
process group before building its engine (`join_as_rank0`) and releases the followers when it
stops. Every other rank is a follower process (``python -m worker_runtime.group --spec ...``):
it loads its shard, writes its ready file and runs rank 0's step plans until told to stop.

A follower ignores SIGTERM: the launcher signals every rank at once, and a follower that died
first would leave rank 0's last step waiting; it leaves when rank 0 says so (exit 0), or when
rank 0's process is gone (its collective fails: exit 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from engine.distributed.followers import join_group, release_followers, serve_as_follower
from protocol.worker_spec import WorkerSpec, WorkerSpecError

log = logging.getLogger("splitserve.worker.group")


def is_sharded(spec: WorkerSpec) -> bool:
    return spec.parallel_config().world_size > 1


def _address(spec: WorkerSpec) -> str:
    if ":" not in spec.group_address:
        raise WorkerSpecError(f"group_address: a tp x pp group needs host:port, got {spec.group_address!r}")
    return spec.group_address


def join_as_rank0(spec: WorkerSpec) -> None:
    """Rank 0: rendezvous with the followers (blocks until all have joined)."""
    join_group(spec.engine_config(), _address(spec))


def leave_as_rank0() -> None:
    release_followers()


def run_follower(spec: WorkerSpec) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    address = _address(spec)
    cfg = spec.engine_config()
    log.info("rank %d of %s: joining %s", cfg.parallel.rank, spec.worker_id or spec.role, address)
    join_group(cfg, address)

    def ready() -> None:
        info = {"worker_id": spec.worker_id, "address": "", "agent_name": "", "pid": os.getpid(),
                "role": spec.role, "rank": cfg.parallel.rank}
        if spec.ready_file:
            tmp = Path(f"{spec.ready_file}.tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(spec.ready_file)
        log.info("rank %d ready", cfg.parallel.rank)

    try:
        serve_as_follower(cfg, on_ready=ready)
    finally:
        release_followers()
    log.info("rank %d released by rank 0", cfg.parallel.rank)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve-follower", description="a follower rank of a worker group")
    ap.add_argument("--spec", required=True, help="this rank's WorkerSpec as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SPLITSERVE_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = WorkerSpec.from_json(args.spec)
    except (ValueError, WorkerSpecError) as e:
        print(f"error: worker spec: {e}", file=sys.stderr)
        return 2
    return run_follower(spec)


if __name__ == "__main__":
    sys.exit(main())
