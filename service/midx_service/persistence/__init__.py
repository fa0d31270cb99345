"""Durable stores for the index registry: Redis (logs, snapshots, replicas) or a local directory."""

from __future__ import annotations

from midx_service.registry import MutationStore
from midx_service.settings import Settings


def create_store(settings: Settings) -> MutationStore | None:
    """Return the store the settings ask for: Redis, a local directory, or None (state in memory only)."""
    if settings.redis_url is not None:
        from midx_service.persistence.redis_store import RedisStore

        return RedisStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            chunk_bytes=settings.snapshot_chunk_bytes,
            snapshot_interval_seconds=settings.snapshot_interval_seconds,
        )
    if settings.data_dir is not None:
        from midx_service.persistence.local_store import LocalStore

        return LocalStore(
            settings.data_dir,
            chunk_bytes=settings.snapshot_chunk_bytes,
            snapshot_interval_seconds=settings.snapshot_interval_seconds,
        )
    return None
