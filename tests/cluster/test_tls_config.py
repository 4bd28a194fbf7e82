"""The TLS settings for worker gRPC: validated at config load (errors name the field), carried
into every worker's spec, refused in a spec when incomplete."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, config_from_dict
from protocol.grpc_auth import GrpcTls
from protocol.worker_spec import WorkerSpec, WorkerSpecError
from splitserve.serve import worker_specs


def _files(tmp_path: Path) -> dict[str, str]:
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("PEM")
    return {"cert_file": str(tmp_path / "c.pem"), "key_file": str(tmp_path / "k.pem"),
            "ca_file": str(tmp_path / "ca.pem")}


def test_tls_config_is_carried_into_every_worker_spec(tmp_path: Path) -> None:
    tls = _files(tmp_path)
    config = config_from_dict({"tls": tls})
    assert config.tls.enabled and not config_from_dict({}).tls.enabled
    for spec in worker_specs(config, "/models/m"):
        assert spec.grpc_tls() == GrpcTls(tls["ca_file"], tls["cert_file"], tls["key_file"])
    assert all(s.grpc_tls() is None for s in worker_specs(config_from_dict({}), "/models/m"))


@pytest.mark.parametrize("missing", ["cert_file", "key_file", "ca_file"])
def test_tls_needs_all_three_files(tmp_path: Path, missing: str) -> None:
    tls = _files(tmp_path)
    with pytest.raises(ConfigError, match=rf"tls\.{missing}: required when TLS is configured"):
        config_from_dict({"tls": {**tls, missing: ""}})
    with pytest.raises(ConfigError, match=rf"tls\.{missing}: no such file"):
        config_from_dict({"tls": {**tls, missing: str(tmp_path / "absent.pem")}})


def test_worker_spec_refuses_partial_tls() -> None:
    with pytest.raises(WorkerSpecError, match="tls_cert_file, tls_key_file, tls_ca_file: give all three"):
        WorkerSpec(role="decode", model="m", tls_cert_file="c.pem", tls_key_file="k.pem")
    with pytest.raises(ValueError, match="give both or neither"):
        GrpcTls("ca.pem", cert_file="c.pem")


def test_relative_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    tls = config_from_dict({"tls": {"cert_file": "c.pem", "key_file": "k.pem", "ca_file": "ca.pem"}}).tls
    assert tls.cert_file == str(tmp_path.resolve() / "c.pem") and Path(tls.ca_file).is_absolute()
