"""The Redis store: a mutation log per index (a stream), chunked snapshots, and replicas that follow them.

Layout under the key prefix P (MIDX_REDIS_PREFIX):

- `P:indexes` (hash) maps each index name to its incarnation (a random id given at creation, so a
  deleted and re-created index never reads the old one's keys) and its config.
- `P:catalog` (stream) announces creates and deletes to the replicas.
- `P:index:<name>:<incarnation>:head` (hash) contains the newest version and the current snapshot.
  `...:log` (stream) contains one entry per mutation, with stream id `<version>-1`. `...:snapshot:<id>`
  and `...:snapshot:<id>:<n>` contain a snapshot's manifest and chunks.
- `P:epoch` identifies the data set, so a server notices when Redis came back empty.

Writes: a row update, refit or upload is appended by a Lua script that first checks that the
writer's base version is still the newest one. When another replica got there first, the script
changes nothing and the registry rebuilds the mutation on top of that replica's write, so all
replicas apply one order: the log's. An upload writes its snapshot first (chunks that expire unless
adopted) and its entry names the snapshot; the same script adopts it. The registry acknowledges a
mutation only after the script returned, so an acknowledged write is in Redis (how durable Redis
itself is depends on its append-only file settings; see docs/persistence.md).

Reads: each server runs one background reader that blocks on XREAD over the catalog and every
index's log, and hands entries to a per-index task that applies them in version order. When it
finds a gap (entries trimmed behind a newer snapshot), it reloads the newest snapshot and replays
the entries after it. While Redis is unreachable, mutations fail with UnavailableError and sampling
goes on from memory; the reader reconnects with backoff and catches up before writes resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import torch
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from midx_service.core import IndexConfig, MidxIndex
from midx_service.errors import AlreadyExistsError, NotFoundError, UnavailableError
from midx_service.persistence import redis_scripts
from midx_service.persistence.checkpoints import CheckpointScheduler, wait_for_event
from midx_service.persistence.codec import (
    DEFAULT_CHUNK_BYTES,
    CorruptDataError,
    Entry,
    SnapshotReader,
    decode_entry,
    decode_manifest,
    encode_entry,
    encode_manifest,
    plan_snapshot,
)
from midx_service.persistence.replay import ReplayGapError, replay
from midx_service.registry import IndexRegistry, Mutation, RestoredIndex, StaleVersionError

logger = logging.getLogger(__name__)

# How long the reader blocks in one XREAD; it bounds how late the reader notices new indexes.
_BLOCK_MILLISECONDS = 1000
# Entries read per stream and per XREAD or XRANGE call.
_READ_COUNT = 500
# Uncommitted snapshot chunks expire after this, so a writer that died half-way leaves nothing behind.
_UNCOMMITTED_TTL_MILLISECONDS = 3_600_000
# A refit or snapshot lock expires after this unless its holder renews it (every third of it).
_LOCK_MILLISECONDS = 60_000
# The catalog stream keeps about this many create and delete events.
_CATALOG_LENGTH = 10_000
_RECONNECT_MIN_SECONDS = 0.05
_RECONNECT_MAX_SECONDS = 2.0
# How often a store whose writes were rejected tries a small write to see whether Redis accepts them again.
_WRITE_PROBE_SECONDS = 1.0
_CATCH_UP_TIMEOUT_SECONDS = 30.0
_CONSISTENT_READ_ATTEMPTS = 8

_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class _SnapshotChangedError(RuntimeError):
    """The snapshot being read was replaced (and dropped) by a newer one while it was read."""


@dataclass
class _Follower:
    """The per-index task that applies log entries in order, and how far the reader has read."""

    name: str
    incarnation: str
    read_version: int
    queue: asyncio.Queue[list[tuple[bytes, dict[bytes, bytes]]]] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.epoch = f"{prefix}:epoch"
        self.indexes = f"{prefix}:indexes"
        self.catalog = f"{prefix}:catalog"
        self.reseed_lock = f"{prefix}:reseed-lock"
        self.probe = f"{prefix}:write-probe"

    def base(self, name: str, incarnation: str) -> str:
        return f"{self.prefix}:index:{name}:{incarnation}:"

    def head(self, name: str, incarnation: str) -> str:
        return self.base(name, incarnation) + "head"

    def log(self, name: str, incarnation: str) -> str:
        return self.base(name, incarnation) + "log"

    def refit_lock(self, name: str, incarnation: str) -> str:
        return self.base(name, incarnation) + "refit-lock"

    def snapshot_lock(self, name: str, incarnation: str) -> str:
        return self.base(name, incarnation) + "snapshot-lock"

    def snapshot(self, name: str, incarnation: str, snapshot_id: str) -> str:
        return self.base(name, incarnation) + "snapshot:" + snapshot_id


class RedisStore:
    """Mutation log, snapshots and replica following on one Redis server; see the module docstring.

    url: a redis:// URL. prefix: the first part of every key; servers with the same URL and prefix
    are replicas of each other. chunk_bytes: largest chunk of a snapshot or entry field.
    snapshot_interval_seconds: how often changed indexes are snapshotted (0: only after a refit and
    at a clean stop).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "midx",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        snapshot_interval_seconds: float = 300.0,
    ) -> None:
        self.where = _describe(url)
        self.chunk_bytes = chunk_bytes
        self._keys = _Keys(prefix)
        # No automatic retries: a retried script whose first reply was lost would record a write twice.
        no_retry = Retry(NoBackoff(), 0)
        # Typed as Any: redis-py's stubs type every reply as bytes | str because decode_responses is
        # chosen at run time; these clients always return bytes.
        self._client: Any = Redis.from_url(
            url, socket_timeout=60.0, socket_connect_timeout=5.0, retry=no_retry, health_check_interval=0
        )
        self._reader: Any = Redis.from_url(
            url,
            socket_timeout=_BLOCK_MILLISECONDS / 1000 + 10.0,
            socket_connect_timeout=5.0,
            retry=no_retry,
            single_connection_client=True,
        )
        self._commit = self._client.register_script(redis_scripts.COMMIT)
        self._checkpoint_script = self._client.register_script(redis_scripts.CHECKPOINT)
        self._create = self._client.register_script(redis_scripts.CREATE)
        self._delete = self._client.register_script(redis_scripts.DELETE)
        self._drop_snapshot = self._client.register_script(redis_scripts.DROP_SNAPSHOT)
        self._renew_lock = self._client.register_script(redis_scripts.RENEW_LOCK)
        self._release_lock = self._client.register_script(redis_scripts.RELEASE_LOCK)

        self._registry: IndexRegistry | None = None
        self._incarnations: dict[str, str] = {}
        self._followers: dict[str, _Follower] = {}
        # Catalog events this server caused itself, which the reader skips: (kind, incarnation).
        self._own_events: set[tuple[str, str]] = set()
        # Snapshots of uploads this server is recording or recorded, so its follower does not read
        # back what its writer already swapped in.
        self._own_uploads: set[str] = set()
        self._epoch: bytes | None = None
        self._catalog_last_id: bytes | str = "0-0"
        self._link_problem: str | None = None
        self._write_problem: str | None = None
        self._last_probe = 0.0
        self._closing = False
        self._wake = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._checkpoints = CheckpointScheduler(self.checkpoint, self._indexes_here, snapshot_interval_seconds)

    # ---------------------------------------------------------------------------- life cycle

    async def load(self) -> list[RestoredIndex]:
        """Recover every index: its newest complete snapshot plus the log entries after it.

        Raises UnavailableError when Redis cannot be reached, and CorruptDataError when a current
        snapshot or an entry fails its checks, so that the server does not start with a state that
        no writer produced.
        """
        try:
            await self._client.ping()
            self._epoch = await self._ensure_epoch()
            self._catalog_last_id = await self._last_catalog_id()
            catalog = await self._client.hgetall(self._keys.indexes)
            restored = []
            for raw_name, value in sorted(catalog.items()):
                name = raw_name.decode()
                incarnation, config = _parse_catalog_value(value)
                recovered = await self._recover(name, incarnation)
                if recovered is None:
                    continue  # deleted while this server was reading it
                version, index = recovered
                self._incarnations[name] = incarnation
                state = None if index is None else index.state_dict()
                restored.append(RestoredIndex(name, config, version, state))
                logger.info("index %r recovered from Redis at version %d", name, version)
        except _CONNECTION_ERRORS as error:
            raise UnavailableError(f"cannot read the indexes from Redis at {self.where}: {error}") from error
        return restored

    async def start(self, registry: IndexRegistry) -> None:
        """Follow the other replicas' writes and start the snapshot schedule."""
        self._registry = registry
        for name, incarnation in list(self._incarnations.items()):
            current = registry.current(name)
            self._start_follower(name, incarnation, 0 if current is None else current.version)
        self._reader_task = asyncio.create_task(self._read_forever(), name="midx-redis-reader")
        self._checkpoints.start()

    async def close(self) -> None:
        """Stop following, snapshot every changed index once more (when Redis is reachable), disconnect."""
        self._closing = True
        self._wake.set()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        await self._checkpoints.close(final=self._link_problem is None and self._registry is not None)
        for follower in list(self._followers.values()):
            await self._stop_follower(follower)
        await self._reader.aclose()
        await self._client.aclose()

    def problem(self) -> str | None:
        if self._link_problem is not None:
            return self._link_problem
        return self._write_problem

    # -------------------------------------------------------------------------------- writes

    async def append(self, mutation: Mutation) -> None:
        """Record `mutation` in Redis; return only once Redis has taken it.

        Raises StaleVersionError when another replica recorded that version first, NotFoundError
        or AlreadyExistsError when the catalog disagrees, and UnavailableError when Redis cannot be
        reached or rejects the write.
        """
        if self._link_problem is not None:
            raise UnavailableError(
                f"persistence is unavailable, so the {mutation.kind} of index {mutation.name!r} was rejected: "
                f"{self._link_problem}. Sampling goes on; retry the mutation later"
            )
        try:
            await self._append(mutation)
        except _CONNECTION_ERRORS as error:
            self._connection_lost(error)
            raise UnavailableError(
                f"Redis at {self.where} did not confirm the {mutation.kind} of index {mutation.name!r} ({error}); "
                "it was not acknowledged. Retry it when persistence is back"
            ) from error
        except ResponseError as error:
            self._write_problem = f"Redis at {self.where} rejects writes: {error}"
            logger.error("Redis rejected the %s of index %r: %s", mutation.kind, mutation.name, error)
            raise UnavailableError(
                f"Redis at {self.where} rejected the {mutation.kind} of index {mutation.name!r} ({error}); "
                "the index is unchanged. Fix Redis (memory, disk) and retry"
            ) from error
        self._write_problem = None

    async def _append(self, mutation: Mutation) -> None:
        if mutation.kind == "create":
            await self._append_create(mutation)
        elif mutation.kind == "delete":
            await self._append_delete(mutation)
        else:
            await self._append_change(mutation)

    async def _append_create(self, mutation: Mutation) -> None:
        assert mutation.config is not None
        name = mutation.name
        incarnation = secrets.token_hex(8)
        fields = encode_entry(mutation, self.chunk_bytes)
        self._own_events.add(("create", incarnation))
        result = await self._create_index(name, incarnation, mutation.config, 0, fields, snapshot_id="")
        if result != b"ok":
            self._own_events.discard(("create", incarnation))
            raise AlreadyExistsError(f"index {name!r} exists already; delete it first or pick another name")
        self._incarnations[name] = incarnation
        self._start_follower(name, incarnation, 0)

    async def _create_index(
        self,
        name: str,
        incarnation: str,
        config: IndexConfig,
        version: int,
        fields: Mapping[str, bytes | memoryview],
        *,
        snapshot_id: str,
    ) -> bytes:
        keys = self._keys
        catalog_value = json.dumps({"incarnation": incarnation, "config": config.to_dict()})
        result: bytes = await self._create(
            keys=[keys.indexes, keys.catalog, keys.head(name, incarnation), keys.log(name, incarnation)],
            args=[
                name,
                incarnation,
                catalog_value,
                _CATALOG_LENGTH,
                version,
                keys.base(name, incarnation),
                snapshot_id,
                *_flatten(fields),
            ],
        )
        return result

    async def _append_delete(self, mutation: Mutation) -> None:
        name = mutation.name
        incarnation = self._incarnation(name)
        keys = self._keys
        self._own_events.add(("delete", incarnation))
        result = await self._delete(
            keys=[
                keys.indexes,
                keys.catalog,
                keys.head(name, incarnation),
                keys.log(name, incarnation),
                keys.refit_lock(name, incarnation),
                keys.snapshot_lock(name, incarnation),
            ],
            args=[name, incarnation, keys.base(name, incarnation), _CATALOG_LENGTH],
        )
        if result != b"ok":
            # The catalog event of the other server's delete removes the index here.
            self._own_events.discard(("delete", incarnation))
            raise NotFoundError(f"index {name!r} was deleted through another server")
        self._forget(name, incarnation)

    async def _append_change(self, mutation: Mutation) -> None:
        name = mutation.name
        incarnation = self._incarnation(name)
        snapshot_id = ""
        if mutation.kind == "upload":
            assert mutation.index is not None
            snapshot_id = await self.write_snapshot(name, incarnation, mutation.index, mutation.version)

        result = await self._record_entry(mutation, incarnation, snapshot_id)

        status = result[0]
        if status != b"ok" and snapshot_id:
            await self._discard_snapshot(name, incarnation, snapshot_id)
        if status == b"stale":
            raise StaleVersionError(name, int(result[1]))
        if status == b"missing":
            raise NotFoundError(f"index {name!r} was deleted through another server")
        if status != b"ok":
            raise UnavailableError(
                f"the snapshot for the {mutation.kind} of index {name!r} expired before it was committed; retry"
            )
        if mutation.kind == "refit":
            self._checkpoints.request(name)

    async def _record_entry(self, mutation: Mutation, incarnation: str, snapshot_id: str) -> list[bytes]:
        """Run the commit script for `mutation`; when it does not return, the upload's snapshot is discarded."""
        name = mutation.name
        fields = encode_entry(mutation, self.chunk_bytes, snapshot=snapshot_id or None)
        keys = self._keys
        if snapshot_id:
            self._own_uploads.add(snapshot_id)
        try:
            result: list[bytes] = await self._commit(
                keys=[keys.head(name, incarnation), keys.log(name, incarnation)],
                args=[
                    incarnation,
                    mutation.version - 1,
                    mutation.version,
                    keys.base(name, incarnation),
                    snapshot_id,
                    *_flatten(fields),
                ],
            )
        except BaseException:
            if snapshot_id:
                self._own_uploads.discard(snapshot_id)
                with contextlib.suppress(RedisError, OSError):
                    await self._discard_snapshot(name, incarnation, snapshot_id)
            raise
        if result[0] != b"ok":
            self._own_uploads.discard(snapshot_id)
        return result

    def _incarnation(self, name: str) -> str:
        incarnation = self._incarnations.get(name)
        if incarnation is None:
            raise NotFoundError(f"index {name!r} is not in Redis; it was deleted through another server")
        return incarnation

    # ----------------------------------------------------------------------------- snapshots

    async def checkpoint(self, name: str) -> None:
        """Snapshot index `name` when its version is newer than the current snapshot's.

        At most one replica writes a snapshot of an index at a time (a lock with expiry); the others
        skip it. The new snapshot becomes current only after every chunk is written, then the old
        one is dropped and the log is trimmed behind it.
        """
        registry = self._registry
        incarnation = self._incarnations.get(name)
        snapshot = None if registry is None else registry.current(name)
        if incarnation is None or snapshot is None or snapshot.index is None or self._link_problem is not None:
            return
        head = self._keys.head(name, incarnation)
        newest = await self._client.hget(head, "snapshot_version")
        if newest is not None and int(newest) >= snapshot.version:
            return
        async with self._lock(self._keys.snapshot_lock(name, incarnation), wait=False) as held:
            if not held:
                return
            started = time.perf_counter()
            snapshot_id = await self.write_snapshot(name, incarnation, snapshot.index, snapshot.version)
            keys = self._keys
            result = await self._checkpoint_script(
                keys=[head, keys.log(name, incarnation)],
                args=[incarnation, snapshot.version, keys.base(name, incarnation), snapshot_id],
            )
            if result != b"ok":
                await self._discard_snapshot(name, incarnation, snapshot_id)
                logger.debug("snapshot of index %r version %d not adopted: %s", name, snapshot.version, result)
                return
        logger.info(
            "index %r version %d: snapshot written to Redis in %.2f s",
            name,
            snapshot.version,
            time.perf_counter() - started,
        )

    async def write_snapshot(self, name: str, incarnation: str, index: MidxIndex, version: int) -> str:
        """Write a snapshot whose keys expire unless a script adopts it; return its id."""
        plan = await asyncio.to_thread(plan_snapshot, index, version, self.chunk_bytes)
        snapshot_id = f"{version}-{secrets.token_hex(6)}"
        key = self._keys.snapshot(name, incarnation, snapshot_id)
        try:
            for number, chunk in enumerate(plan.chunks):
                await self._client.set(f"{key}:{number}", chunk, px=_UNCOMMITTED_TTL_MILLISECONDS)
            # The manifest goes last: a snapshot without one is never adopted.
            await self._client.set(key, encode_manifest(plan.manifest), px=_UNCOMMITTED_TTL_MILLISECONDS)
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await self._discard_snapshot(name, incarnation, snapshot_id, len(plan.chunks))
            raise
        return snapshot_id

    async def _discard_snapshot(self, name: str, incarnation: str, snapshot_id: str, num_chunks: int = 0) -> None:
        key = self._keys.snapshot(name, incarnation, snapshot_id)
        if num_chunks:
            await self._client.unlink(key, *(f"{key}:{number}" for number in range(num_chunks)))
        else:
            await self._drop_snapshot(args=[self._keys.base(name, incarnation), snapshot_id])

    async def read_snapshot(self, name: str, incarnation: str, snapshot_id: str) -> dict[str, Any]:
        """Read and check snapshot `snapshot_id` of an index; return its state dict.

        Raises _SnapshotChangedError when its manifest or a chunk is gone (a newer snapshot replaced
        it), CorruptDataError when a chunk fails its size or SHA-256 check.
        """
        key = self._keys.snapshot(name, incarnation, snapshot_id)
        manifest_bytes = await self._client.get(key)
        if manifest_bytes is None:
            raise _SnapshotChangedError(f"snapshot {snapshot_id} of index {name!r} is gone")
        reader = SnapshotReader(decode_manifest(manifest_bytes))
        for number in range(int(reader.manifest["num_chunks"])):
            data = await self._client.get(f"{key}:{number}")
            if data is None:
                raise _SnapshotChangedError(f"chunk {number} of snapshot {snapshot_id} of index {name!r} is gone")
            await asyncio.to_thread(reader.add, data)
        return reader.state()

    # ------------------------------------------------------------------------------ recovery

    async def _recover(self, name: str, incarnation: str) -> tuple[int, MidxIndex | None] | None:
        """Rebuild one index on the CPU from Redis; None when it was deleted meanwhile."""
        for _ in range(_CONSISTENT_READ_ATTEMPTS):
            head = await self._client.hgetall(self._keys.head(name, incarnation))
            if head.get(b"incarnation") != incarnation.encode():
                return None
            index: MidxIndex | None = None
            start = 0
            snapshot_id = head.get(b"snapshot")
            try:
                if snapshot_id is not None:
                    state = await self.read_snapshot(name, incarnation, snapshot_id.decode())
                    index = await asyncio.to_thread(MidxIndex.from_state_dict, state, "cpu")
                    start = int(head[b"snapshot_version"])
                entries = await self._entries_after(name, incarnation, start)
                if any(entry.kind == "upload" for entry in entries):
                    continue  # an upload landed after the head was read; read its snapshot instead
                if not entries:
                    return start, index
                return entries[-1].version, await asyncio.to_thread(replay, index, start, entries)
            except (_SnapshotChangedError, ReplayGapError) as error:
                logger.debug("index %r changed while it was read (%s); reading it again", name, error)
        raise UnavailableError(
            f"index {name!r} kept changing while this server read it from Redis; restart it when writes calm down"
        )

    async def _entries_after(self, name: str, incarnation: str, version: int) -> list[Entry]:
        """Return the log entries of versions above `version`, oldest first."""
        key = self._keys.log(name, incarnation)
        entries: list[Entry] = []
        low = f"({version}-1"
        while True:
            page = await self._client.xrange(key, min=low, max="+", count=_READ_COUNT)
            entries.extend(decode_entry(fields) for _, fields in page)
            if len(page) < _READ_COUNT:
                return entries
            low = "(" + page[-1][0].decode()

    async def _ensure_epoch(self) -> bytes:
        await self._client.set(self._keys.epoch, secrets.token_hex(8), nx=True)
        epoch: bytes | None = await self._client.get(self._keys.epoch)
        if epoch is None:
            raise UnavailableError(f"Redis at {self.where} lost the key {self._keys.epoch!r} right after it was set")
        return epoch

    async def _last_catalog_id(self) -> bytes | str:
        newest = await self._client.xrevrange(self._keys.catalog, count=1)
        return newest[0][0] if newest else "0-0"

    # ------------------------------------------------------------------------------- following

    def _indexes_here(self) -> list[str]:
        return sorted(self._incarnations)

    def _start_follower(self, name: str, incarnation: str, read_version: int) -> None:
        follower = _Follower(name, incarnation, read_version)
        follower.task = asyncio.create_task(self._apply_forever(follower), name=f"midx-follow-{name}")
        self._followers[name] = follower
        self._wake.set()

    async def _stop_follower(self, follower: _Follower) -> None:
        if self._followers.get(follower.name) is follower:
            del self._followers[follower.name]
        if follower.task is not None and follower.task is not asyncio.current_task():
            follower.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower.task

    def _forget(self, name: str, incarnation: str) -> None:
        if self._incarnations.get(name) == incarnation:
            del self._incarnations[name]
        follower = self._followers.get(name)
        if follower is not None and follower.incarnation == incarnation:
            del self._followers[name]
            if follower.task is not None:
                follower.task.cancel()

    async def _read_forever(self) -> None:
        backoff = _RECONNECT_MIN_SECONDS
        while not self._closing:
            if self._link_problem is not None:
                try:
                    await self._reconnect()
                    backoff = _RECONNECT_MIN_SECONDS
                except (RedisError, OSError, UnavailableError) as error:
                    self._link_problem = f"Redis at {self.where} is unreachable ({error}); reconnecting"
                    await self._pause(backoff)
                    backoff = min(2 * backoff, _RECONNECT_MAX_SECONDS)
                continue
            try:
                await self._probe_writes()
                await self._read_once()
            except _CONNECTION_ERRORS as error:
                self._connection_lost(error)
            except RedisError as error:
                logger.error("reading the Redis logs failed: %s", error)
                await self._pause(_RECONNECT_MAX_SECONDS)

    async def _pause(self, seconds: float) -> None:
        # Reconnection backoff; close() sets the event to end it early.
        await wait_for_event(self._wake, seconds)
        self._wake.clear()

    async def _read_once(self) -> None:
        streams: dict[str, bytes | str] = {self._keys.catalog: self._catalog_last_id}
        by_key: dict[bytes, _Follower] = {}
        registry = self._registry
        for follower in self._followers.values():
            current = None if registry is None else registry.current(follower.name)
            version = max(follower.read_version, 0 if current is None else current.version)
            key = self._keys.log(follower.name, follower.incarnation)
            streams[key] = f"{version}-1"
            by_key[key.encode()] = follower
        response = await self._reader.xread(streams, count=_READ_COUNT, block=_BLOCK_MILLISECONDS)
        for stream, entries in response or []:
            if stream == self._keys.catalog.encode():
                for entry_id, fields in entries:
                    await self._on_catalog_event(fields)
                    self._catalog_last_id = entry_id
                continue
            target = by_key.get(stream)
            if target is None or self._followers.get(target.name) is not target:
                continue
            target.read_version = int(entries[-1][0].split(b"-")[0])
            target.queue.put_nowait(entries)

    async def _on_catalog_event(self, fields: dict[bytes, bytes]) -> None:
        kind = fields[b"kind"].decode()
        name = fields[b"name"].decode()
        incarnation = fields[b"incarnation"].decode()
        if (kind, incarnation) in self._own_events:
            self._own_events.discard((kind, incarnation))
            return
        if kind == "delete":
            if self._incarnations.get(name) == incarnation:
                self._forget(name, incarnation)
                if self._registry is not None:
                    await self._registry.remove_replicated(name)
            return
        if kind == "create" and self._incarnations.get(name) != incarnation:
            value = await self._client.hget(self._keys.indexes, name)
            if value is None or _parse_catalog_value(value)[0] != incarnation:
                return  # deleted again since
            await self._adopt_index(name, incarnation, _parse_catalog_value(value)[1])

    async def _adopt_index(self, name: str, incarnation: str, config: IndexConfig) -> None:
        """Start serving index `name` as Redis stores it, replacing any local index of that name."""
        registry = self._registry
        assert registry is not None
        version, index = 0, None
        head = await self._client.hgetall(self._keys.head(name, incarnation))
        snapshot_id = head.get(b"snapshot")
        if snapshot_id is not None:
            state = await self.read_snapshot(name, incarnation, snapshot_id.decode())
            index = await asyncio.to_thread(MidxIndex.from_state_dict, state, registry.device)
            version = int(head[b"snapshot_version"])
        previous = self._incarnations.get(name)
        if previous is not None:
            self._forget(name, previous)
        self._incarnations[name] = incarnation
        await registry.install_replicated(name, config, version, index)
        # The follower's first step is a catch-up, which applies the entries after the snapshot.
        self._start_follower(name, incarnation, version)

    async def _apply_forever(self, follower: _Follower) -> None:
        catch_up = True
        while True:
            try:
                if catch_up:
                    await self._catch_up(follower)
                    catch_up = False
                batch = await follower.queue.get()
                while not follower.queue.empty():
                    batch.extend(follower.queue.get_nowait())
                await self._apply_batch(follower, [decode_entry(fields) for _, fields in batch])
            except (ReplayGapError, _SnapshotChangedError) as gap:
                logger.info("index %r: %s; reloading from the newest snapshot", follower.name, gap)
                catch_up = True
            except _CONNECTION_ERRORS as error:
                # The reconnection catches every index up, this one included.
                self._connection_lost(error)
            except NotFoundError:
                return  # deleted here; the catalog event stops this task
            except Exception:
                logger.exception("applying the Redis log of index %r failed; reloading it", follower.name)
                catch_up = True
                await asyncio.sleep(_RECONNECT_MAX_SECONDS)

    async def _apply_batch(self, follower: _Follower, entries: Sequence[Entry]) -> None:
        """Apply entries of one index in version order; raise ReplayGapError when some are missing."""
        registry = self._registry
        assert registry is not None
        run: list[Entry] = []
        for entry in entries:
            if entry.kind == "update":
                run.append(entry)
                continue
            await self._apply_updates(follower.name, run)
            run = []
            if entry.kind == "refit":
                await registry.apply_replicated(
                    follower.name, "refit", entry.version, functools.partial(_replay_one, entry)
                )
            elif entry.kind == "upload":
                await self._apply_upload(follower, entry)
            # "create" is the log's first entry; the catalog event already created the index.
        await self._apply_updates(follower.name, run)

    async def _apply_updates(self, name: str, run: list[Entry]) -> None:
        if not run or self._registry is None:
            return
        changed = [entry.ids for entry in run if entry.ids is not None]
        await self._registry.apply_replicated(
            name,
            "update",
            run[-1].version,
            lambda index, version: replay(index, version, run),
            changed_ids=torch.cat(changed) if changed else None,
        )

    async def _apply_upload(self, follower: _Follower, entry: Entry) -> None:
        registry = self._registry
        assert registry is not None and entry.snapshot is not None
        name = follower.name
        # This server's own upload is swapped in by its writer right after the script returns.
        own = entry.snapshot in self._own_uploads
        if own and await registry.wait_for_version(name, entry.version, _CATCH_UP_TIMEOUT_SECONDS):
            self._own_uploads.discard(entry.snapshot)
            return
        current = registry.current(name)
        if current is not None and current.version >= entry.version:
            return
        state = await self.read_snapshot(name, follower.incarnation, entry.snapshot)
        device = registry.device
        await registry.apply_replicated(
            name, "upload", entry.version, lambda index, version: MidxIndex.from_state_dict(state, device)
        )

    async def _catch_up(self, follower: _Follower) -> None:
        """Bring the local index up to the newest version in Redis: snapshot if needed, then entries."""
        registry = self._registry
        assert registry is not None
        name, incarnation = follower.name, follower.incarnation
        for _ in range(_CONSISTENT_READ_ATTEMPTS):
            head = await self._client.hgetall(self._keys.head(name, incarnation))
            if head.get(b"incarnation") != incarnation.encode():
                return  # deleted; the catalog event removes it here
            current = registry.current(name)
            if current is None:
                return
            start = current.version
            snapshot_id = head.get(b"snapshot")
            try:
                if start > int(head[b"version"]):
                    await self._push_newer_state(follower, int(head[b"version"]))
                    return
                if snapshot_id is not None and start < int(head[b"snapshot_version"]):
                    upload = Entry("upload", int(head[b"snapshot_version"]), snapshot=snapshot_id.decode())
                    await self._apply_upload(follower, upload)
                    start = upload.version
                await self._apply_batch(follower, await self._entries_after(name, incarnation, start))
                return
            except (ReplayGapError, _SnapshotChangedError) as error:
                logger.debug("index %r changed during catch-up (%s); reading it again", name, error)
        raise UnavailableError(f"index {name!r} kept changing while this server caught up with Redis")

    async def _push_newer_state(self, follower: _Follower, redis_version: int) -> None:
        """Write this server's state back over an older one: Redis lost acknowledged writes.

        Happens after Redis restarted from data older than its last acknowledged write (an RDB file,
        or an append-only file that missed its last second). The state goes in as an upload entry on
        top of the version Redis has, so the other replicas load it too.
        """
        registry = self._registry
        assert registry is not None
        name, incarnation = follower.name, follower.incarnation
        current = registry.current(name)
        if current is None or current.index is None:
            return
        logger.warning(
            "index %r: Redis has version %d but this server has %d; writing this server's state back",
            name,
            redis_version,
            current.version,
        )
        snapshot_id = await self.write_snapshot(name, incarnation, current.index, current.version)
        upload = Mutation("upload", name, current.version, index=current.index)
        fields = encode_entry(upload, self.chunk_bytes, snapshot=snapshot_id)
        keys = self._keys
        self._own_uploads.add(snapshot_id)
        result = await self._commit(
            keys=[keys.head(name, incarnation), keys.log(name, incarnation)],
            args=[
                incarnation,
                redis_version,
                current.version,
                keys.base(name, incarnation),
                snapshot_id,
                *_flatten(fields),
            ],
        )
        if result[0] != b"ok":
            self._own_uploads.discard(snapshot_id)
            await self._discard_snapshot(name, incarnation, snapshot_id)
            raise ReplayGapError(f"index {name!r} changed in Redis while its newer state was written back")

    # --------------------------------------------------------------------------- reconnecting

    def _connection_lost(self, error: BaseException) -> None:
        if self._link_problem is None and not self._closing:
            logger.error(
                "lost the connection to Redis at %s (%s); mutations are rejected until it is back", self.where, error
            )
        self._link_problem = f"Redis at {self.where} is unreachable ({error}); reconnecting"
        self._wake.set()

    async def _reconnect(self) -> None:
        """Reconnect, then bring every index up to date before mutations are accepted again."""
        await self._client.ping()
        epoch = await self._client.get(self._keys.epoch)
        if epoch is None:
            await self._write_back()
        elif epoch != self._epoch:
            logger.warning("Redis at %s contains a different data set than before; adopting its indexes", self.where)
            self._epoch = epoch
            await self._sync_catalog()
        else:
            await self._sync_catalog()
        self._link_problem = None
        logger.info("reconnected to Redis at %s; mutations are accepted again", self.where)

    async def _sync_catalog(self) -> None:
        """Make the local set of indexes match Redis's catalog, then catch every index up."""
        registry = self._registry
        assert registry is not None
        last_id = await self._last_catalog_id()
        catalog = {
            name.decode(): _parse_catalog_value(value)
            for name, value in (await self._client.hgetall(self._keys.indexes)).items()
        }
        missing = {
            name: incarnation
            for name, incarnation in self._incarnations.items()
            if name not in catalog or catalog[name][0] != incarnation
        }
        deleted = await self._deleted_since(self._catalog_last_id) if missing else set()
        for name, incarnation in missing.items():
            if name not in catalog and deleted is not None and incarnation not in deleted:
                # No delete was recorded after the last event this server read: Redis lost the
                # index (it restarted from older data), so this server writes it back.
                logger.warning("index %r is missing from Redis without a delete; writing it back", name)
                await self._write_back_index(registry, name)
                continue
            self._forget(name, incarnation)
            if name not in catalog:
                await registry.remove_replicated(name)
        for name, (incarnation, config) in sorted(catalog.items()):
            if self._incarnations.get(name) != incarnation:
                await self._adopt_index(name, incarnation, config)
            else:
                await self._catch_up(self._followers[name])
        self._catalog_last_id = last_id

    async def _deleted_since(self, last_id: bytes | str) -> set[str] | None:
        """Return the incarnations deleted after catalog event `last_id`.

        Returns None when the catalog stream was trimmed past `last_id`, so deletes may be missing.
        """
        oldest = await self._client.xrange(self._keys.catalog, count=1)
        if oldest and last_id != "0-0" and _stream_id(oldest[0][0]) > _stream_id(last_id):
            return None
        deleted = set()
        for _, fields in await self._client.xrange(self._keys.catalog, min=f"({_text(last_id)}", max="+"):
            if fields[b"kind"] == b"delete":
                deleted.add(fields[b"incarnation"].decode())
        return deleted

    async def _write_back(self) -> None:
        """Redis came back without this data set (it lost it): write this server's indexes back.

        One server does it, under a lock; the others wait, then adopt what it wrote. Indexes get new
        incarnations, so replicas replace their copies instead of mixing them with the old logs.
        """
        registry = self._registry
        assert registry is not None
        async with self._lock(self._keys.reseed_lock, wait=False) as held:
            if not held:
                raise UnavailableError(f"Redis at {self.where} lost its data; another server is writing it back")
            if await self._client.get(self._keys.epoch) is not None:
                raise UnavailableError(f"Redis at {self.where} was written back by another server; adopting it")
            logger.warning(
                "Redis at %s lost its data; writing back the %d indexes of this server",
                self.where,
                len(self._incarnations),
            )
            for name in list(self._incarnations):
                await self._write_back_index(registry, name)
            epoch = secrets.token_hex(8).encode()
            await self._client.set(self._keys.epoch, epoch)
            self._epoch = epoch
            self._catalog_last_id = await self._last_catalog_id()

    async def _write_back_index(self, registry: IndexRegistry, name: str) -> None:
        snapshot = registry.current(name)
        state = registry.state(name)
        previous = self._incarnations[name]
        self._forget(name, previous)
        if snapshot is None:
            return
        incarnation = secrets.token_hex(8)
        self._own_events.add(("create", incarnation))
        if snapshot.index is None:
            fields = encode_entry(Mutation("create", name, 0, config=state.config), self.chunk_bytes)
            result = await self._create_index(name, incarnation, state.config, snapshot.version, fields, snapshot_id="")
        else:
            snapshot_id = await self.write_snapshot(name, incarnation, snapshot.index, snapshot.version)
            upload = Mutation("upload", name, snapshot.version, index=snapshot.index)
            fields = encode_entry(upload, self.chunk_bytes, snapshot=snapshot_id)
            result = await self._create_index(
                name, incarnation, state.config, snapshot.version, fields, snapshot_id=snapshot_id
            )
            if result != b"ok":
                await self._discard_snapshot(name, incarnation, snapshot_id)
        if result != b"ok":
            self._own_events.discard(("create", incarnation))
            # Another server wrote it back first; the next reconnection attempt adopts its copy.
            raise UnavailableError(f"index {name!r} was written back to Redis by another server; adopting it")
        self._incarnations[name] = incarnation
        self._start_follower(name, incarnation, snapshot.version)

    async def _probe_writes(self) -> None:
        if self._write_problem is None or time.monotonic() - self._last_probe < _WRITE_PROBE_SECONDS:
            return
        self._last_probe = time.monotonic()
        try:
            await self._client.set(self._keys.probe, b"1", px=10_000)
        except ResponseError as error:
            self._write_problem = f"Redis at {self.where} rejects writes: {error}"
            return
        logger.info("Redis at %s accepts writes again", self.where)
        self._write_problem = None

    # ----------------------------------------------------------------------------------- locks

    @contextlib.asynccontextmanager
    async def refit_lock(self, name: str) -> AsyncIterator[None]:
        """Hold the refit lock of index `name` in Redis, waiting while another replica refits it.

        After acquiring it, wait until this replica has applied every version Redis holds, so a
        refit another replica just published is seen before deciding to refit again.
        """
        incarnation = self._incarnations.get(name)
        if incarnation is None:
            raise NotFoundError(f"index {name!r} is not in Redis; it was deleted through another server")
        if self._link_problem is not None:
            raise UnavailableError(
                f"persistence is unavailable, so index {name!r} cannot be refitted: {self._link_problem}"
            )
        async with self._lock(self._keys.refit_lock(name, incarnation), wait=True):
            newest = await self._client.hget(self._keys.head(name, incarnation), "version")
            if newest is not None and self._registry is not None:
                await self._registry.wait_for_version(name, int(newest), _CATCH_UP_TIMEOUT_SECONDS)
            yield

    async def newest_version(self, name: str) -> int | None:
        """Return the newest version of index `name` in Redis, or None when Redis cannot tell now."""
        incarnation = self._incarnations.get(name)
        if incarnation is None or self._link_problem is not None:
            return None
        try:
            newest = await self._client.hget(self._keys.head(name, incarnation), "version")
        except (RedisError, OSError):
            return None
        return None if newest is None else int(newest)

    @contextlib.asynccontextmanager
    async def _lock(self, key: str, *, wait: bool) -> AsyncIterator[bool]:
        """Hold a lock with expiry (SET NX PX), renewed while held; yields False when `wait` is off and it is taken."""
        token = secrets.token_hex(8)
        pause = _RECONNECT_MIN_SECONDS
        while not await self._set_lock(key, token):
            if not wait:
                yield False
                return
            # Polling: Redis offers no notification when a key expires or is deleted by a script.
            await asyncio.sleep(pause)
            pause = min(2 * pause, _RECONNECT_MAX_SECONDS)
        renewal = asyncio.create_task(self._renew(key, token))
        try:
            yield True
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            with contextlib.suppress(RedisError, OSError):
                await self._release_lock(keys=[key], args=[token])

    async def _set_lock(self, key: str, token: str) -> bool:
        try:
            return bool(await self._client.set(key, token, nx=True, px=_LOCK_MILLISECONDS))
        except _CONNECTION_ERRORS as error:
            self._connection_lost(error)
            raise UnavailableError(f"Redis at {self.where} is unreachable ({error}); retry later") from error

    async def _renew(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(_LOCK_MILLISECONDS / 3000)
            try:
                await self._renew_lock(keys=[key], args=[token, _LOCK_MILLISECONDS])
            except (RedisError, OSError) as error:
                logger.warning("could not renew the Redis lock %r: %s", key, error)


def _describe(url: str) -> str:
    """Return host:port/db of a Redis URL, without any password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    port = parts.port or 6379
    database = parts.path.lstrip("/") or "0"
    return f"{host}:{port}/{database}"


def _parse_catalog_value(value: bytes) -> tuple[str, IndexConfig]:
    try:
        parsed = json.loads(value)
        return str(parsed["incarnation"]), IndexConfig.from_dict(parsed["config"])
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptDataError(f"a catalog entry is malformed: {error!r}") from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_id(value: bytes | str) -> tuple[int, int]:
    milliseconds, _, sequence = _text(value).partition("-")
    return int(milliseconds), int(sequence or 0)


def _flatten(fields: Mapping[str, bytes | memoryview]) -> list[str | bytes | memoryview]:
    flat: list[str | bytes | memoryview] = []
    for name, value in fields.items():
        flat.extend((name, value))
    return flat


def _replay_one(entry: Entry, index: MidxIndex | None, version: int) -> MidxIndex:
    return replay(index, version, [entry])
