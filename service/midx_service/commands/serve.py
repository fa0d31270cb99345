"""Start the sampling service: the REST and gRPC front ends in one process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from midx_service.allocator import keep_freed_buffers
from midx_service.errors import MidxError
from midx_service.persistence import create_store
from midx_service.persistence.codec import CorruptDataError
from midx_service.registry import MutationStore
from midx_service.server import SamplerServer
from midx_service.settings import InvalidSettingsError, Settings, load_settings

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; a flag overrides its MIDX_* variable, which overrides the default."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (env MIDX_{name.upper()}, default {field.default!r})"
        kind: Any = field.annotation
        argument_type: Any = str
        if kind is int or kind is float:
            argument_type = kind
        parser.add_argument(flag, dest=name, type=argument_type, default=None, help=help_text)


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    try:
        settings = load_settings(**overrides)
        store = create_store(settings)
    except InvalidSettingsError as error:
        print(f"midx-sampler serve: {error}", file=sys.stderr)
        return 2
    keep_freed_buffers()
    try:
        asyncio.run(_serve(settings, store))
    except OSError as error:  # a port in use, a certificate that cannot be read
        print(f"midx-sampler serve: could not start: {error}", file=sys.stderr)
        return 1
    except (MidxError, CorruptDataError) as error:  # persistence unreachable or its data damaged
        print(f"midx-sampler serve: could not restore the indexes: {error}", file=sys.stderr)
        return 1
    return 0


async def _serve(settings: Settings, store: MutationStore | None) -> None:
    server = SamplerServer(settings, store=store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    try:
        await server.start()
        await stop.wait()
        logger.info("stop signal received")
    finally:
        await server.stop()
