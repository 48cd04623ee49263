"""Fixtures of every test: a real redis-server owned by the test session, a clean client, a key prefix, ports.

Helpers live in ``tests/support``; this file holds fixtures only, so no test imports from a conftest.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

# Before the imports below: asserts in tests/support report their values as a test's own do.
pytest.register_assert_rewrite("tests.support")

from tests.support.paths import SHARED_DATA  # noqa: E402
from tests.support.ports import ports  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def r(redis_server):
    client = redis_server.client()
    client.flushall()
    return client


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real media folder {SHARED_DATA} is not beside the repository")
    return SHARED_DATA


@pytest.fixture
def service_ports():
    p = ports(5)
    return {name: {"port": port} for name, port in zip(("ingest", "preprocess", "infer", "alert", "viewer"), p)}
