"""Errors of the local-cluster composition, shared by its pieces (Redis, launcher, router)."""

from __future__ import annotations

from engine.errors import SplitserveError


class ClusterStartError(SplitserveError):
    """The local cluster could not be started; everything it had started is stopped again."""


class StartupInterrupted(ClusterStartError):
    """A signal (Ctrl-C, SIGTERM) arrived while the cluster was starting."""
