"""Control-plane trust against a real redis-server: the embedded server's generated password (kept
off the command line), passwords for an external server, and registry records sealed with the
cluster token (a record without a valid MAC is ignored and logged once)."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cluster.config import ConfigError, RedisConfig, config_from_dict
from cluster.redis_server import EmbeddedRedis, redact_url, with_password
from protocol.control_plane import ControlPlane
from protocol.registry import KVEvent, LoadSnapshot, WorkerInfo, pack, seal, unseal
from splitserve.errors import ClusterStartError
from splitserve.redis_service import RedisService

TOKEN = "cluster-token"


def _info(wid: str = "d0", address: str = "127.0.0.1:5000") -> WorkerInfo:
    return WorkerInfo(wid, "decode", address, num_blocks=10, block_size=16)


@pytest.fixture
def planes(server: EmbeddedRedis, request: pytest.FixtureRequest) -> Iterator[tuple[ControlPlane, ControlPlane]]:
    """(a member of the cluster, something that can write to Redis but has no token)."""
    ns = f"t-{request.node.name}"
    member = ControlPlane.from_url(server.url, namespace=ns, token=TOKEN)
    outsider = ControlPlane.from_url(server.url, namespace=ns)
    yield member, outsider
    member.close()
    outsider.close()


# ------------------------------------------------------------------------------- the embedded server
def test_embedded_server_needs_its_generated_password(server: EmbeddedRedis) -> None:
    assert server.password and len(server.password) >= 32
    assert redis.Redis.from_url(server.url).ping()
    bare = f"redis://{server.host}:{server.port}/0"
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(bare).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(with_password(bare, "guess")).ping()
    assert EmbeddedRedis().password != server.password  # a fresh one per server


def test_password_is_not_on_the_command_line_nor_left_on_disk(
    server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server._proc is not None and server._dir is not None
    cmdline = Path(f"/proc/{server._proc.pid}/cmdline").read_bytes()
    assert server.password.encode() not in cmdline
    assert not (Path(server._dir.name) / "redis.conf").exists()  # removed once the server read it
    modes: list[int] = []
    real_unlink = Path.unlink

    def spy(path: Path, *a: object, **kw: object) -> None:
        if path.name == "redis.conf":
            modes.append(stat.S_IMODE(path.stat().st_mode))
        real_unlink(path, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "unlink", spy)
    with EmbeddedRedis():
        pass
    assert modes == [0o600]  # while it existed, only its owner could read it


def test_urls_never_print_the_password() -> None:
    url = with_password("rediss://redis.example:6380/2", "p@ss/w:rd")
    assert url.startswith("rediss://:p%40ss%2Fw%3Ard@redis.example:6380/2")
    assert redact_url(url) == "rediss://:***@redis.example:6380/2"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


# ------------------------------------------------------------------------------- an external server
def test_external_server_password_from_the_environment(
    server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = f"redis://{server.host}:{server.port}/0"
    config = RedisConfig(url=bare, password_env="TEST_REDIS_PASSWORD")
    with pytest.raises(ConfigError, match=r"redis\.password_env: environment variable TEST_REDIS_PASSWORD"):
        config.connect_url()
    monkeypatch.setenv("TEST_REDIS_PASSWORD", server.password)
    service = RedisService.start(config, ttl_s=5.0, token=TOKEN)
    try:
        assert service.control_plane.client.ping()
        assert service.url == with_password(bare, server.password)
    finally:
        service.stop()
    monkeypatch.setenv("TEST_REDIS_PASSWORD", "wrong")
    with pytest.raises(ClusterStartError, match=r"redis at redis://:\*\*\*@") as e:  # refused, and redacted
        RedisService.start(config, ttl_s=5.0)
    assert "wrong" not in str(e.value)


def test_password_env_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"redis\.password_env: only for an external server"):
        config_from_dict({"redis": {"password_env": "X"}})
    cfg = config_from_dict({"redis": {"url": "rediss://h:6380/0", "password_env": "X"}})
    assert cfg.redis.password_env == "X" and "X" not in os.environ


# ------------------------------------------------------------------------------- sealed records
def test_seal_binds_token_key_and_bytes() -> None:
    sealed = seal(TOKEN, "k", b"payload")
    assert unseal(TOKEN, "k", sealed) == b"payload"
    assert unseal("other", "k", sealed) is None
    assert unseal(TOKEN, "k2", sealed) is None
    assert unseal(TOKEN, "k", sealed[:-1] + b"X") is None
    assert unseal(TOKEN, "k", b"payload") is None  # bare
    assert unseal("", "k", sealed) == b"payload" and seal("", "k", b"p") == b"p"


def test_records_written_without_the_token_are_ignored(
    planes: tuple[ControlPlane, ControlPlane], caplog: pytest.LogCaptureFixture
) -> None:
    member, outsider = planes
    member.register_worker(_info("d0"))
    outsider.register_worker(_info("evil", "10.6.6.6:1"))
    with caplog.at_level(logging.WARNING, logger="protocol.control_plane"):
        for _ in range(3):
            assert [w.worker_id for w in member.list_workers()] == ["d0"]
    assert sum("evil" in r.getMessage() for r in caplog.records) == 1  # logged once, not per poll
    assert member.get_load("evil") is None
    # a member heartbeat cannot be faked either
    outsider.heartbeat("d0", LoadSnapshot(queued_requests=0, free_blocks=10, total_blocks=10))
    assert member.get_load("d0") is None and [w for w, _ in member.live_workers() if w.worker_id == "d0"]


def test_tampered_or_moved_records_are_ignored(planes: tuple[ControlPlane, ControlPlane]) -> None:
    member, _ = planes
    member.register_worker(_info("d0"))
    key, raw = member._worker_key("d0"), member.client.get(member._worker_key("d0"))
    member.client.set(key, raw.replace(b"127.0.0.1:5000", b"127.0.0.1:6666"))  # same length, MAC kept
    assert member.list_workers() == []
    member.register_worker(_info("d0"))
    member.client.sadd(member._pool_key("decode"), "d1")  # d0's genuine record copied to d1's key
    member.client.set(member._worker_key("d1"), member.client.get(key))
    assert [w.worker_id for w in member.list_workers()] == ["d0"]


def test_kv_events_without_the_token_are_ignored(planes: tuple[ControlPlane, ControlPlane]) -> None:
    member, outsider = planes
    member.publish_kv_events("d0", [KVEvent("stored", (1, 2))])
    outsider.publish_kv_events("d0", [KVEvent("cleared")])  # would wipe d0's prefix-index entries
    _, batches = member.read_kv_events("0-0")
    assert [(b.worker_id, b.events) for b in batches] == [("d0", (KVEvent("stored", (1, 2)),))]
    _, seen = outsider.read_kv_events("0-0")  # a reader without the token checks nothing
    assert len(seen) == 2


def test_pool_target_is_sealed(planes: tuple[ControlPlane, ControlPlane]) -> None:
    member, outsider = planes
    member.set_pool_target("decode", 3)
    assert member.get_pool_target("decode") == 3
    outsider.client.set(outsider._target_key("decode"), pack(99))
    assert member.get_pool_target("decode") is None
