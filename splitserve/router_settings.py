"""The router's settings, from the cluster config: the one place that knows both.

`cluster.config` must not import the router (the workers load it too) and the router must not
import `cluster` (it is deployable and testable without the launcher), so the composition
layer maps one onto the other. It also checks what only the router can judge, the policy
name against the router's registry, so a bad ``router.policy`` is refused at config load time,
before anything starts, with the same field-naming `ConfigError` as every other bad field.
"""

from __future__ import annotations

from cluster.config import ClusterConfig, ConfigError
from router.admission import AdmissionLimits
from router.policy import PolicySettings
from router.settings import RouterSettings, RouterSettingsError


def router_settings(config: ClusterConfig) -> RouterSettings:
    """Raises `ConfigError` naming the ``router.`` field the router refused."""
    r = config.router
    routing = PolicySettings(
        block_size=config.block_size,
        disagg_threshold=r.disagg_threshold,
        prefill_queue_limit=r.prefill_queue_limit,
        max_queued_requests=r.max_queued_requests,
    )
    aliases = (config.model,) if config.model != config.model_name else ()
    try:
        return RouterSettings(
            model_name=config.model_name,
            model_aliases=aliases,
            max_model_len=config.max_model_len,
            policy=r.policy,
            routing=routing,
            max_retries=r.max_retries,
            max_migrations=r.max_migrations,
            migration_wait_s=r.migration_wait_s,
            request_timeout_s=r.request_timeout_s,
            api_keys=r.api_keys,
            log_requests=r.log_requests,
            max_body_bytes=r.max_body_bytes,
            max_choices_per_request=r.max_choices_per_request,
            admission=AdmissionLimits(
                max_in_flight_requests=r.max_in_flight_requests, max_queued_prompt_tokens=r.max_queued_prompt_tokens
            ),
        )
    except RouterSettingsError as e:
        raise ConfigError(f"router.{e}") from None
