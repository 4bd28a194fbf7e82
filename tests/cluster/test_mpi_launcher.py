"""The MPI launch mode's edges: what it refuses before any process starts (the real job runs
in tests/e2e/test_transports.py[mpi] and tests/dataplane, over the mpi transport)."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, config_from_dict
from cluster.launcher import LauncherError, WorkerGroupSpec
from cluster.mpi_launcher import MpiLauncher
from protocol.worker_spec import WorkerSpec
from splitserve.cli import build_parser
from splitserve.serve import check_launcher, launcher_factory


def test_the_mpi_transport_needs_the_mpi_launcher() -> None:
    config = config_from_dict({"kvtransfer": {"backend": "mpi"}})
    with pytest.raises(ConfigError, match=r"kvtransfer\.backend: mpi connects ranks of one MPI job"):
        check_launcher(config, "local")
    check_launcher(config, "mpi")
    check_launcher(config_from_dict({"kvtransfer": {"backend": "tcp"}}), "mpi")  # any transport under mpi


def test_launcher_choice() -> None:
    assert launcher_factory("local") is None
    assert isinstance(launcher_factory("mpi")("token", {}), MpiLauncher)  # type: ignore[misc]
    with pytest.raises(ConfigError, match="--launcher: unknown launcher 'slurm'"):
        launcher_factory("slurm")
    assert build_parser().parse_args(["serve", "--launcher", "mpi"]).launcher == "mpi"
    assert build_parser().parse_args(["serve"]).launcher == "local"


def test_multi_rank_groups_are_refused(tmp_path) -> None:
    spec = WorkerSpec(role="decode", model="/m")
    launcher = MpiLauncher("token", log_dir=tmp_path)
    with pytest.raises(LauncherError, match="single-rank groups"):
        launcher.start([WorkerGroupSpec((spec, spec), tp=2)])
    assert launcher.job is None and launcher.close() is None
