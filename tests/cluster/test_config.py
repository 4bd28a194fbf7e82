"""ClusterConfig: defaults, YAML round trips, and errors that name the offending field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ClusterConfig, ConfigError, config_from_dict, dump_config, load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_embedded_default() -> None:
    c = load_config(None)
    assert c.model == "smollm2" and c.is_embedded_model and c.model_name == "smollm2"
    assert (c.dtype, c.device, c.block_size) == ("float32", "cpu", 16)
    assert (c.prefill.replicas, c.decode.replicas) == (1, 1)
    assert c.kvtransfer.backend == "nixl"
    assert c.router.port == 8000 and c.router.policy == "kv_aware"
    assert c.redis.embedded


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_deploy_examples_round_trip(name: str, tmp_path: Path) -> None:
    c = load_config(DEPLOY / name)
    out = tmp_path / name
    dump_config(c, out)
    assert load_config(out) == c


def test_examples_mean_what_they_say() -> None:
    big = load_config(DEPLOY / "llama3-8b-h100.yaml")
    assert big.model_name == "llama-3.1-8b-instruct"
    assert big.kv_cache_memory == 40 * 2**30
    assert big.prefill.world_size == 2 and big.decode.replicas == 2
    assert not big.redis.embedded and big.router.api_keys == ("change-me",)
    assert load_config(DEPLOY / "two-prefill.yaml").prefill.replicas == 2
    h200 = load_config(DEPLOY / "h200-random-llama8b.yaml")
    assert h200.random_weights and h200.device == "cuda" and h200.kvtransfer.backend == "nixl"


def test_model_name_from_path() -> None:
    assert config_from_dict({"model": "/models/Qwen3-0.6B/"}).model_name == "Qwen3-0.6B"


def test_redis_shorthand_and_sizes() -> None:
    c = config_from_dict({"redis": "redis://h:6379/1", "kv_cache_memory": "1.5GiB"})
    assert c.redis.url == "redis://h:6379/1" and not c.redis.embedded
    assert c.kv_cache_memory == int(1.5 * 2**30)


def test_empty_file_is_default(tmp_path: Path) -> None:
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == ClusterConfig()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"decode": {"max_num_seqs": 0}}, "decode.max_num_seqs"),
        ({"decode": {"max_num_seq": 8}}, "decode.max_num_seq"),  # typo: unknown field
        ({"decode": {"replicas": 0}}, "decode.replicas"),
        ({"decode": {"tp": 2, "ep": 4}}, "decode.ep"),
        ({"decode": {"tp": "two"}}, "decode.tp"),
        ({"prefill": {"replicas": -1}}, "prefill.replicas"),
        ({"prefill": {"chunk_size": 4096}}, "prefill.chunk_size"),
        ({"prefill": {"chunk_size": 100}}, "prefill.chunk_size"),
        ({"prefill": {"max_batched_tokens": 0}}, "prefill.max_batched_tokens"),
        ({"block_size": 24}, "block_size"),
        ({"max_model_len": 8}, "max_model_len"),
        ({"dtype": "float8"}, "dtype"),
        ({"dtype": "float16"}, "dtype"),  # float16 on the default cpu device
        ({"device": "tpu"}, "device"),
        ({"model": ""}, "model"),
        ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
        ({"kv_cache_memory": 0}, "kv_cache_memory"),
        ({"kvtransfer": {"backend": "carrier-pigeon"}}, "kvtransfer.backend"),
        ({"kvtransfer": {"transfer_timeout_s": 0}}, "kvtransfer.transfer_timeout_s"),
        ({"router": {"port": 70000}}, "router.port"),
        ({"router": {"policy": ""}}, "router.policy"),  # a known name is checked by router_settings
        ({"router": {"disagg_threshold": -1}}, "router.disagg_threshold"),
        ({"router": {"api_keys": [""]}}, "router.api_keys"),
        ({"router": {"request_timeout_s": 0}}, "router.request_timeout_s"),
        ({"router": {"max_body_bytes": 10}}, "router.max_body_bytes"),
        ({"router": {"max_choices_per_request": 0}}, "router.max_choices_per_request"),
        ({"redis": {"url": "http://x"}}, "redis.url"),
        ({"redis": 5}, "redis"),
        ({"prefil": {}}, "prefil"),
    ],
)
def test_error_names_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert f"{field}:" in str(e.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("decode:\n  max_num_seqs: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: decode\.max_num_seqs"):
        load_config(p)
    p.write_text("decode: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen() -> None:
    c = load_config(None)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type is an implementation detail
        c.decode.max_num_seqs = 3  # type: ignore[misc]


@pytest.mark.parametrize("backend", ["ucx", "carrier-pigeon"])
def test_unavailable_backend_is_refused_at_load(backend: str, tmp_path: Path) -> None:
    """Backends that are not registered fail here, naming the field and what exists, instead
    of at worker start after every model load."""
    p = tmp_path / "cluster.yaml"
    p.write_text(f"kvtransfer:\n  backend: {backend}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (
        f"{p}: kvtransfer.backend: {backend!r} is not an available transport; available: mpi, nccl, nixl, tcp, ucxx"
    )


def test_backend_choices_follow_the_transport_registry() -> None:
    """A backend registered by a plugin is accepted; unregistered, it is refused again."""
    from kvtransfer.registry import TransportSpec, register_transport, unregister_transport

    register_transport(TransportSpec("carrier-pigeon", "kvtransfer.tcp_backend", "TcpTransport"))
    try:
        assert config_from_dict({"kvtransfer": {"backend": "carrier-pigeon"}}).kvtransfer.backend == "carrier-pigeon"
    finally:
        unregister_transport("carrier-pigeon")
    with pytest.raises(ConfigError, match="available: mpi, nccl, nixl, tcp, ucxx"):
        config_from_dict({"kvtransfer": {"backend": "carrier-pigeon"}})
    for name in ("nixl", "tcp", "ucxx", "mpi"):
        assert config_from_dict({"kvtransfer": {"backend": name}}).kvtransfer.backend == name
