"""The sampling service run on a background thread of this process, on loopback ports the OS picks."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from midx_service.server import SamplerServer
from midx_service.settings import load_settings

_CALL_TIMEOUT_SECONDS = 60.0


class BackgroundServer:
    """A `SamplerServer` (REST and gRPC, state in memory) on its own event loop in a daemon thread.

    Use as a context manager: entering starts it on 127.0.0.1 with free ports, leaving stops it
    gracefully. `settings` override the server's defaults (for example compute_threads).
    """

    def __init__(self, **settings: Any) -> None:
        values: dict[str, Any] = {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "device": "cpu"}
        values.update(settings)
        self.server = SamplerServer(load_settings(**values))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="midx-service", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        try:
            self._call(self.server.start())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._call(self.server.stop())
        finally:
            self._stop_loop()

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def _call(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(_CALL_TIMEOUT_SECONDS)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_CALL_TIMEOUT_SECONDS)
        if not self._thread.is_alive():
            self._loop.close()
