"""`RouterSettings`: everything the router needs from a deployment, in the router's own terms.

The router does not read the cluster's YAML config (`cluster.config`): the composition layer
(`splitserve.router_settings`) builds these settings from it, and tests or an embedding program
build them directly. That keeps the router importable and testable without the launcher, and
the config free of any router import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.admission import AdmissionLimits
from router.policy import POLICIES, PolicySettings


class RouterSettingsError(ValueError):
    """A router setting is invalid; the message starts with the field's name."""


@dataclass(frozen=True)
class RouterSettings:
    model_name: str = "smollm2"  # the id clients pass as `model` and /v1/models lists
    model_aliases: tuple[str, ...] = ()  # other names accepted as `model` (e.g. the model folder)
    max_model_len: int = 2048  # prompt + generated tokens per sequence
    policy: str = "kv_aware"  # a name in `router.policy.POLICIES`
    routing: PolicySettings = field(default_factory=PolicySettings)
    max_retries: int = 2  # re-routes after a worker fails before the first token
    max_migrations: int = 3  # moves of a sequence whose decode worker was lost mid-stream (router.migration)
    migration_wait_s: float = 120.0  # how long such a sequence waits for a decode worker (a restart)
    request_timeout_s: float | None = 600.0  # end-to-end limit for one request; None: none
    api_keys: tuple[str, ...] = ()  # accepted bearer tokens; empty disables auth
    log_requests: bool = True  # one console line per finished request (`splitserve serve --quiet`: off)
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413 before they are parsed
    max_choices_per_request: int = 256  # prompts x n of one request (each is a backend stream)
    # the router's own count of admitted work (router.admission); beyond it: 429 at once
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)

    def __post_init__(self) -> None:
        # lists from a caller are stored as tuples, so the settings stay hashable and frozen
        object.__setattr__(self, "model_aliases", tuple(self.model_aliases))
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if self.policy not in POLICIES:
            raise RouterSettingsError(f"policy: unknown routing policy {self.policy!r}; known: {sorted(POLICIES)}")
        if not self.model_name:
            raise RouterSettingsError("model_name: must not be empty")
        if self.max_model_len < 1:
            raise RouterSettingsError(f"max_model_len: must be >= 1, got {self.max_model_len}")
        if self.max_retries < 0:
            raise RouterSettingsError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.max_migrations < 0:
            raise RouterSettingsError(f"max_migrations: must be >= 0, got {self.max_migrations}")
        if not self.migration_wait_s >= 0:
            raise RouterSettingsError(f"migration_wait_s: must be >= 0, got {self.migration_wait_s}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise RouterSettingsError(f"request_timeout_s: must be > 0, got {self.request_timeout_s}")
        if self.max_body_bytes < 1024:
            raise RouterSettingsError(f"max_body_bytes: must be >= 1024, got {self.max_body_bytes}")
        if self.max_choices_per_request < 1:
            raise RouterSettingsError(f"max_choices_per_request: must be >= 1, got {self.max_choices_per_request}")
        if any(not k.strip() for k in self.api_keys):
            raise RouterSettingsError("api_keys: API keys must be non-empty strings")

    def serves(self, model: str) -> bool:
        """Whether a request's ``model`` names the served model."""
        return model == self.model_name or model in self.model_aliases
