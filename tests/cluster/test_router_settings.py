"""`splitserve.router_settings`: the cluster config mapped onto the router's settings, and the
router's checks applied when the config is loaded (before anything starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, config_from_dict, load_config
from router.admission import AdmissionLimits
from router.policy import PolicySettings
from router.settings import RouterSettings
from splitserve.router_settings import router_settings
from splitserve.serve import LocalCluster, serve


def test_defaults_map_onto_router_defaults() -> None:
    assert router_settings(load_config(None)) == RouterSettings()


def test_every_router_field_is_carried() -> None:
    config = config_from_dict({
        "model": "/models/Llama-3", "served_model_name": "llama", "max_model_len": 4096, "block_size": 32,
        "prefill": {"chunk_size": 512},
        "router": {
            "policy": "round_robin", "disagg_threshold": 100, "prefill_queue_limit": 5000,
            "max_queued_requests": 9, "max_retries": 4, "request_timeout_s": 12.5, "api_keys": ["a", "b"],
            "max_body_bytes": 65536, "max_choices_per_request": 32, "max_in_flight_requests": 40,
            "max_queued_prompt_tokens": 7000,
        },
    })
    assert router_settings(config) == RouterSettings(
        model_name="llama", model_aliases=("/models/Llama-3",), max_model_len=4096, policy="round_robin",
        routing=PolicySettings(block_size=32, disagg_threshold=100, prefill_queue_limit=5000, max_queued_requests=9),
        max_retries=4, request_timeout_s=12.5, api_keys=("a", "b"), max_body_bytes=65536, max_choices_per_request=32,
        admission=AdmissionLimits(max_in_flight_requests=40, max_queued_prompt_tokens=7000),
    )


def test_unknown_policy_is_a_config_error_naming_the_field() -> None:
    config = config_from_dict({"router": {"policy": "random"}})
    with pytest.raises(ConfigError, match=r"^router\.policy: unknown routing policy 'random'"):
        router_settings(config)
    with pytest.raises(ConfigError, match=r"router\.policy"):
        LocalCluster(config)  # refused on construction: nothing was started


def test_serve_refuses_an_unknown_policy_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("router:\n  policy: random\n")
    assert serve(path) == 2
    err = capsys.readouterr().err
    assert "router.policy: unknown routing policy 'random'" in err and "starting" not in err
