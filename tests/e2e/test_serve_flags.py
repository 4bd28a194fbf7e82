"""`splitserve` flags a new user reaches for first, checked without starting a cluster.

Everything here fails (or warns) before the model loads, which is the point: a taken port, an
exposed router without a key, ``cuda`` on a CPU-only torch are each one line, not a traceback
after a minute of start-up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cluster.config import ClusterConfig, ConfigError, load_config
from engine.config import EngineConfig
from engine.errors import DeviceUnavailableError
from splitserve import __version__
from splitserve.cli import _serve_overrides, build_parser
from splitserve.launch_options import apply_overrides, exposure_warning, is_local_bind

pytestmark = pytest.mark.slow  # each case is a CLI subprocess (imports torch): seconds apiece

REPO = Path(__file__).resolve().parents[2]
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error (this machine has CUDA)")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitserve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


@pytest.fixture
def taken_port(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A port something else already listens on (``host`` from the test's parameter, if any)."""
    host = getattr(request, "param", "127.0.0.1")
    with socket.socket() as s:
        s.bind((host, 0))
        s.listen()
        yield host, s.getsockname()[1]


def test_version() -> None:
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"splitserve {__version__}", r


def test_taken_port_is_one_clear_line_before_anything_starts(taken_port: tuple[str, int]) -> None:
    _, port = taken_port
    r = _run("serve", "--port", str(port))
    assert r.returncode == 2, r.stderr
    assert f"error: router.port: port {port} on 127.0.0.1 is already in use" in r.stderr
    assert "Traceback" not in r.stderr and "starting" not in r.stderr  # no worker was spawned
    assert "warning" not in r.stderr  # 127.0.0.1 is the default bind: nothing to warn about


@pytest.mark.parametrize("taken_port", ["0.0.0.0"], indirect=True)
def test_exposed_router_without_api_key_warns(taken_port: tuple[str, int]) -> None:
    host, port = taken_port  # taken, so serve stops right after its start-up checks
    r = _run("serve", "--host", host, "--port", str(port))
    assert "splitserve: warning: the router listens on 0.0.0.0 without an API key" in r.stderr, r.stderr
    assert r.returncode == 2 and "already in use" in r.stderr
    keyed = _run("serve", "--host", host, "--port", str(port), "--api-key", "s3cret")
    assert "warning" not in keyed.stderr and keyed.returncode == 2, keyed.stderr


def test_bind_default_is_local() -> None:
    config = load_config(None)
    assert config.router.host == "127.0.0.1" and exposure_warning(config) is None
    assert is_local_bind("127.0.0.1") and is_local_bind("::1") and is_local_bind("localhost")
    assert not is_local_bind("0.0.0.0") and not is_local_bind("10.1.2.3") and not is_local_bind("myhost")


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("router:\n  port: 9000\n  host: 0.0.0.0\ndecode:\n  max_num_seqs: 8\n")
    args = build_parser().parse_args([
        "serve", "--config", str(path), "--port", "9100", "--set", "router.port=9200", "--set",
        "decode.max_num_seqs=32", "--model", "/models/m.gguf", "--api-key", "a", "--api-key", "b", "--quiet",
    ])
    config = apply_overrides(load_config(path), _serve_overrides(args))
    assert config.router.port == 9100  # the named flag beats --set
    assert config.router.host == "0.0.0.0" and config.decode.max_num_seqs == 32
    assert config.model == "/models/m.gguf" and config.router.api_keys == ("a", "b")
    assert config.router.log_requests is False
    assert apply_overrides(config, {}) is config


@pytest.mark.parametrize(("overrides", "message"), [
    ({"decode.replicas": 0}, "decode.replicas"),
    ({"router.nope": 1}, "router.nope: unknown field"),
    ({"model.x": 1}, "model: not a config section"),
])
def test_bad_override_names_the_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(ClusterConfig(), overrides)


def test_malformed_set_is_a_clear_error() -> None:
    r = _run("serve", "--set", "router.port")
    assert r.returncode == 2 and "expected KEY=VALUE" in r.stderr and "Traceback" not in r.stderr


def test_cuda_without_cuda_is_a_named_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere: torch is told there is no GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match=r"^device: cuda requested"):
        EngineConfig(model="m", device="cuda:0")
    config = ClusterConfig(device="cuda", dtype="bfloat16")  # still a valid config to edit or ship
    with pytest.raises(ConfigError, match=r"^device: cuda requested"):
        config.check_runs_here()
    ClusterConfig().check_runs_here()  # cpu: fine


@CPU_ONLY
def test_generate_on_cuda_with_cpu_torch_is_one_line() -> None:
    r = _run("generate", "--device", "cuda", "Hi")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: device: cuda requested, but this torch") and "use device cpu" in line


@CPU_ONLY
def test_serve_on_cuda_with_cpu_torch_names_the_field() -> None:
    r = _run("serve", "--set", "device=cuda", "--set", "dtype=bfloat16", "--port", "0")
    assert r.returncode == 2 and "error: device: cuda requested" in r.stderr and "Traceback" not in r.stderr
    assert "starting" not in r.stderr
