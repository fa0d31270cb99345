"""glibc malloc settings for the server process: reuse freed request buffers instead of unmapping them.

Every sample request allocates and frees blocks of a few hundred kilobytes to a few megabytes: the
request and response messages, their byte copies, the result tensors and the core's temporaries.
By default glibc serves many such blocks with fresh mmap calls and returns freed heap to the kernel,
so the next request pays a page fault for every 4 KiB page it touches. With B = 1024 queries and
M = 100 samples on a 400,000 x 50 table, servers without these thresholds took 8 to 22 ms longer
per gRPC sample call (38 to 51 ms against 25 to 30 ms) on a shared 2-core machine, measured side by
side. Raising the mmap and trim thresholds keeps those blocks in the heap for the next request, so
the resident size stays near its peak instead of shrinking between requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks above this, such as uploaded tables, are still mapped on their own and unmapped when freed.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024

# glibc reads these at start-up. When the operator sets either, the server keeps their values.
ENVIRONMENT_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_buffers(
    mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES, trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES
) -> bool:
    """Set glibc's mmap and trim thresholds for this process; return whether both were applied.

    Returns False, changing nothing, off Linux, without glibc's mallopt (musl, for example), or when
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is set in the environment.
    """
    overridden = [name for name in ENVIRONMENT_VARIABLES if name in os.environ]
    if overridden:
        logger.info("malloc thresholds left as the environment sets them (%s)", ", ".join(overridden))
        return False
    mallopt = _find_mallopt()
    if mallopt is None:
        logger.debug("glibc mallopt is not available; malloc thresholds left at their defaults")
        return False

    applied = mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1
    applied = mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes) == 1 and applied

    if applied:
        logger.debug("malloc thresholds: mmap %d bytes, trim %d bytes", mmap_threshold_bytes, trim_threshold_bytes)
    else:
        logger.warning(
            "glibc rejected the malloc thresholds (mmap %d bytes, trim %d bytes); requests may run slower",
            mmap_threshold_bytes,
            trim_threshold_bytes,
        )
    return applied


def _find_mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    library = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(library).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    function: Callable[[int, int], int] = mallopt
    return function
