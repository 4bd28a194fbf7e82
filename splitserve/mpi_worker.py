"""``mpirun -n N splitserve worker --config FILE``: one worker per MPI rank, chosen by the config.

As TensorRT-LLM's disaggregated MPI workers: the config lists the workers (``prefill.replicas``
prefill, then ``decode.replicas`` decode, the order `serve.worker_specs` gives them), rank ``r``
of the job runs worker ``r``, and the job must have exactly that many ranks. The cluster token
(``SPLITSERVE_CLUSTER_TOKEN``) and the control plane (``SPLITSERVE_REDIS_URL``) come from the
environment, which ``mpirun`` passes to every rank; the ranks share ``COMM_WORLD``, so
``kvtransfer.backend: mpi`` works. Rank and size come from the process manager's environment
(MPICH/hydra ``PMI_RANK``/``PMI_SIZE``, Open MPI, PMIx), or ``--rank`` for a single worker.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig, ConfigError, load_config
from protocol.worker_spec import TOKEN_ENV, WorkerSpec

_RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def job_position(env: Mapping[str, str], rank: int | None = None) -> tuple[int, int | None]:
    """(rank, world size or None) from ``--rank`` or the process manager's environment."""
    if rank is not None:
        return rank, None
    found = next((env[k] for k in _RANK_ENV if env.get(k)), None)
    if found is None:
        raise ConfigError("splitserve worker: no MPI rank in the environment (run it under mpirun/mpiexec, "
                          "or pass --rank)")
    size = next((env[k] for k in _SIZE_ENV if env.get(k)), None)
    return int(found), int(size) if size is not None else None


def rank_spec(config: ClusterConfig, model: str, rank: int, size: int | None) -> WorkerSpec:
    """The worker that rank ``rank`` of a ``size``-rank job runs."""
    from splitserve.serve import worker_specs

    specs = worker_specs(config, model)
    if size is not None and size != len(specs):
        raise ConfigError(f"prefill.replicas/decode.replicas: the config has {len(specs)} workers "
                          f"but the MPI job has {size} ranks (mpirun -n {len(specs)})")
    if not 0 <= rank < len(specs):
        raise ConfigError(f"rank {rank}: the config has workers 0..{len(specs) - 1}")
    return specs[rank]


def run_worker(config_path: str | Path | None, overrides: Mapping[str, Any], rank: int | None) -> int:
    from engine.model_store import pull
    from splitserve.launch_options import apply_overrides

    try:
        config = apply_overrides(load_config(config_path), overrides)
        position = job_position(os.environ, rank)
        if not os.environ.get(TOKEN_ENV):
            raise ConfigError(f"{TOKEN_ENV}: set the cluster token in the environment of every rank")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = rank_spec(config, str(pull(config.model, progress=False)), *position)
    sys.argv = [f"{spec.role}_worker", "--spec", spec.to_json()]
    try:
        runpy.run_module(f"{spec.role}_worker", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0
