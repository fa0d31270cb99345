"""Fixtures shared by the service and client tests: a real server on loopback ports chosen by the OS."""

from __future__ import annotations

import asyncio
import threading
import time
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


class ComputeGate:
    """Occupies one compute thread of a running server until `open()`.

    With compute_threads=1 every index build and sampling call on that server waits behind the gate,
    which lets a test look at the server while work is queued.
    """

    def __init__(self, running: RunningServer) -> None:
        self._open = threading.Event()
        self._entered = threading.Event()
        coroutine = running.server.registry.compute(self._hold)
        self._future = asyncio.run_coroutine_threadsafe(coroutine, running.loop)
        if not self._entered.wait(30):
            pytest.fail("the compute thread did not pick up the gate within 30 s")

    def _hold(self) -> None:
        self._entered.set()
        self._open.wait(120)

    def open(self) -> None:
        self._open.set()
        self._future.result(30)


@pytest.fixture
def hold_compute() -> Iterator[Callable[[RunningServer], ComputeGate]]:
    """Return a function that puts a `ComputeGate` on a server; gates still closed are opened at teardown."""
    gates: list[ComputeGate] = []

    def hold(running: RunningServer) -> ComputeGate:
        gate = ComputeGate(running)
        gates.append(gate)
        return gate

    yield hold
    for gate in gates:
        gate.open()


def wait_until(condition: Callable[[], bool], what: str, timeout_seconds: float = 30.0) -> None:
    """Poll `condition` every 10 ms until it is true; fail the test after `timeout_seconds`."""
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_seconds:g} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def poll() -> Callable[..., None]:
    """Return `wait_until`, for tests that wait on a condition with a deadline."""
    return wait_until


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
