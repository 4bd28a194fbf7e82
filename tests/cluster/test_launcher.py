"""The `Launcher` seam through its local implementation: real worker processes started, watched
and stopped through the interface only; a failing or slow start reports its log tail; log folders
are removed after a clean stop and kept after a death."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from cluster.launcher import LauncherError, WorkerGroupSpec, WorkerStartError
from cluster.local_launcher import LocalProcessLauncher
from protocol.decode_client import DecodeClient
from protocol.prefill_client import PrefillClient
from protocol.worker_spec import WorkerSpec

TOKEN = "launcher-test-token"


def _spec(role: str, model: str | Path, **kw: object) -> WorkerSpec:
    return WorkerSpec(role=role, model=str(model), worker_id=f"{role}-0", transport="tcp",  # type: ignore[arg-type]
                      num_kv_blocks=32, num_threads=1, **kw)


# ---- the spec types (no process) ---------------------------------------------------------------

def test_group_spec_shape_is_checked() -> None:
    one = _spec("decode", "/m")
    assert WorkerGroupSpec.single(one).world_size == 1
    with pytest.raises(LauncherError, match="tp=2 x pp=1 group needs 2 rank specs, got 1"):
        WorkerGroupSpec((one,), tp=2)
    with pytest.raises(LauncherError, match="same role"):
        WorkerGroupSpec((one, _spec("prefill", "/m")), tp=2)


def test_local_launcher_refuses_mismatched_rank_specs_before_starting_anything(tmp_path: Path) -> None:
    group = WorkerGroupSpec((_spec("decode", "/m"), _spec("decode", "/m")), tp=2)  # both say "rank 0 of 1"
    with LocalProcessLauncher(TOKEN, log_dir=tmp_path) as launcher:
        with pytest.raises(LauncherError, match="rank 0 spec says tp_size=1"):
            launcher.start([group])
        assert launcher.stop() == []


# ---- real processes ------------------------------------------------------------------------------

def test_start_watch_stop_and_a_clean_stop_removes_the_log_folder(smollm2_path: Path) -> None:
    launcher = LocalProcessLauncher(TOKEN)  # owns a fresh temp log folder
    log_dir = Path(launcher.log_location)
    [prefill, decode] = launcher.start([WorkerGroupSpec.single(_spec(r, smollm2_path)) for r in ("prefill", "decode")])
    try:
        early = decode.status()
        assert early.alive and early.exit_code is None and Path(early.log).is_relative_to(log_dir)
        launcher.wait_ready([prefill, decode], timeout=300)
        assert (prefill.worker_id, decode.worker_id) == ("prefill-0", "decode-0")
        with DecodeClient(decode.address, TOKEN) as d, PrefillClient(prefill.address, TOKEN) as p:
            assert d.status().num_free_blocks == d.status().num_total_blocks == 32  # really serving
            assert p.status().num_total_blocks == 32
        assert "READY" in decode.log_tail()
    finally:
        statuses = launcher.stop(grace_s=15)
    assert [(s.alive, s.exit_code) for s in statuses] == [(False, 0), (False, 0)]
    assert all(s.clean_exit for s in statuses)
    assert log_dir.is_dir()  # stop() alone keeps the logs readable
    assert launcher.close() is None
    assert not log_dir.exists()


def test_a_killed_worker_is_reported_and_its_logs_are_kept(smollm2_path: Path) -> None:
    launcher = LocalProcessLauncher(TOKEN)
    [decode] = launcher.start([WorkerGroupSpec.single(_spec("decode", smollm2_path))])
    try:
        launcher.wait_ready([decode], timeout=300)
        launcher.kill(decode)
        st = decode.status()
        assert not st.alive and st.exit_code == -9 and not st.clean_exit
        assert not decode.alive()
    finally:
        kept = launcher.close()
    assert kept == launcher.log_location
    assert (Path(kept) / Path(st.log).parent.name / "worker.log").is_file()
    other = LocalProcessLauncher(TOKEN)
    with pytest.raises(LauncherError, match="not started by this launcher"):
        other.kill(decode)
    assert other.close() is None


def test_a_failing_start_reports_its_log_tail_and_keeps_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    launcher = LocalProcessLauncher(TOKEN)
    [group] = launcher.start([WorkerGroupSpec.single(_spec("decode", missing))])
    with pytest.raises(WorkerStartError) as err:
        launcher.wait_ready([group], timeout=120)
    message = str(err.value)
    assert message.startswith("decode-0 worker exited with 1 (log: ")
    assert str(missing) in message  # the worker's own error, from its log
    assert group.status().exit_code == 1
    kept = launcher.close()
    assert kept is not None and Path(kept).is_dir()
    assert str(missing) in next(Path(kept).glob("*/worker.log")).read_text()


def test_a_start_past_its_deadline_is_killed_and_reported(smollm2_path: Path, tmp_path: Path) -> None:
    with LocalProcessLauncher(TOKEN, log_dir=tmp_path) as launcher:
        [group] = launcher.start([WorkerGroupSpec.single(_spec("decode", smollm2_path))])
        pid = group.pid
        with pytest.raises(WorkerStartError, match=r"decode-0 worker not ready after 0s"):
            launcher.wait_ready([group], timeout=0.2)
        assert not group.alive() and group.status().exit_code == -9
        assert not psutil.pid_exists(pid)  # killed and reaped, not left as a zombie
    assert tmp_path.is_dir()  # a folder the caller gave is the caller's: never removed
