"""A real redis-server per test module of the control-plane tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster.redis_server import EmbeddedRedis


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as r:
        yield r
