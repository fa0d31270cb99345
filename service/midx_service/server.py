"""One server process: the registry, the REST and gRPC front ends, health, and a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator

import grpc
import grpc.aio
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from midx_client._proto import sampler_pb2_grpc as _pb_grpc
from midx_service.grpc_server import SamplerServicer, TokenInterceptor
from midx_service.metrics import Metrics
from midx_service.registry import IndexRegistry, MutationStore
from midx_service.rest import create_app
from midx_service.service import SamplerService
from midx_service.settings import Settings
from midx_service.telemetry_monitor import TelemetryMonitor

logger = logging.getLogger(__name__)

SERVICE_NAME = "midx.v1.Sampler"
_STARTUP_TIMEOUT_SECONDS = 30.0


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the process entry point owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class SamplerServer:
    """Both front ends over one registry, in the running event loop.

    `start()` binds the ports, where 0 picks a free one, and `http_port` / `grpc_port` report them
    afterwards. `stop()` turns the gRPC health status to NOT_SERVING and /readyz to 503 first, then
    lets running requests finish for up to shutdown_grace_seconds.
    """

    def __init__(self, settings: Settings, *, store: MutationStore | None = None) -> None:
        self.settings = settings
        self.registry = IndexRegistry(
            device=settings.device,
            store=store,
            compute_threads=settings.compute_threads,
            min_version_timeout_seconds=settings.min_version_timeout_seconds,
            refit_error_ratio=settings.refit_error_ratio,
            reservoir_size=settings.telemetry_reservoir_size,
            auto_refit_mode=settings.auto_refit_mode,
            kl_refit_time_budget_seconds=settings.kl_refit_time_budget_seconds,
            kl_refit_max_queries=settings.kl_refit_max_queries,
        )
        self.monitor = TelemetryMonitor(
            self.registry,
            interval_seconds=settings.telemetry_interval_seconds,
            sample_size=settings.telemetry_sample_size,
            refit_kl_ratio=settings.refit_kl_ratio,
        )
        self.metrics = Metrics(self.registry)
        self.service = SamplerService(settings, self.registry, self.metrics)
        self.health = health.aio.HealthServicer()
        self.stopping = False
        self.http_port = 0
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._uvicorn: _EmbeddedUvicorn | None = None
        self._uvicorn_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        started = time.perf_counter()
        if self.settings.token is None:
            logger.warning("MIDX_API_TOKEN is not set: every route, mutations included, is open to any caller")
        await self.registry.restore()
        self.monitor.start()
        await self._start_grpc()
        await self._start_rest()
        logger.info(
            "serving on %s: REST port %d, gRPC port %d%s, device %s (started in %.2f s)",
            self.settings.host,
            self.http_port,
            self.grpc_port,
            " (TLS)" if self.settings.tls_cert_file else "",
            self.registry.device,
            time.perf_counter() - started,
        )

    async def _start_grpc(self) -> None:
        settings = self.settings
        interceptors = [TokenInterceptor(settings.token)] if settings.token else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # gRPC sets SO_REUSEPORT by default, which lets a second server bind the same port and
                # silently take half the connections; a busy port must fail instead.
                ("grpc.so_reuseport", 0),
            ],
        )
        _pb_grpc.add_SamplerServicer_to_server(SamplerServicer(self.service), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{_bracket(settings.host)}:{settings.grpc_port}"
        credentials = None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())]
            )
        try:
            if credentials is not None:
                self.grpc_port = server.add_secure_port(address, credentials)
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(
                f"cannot listen for gRPC on {address}: {error}; the port is probably in use, pick another "
                "with --grpc-port (MIDX_GRPC_PORT)"
            ) from None
        await server.start()
        self._grpc = server
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def _start_rest(self) -> None:
        settings = self.settings
        app = create_app(self.service, is_stopping=lambda: self.stopping)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_seconds)),
        )
        listener = _bind_listener(settings.host, settings.http_port)
        server = _EmbeddedUvicorn(config)
        self._uvicorn = server
        self._uvicorn_task = asyncio.create_task(server.serve(sockets=[listener]), name="uvicorn")
        deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
        while not server.started:
            if self._uvicorn_task.done():
                self._uvicorn_task.result()
                raise RuntimeError(f"the REST server stopped during start-up on port {settings.http_port}")
            if time.monotonic() > deadline:
                raise RuntimeError("the REST server did not start within 30 s")
            await asyncio.sleep(0.01)
        self.http_port = server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop gracefully: report NOT_SERVING, stop accepting, let running requests finish."""
        if self.stopping:
            return
        self.stopping = True
        started = time.perf_counter()
        logger.info("stopping: health NOT_SERVING, finishing running requests")
        await self.health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace_seconds
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._uvicorn_task is not None:
            await self._uvicorn_task
        await self.monitor.close()
        await self.registry.close()
        logger.info("stopped in %.2f s", time.perf_counter() - started)


def _bind_listener(host: str, port: int) -> socket.socket:
    """Bind the REST socket here, so a busy port raises a clear OSError before anything starts.

    uvicorn, left to bind it, exits the whole process from inside its task instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise OSError(
            f"cannot listen for REST on {host}:{port}: {error.strerror}; pick another port with --http-port "
            "(MIDX_HTTP_PORT)"
        ) from None
    listener.listen(2048)
    listener.setblocking(False)
    return listener


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
