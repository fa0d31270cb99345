"""Fixtures shared by the service and client tests: a real server on loopback ports chosen by the OS."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
import torch

from midx_service.persistence import create_store
from midx_service.server import SamplerServer
from midx_service.settings import Settings, load_settings


class RunningServer:
    """A `SamplerServer` running on its own event loop in a background thread.

    Its store is the one the settings ask for (Redis, a data directory, or none).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server = SamplerServer(settings, store=create_store(settings))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)

    def start(self) -> RunningServer:
        self._thread.start()
        self.call(self.server.start())
        return self

    def call(self, coroutine: Any, timeout: float = 60.0) -> Any:
        """Run `coroutine` on the server's loop and return its result."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"


def test_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "http_port": 0,
        "grpc_port": 0,
        "device": "cpu",
        "compute_threads": 2,
        "shutdown_grace_seconds": 1.0,
        "min_version_timeout_seconds": 2.0,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """Return a function that starts a server with the given setting overrides; all stop at teardown."""
    servers: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        running = RunningServer(test_settings(**overrides)).start()
        servers.append(running)
        return running

    yield start
    for running in servers:
        running.stop()


@pytest.fixture
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server()


# An index config, table and queries on which codebooks learned to lower KL(P || Q) beat the k-means
# ones (checked with the registry's seed 0): six clusters are more than K = 3 codewords can cover.
LEARNABLE_DIM = 6
LEARNABLE_CODEWORDS = 3


def learnable_table() -> np.ndarray:
    """(240, 6) float32 table: six clusters of 40 rows."""
    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(6, LEARNABLE_DIM, generator=generator) * 2
    table = centres.repeat_interleave(40, dim=0) + torch.randn(240, LEARNABLE_DIM, generator=generator)
    return table.numpy()


def learnable_queries() -> np.ndarray:
    """(200, 6) float32 standard normal queries."""
    return torch.randn(200, LEARNABLE_DIM, generator=torch.Generator().manual_seed(6)).numpy()
