"""`RouterSettings`: the router's own settings type refuses bad values with the field's name."""

from __future__ import annotations

import pytest

from router.policy import POLICIES, PolicySettings
from router.settings import RouterSettings, RouterSettingsError


def test_defaults_route_with_a_registered_policy() -> None:
    s = RouterSettings()
    assert s.policy in POLICIES and s.routing == PolicySettings()
    assert s.serves("smollm2") and not s.serves("gpt-4")


def test_aliases_and_keys_are_stored_as_tuples() -> None:
    s = RouterSettings(model_name="m", model_aliases=["/models/m"], api_keys=["k"])  # type: ignore[arg-type]
    assert s.model_aliases == ("/models/m",) and s.api_keys == ("k",)
    assert s.serves("/models/m") and hash(s)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"policy": "random"}, "policy"),
        ({"model_name": ""}, "model_name"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_retries": -1}, "max_retries"),
        ({"request_timeout_s": 0.0}, "request_timeout_s"),
        ({"api_keys": (" ",)}, "api_keys"),
        ({"max_body_bytes": 100}, "max_body_bytes"),
        ({"max_choices_per_request": 0}, "max_choices_per_request"),
    ],
)
def test_bad_values_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(RouterSettingsError, match=rf"^{field}: "):
        RouterSettings(**changes)
