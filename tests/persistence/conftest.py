"""Fixtures for the persistence tests: the shared Redis with a key prefix per test, and private Redis servers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


def wait_until(condition: Callable[[], object], timeout: float, description: str) -> None:
    """Poll `condition` every 20 ms until it is true; fail with `description` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {description}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis on 127.0.0.1:6379; the test is skipped when none responds there."""
    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_connect_timeout=1.0)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.skip(f"no Redis answers at {SHARED_REDIS_URL} ({error}); .ci/run starts one")
    finally:
        client.close()
    return SHARED_REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    prefix = f"midx-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.unlink(*keys)
    finally:
        client.close()


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port, which the test may stop and restart."""

    def __init__(self, directory: Path, *, append_only: bool) -> None:
        self.directory = directory
        self.append_only = append_only
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1.0)

    def start(self) -> None:
        arguments = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory)]
        if self.append_only:
            arguments += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            arguments += ["--appendonly", "no"]
        self.process = subprocess.Popen(
            ["redis-server", *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self._answers, 10.0, f"redis-server on port {self.port} to answer")

    def stop(self) -> None:
        """Stop the server as an operator would (SIGTERM: it finishes its append-only file first)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def _answers(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    """Return a function that starts a private redis-server; every one is stopped at teardown."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed, so a private Redis cannot be started and stopped")
    servers: list[PrivateRedis] = []

    def start(*, append_only: bool = True) -> PrivateRedis:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = PrivateRedis(directory, append_only=append_only)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
