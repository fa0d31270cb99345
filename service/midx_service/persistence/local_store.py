"""The local-directory store (MIDX_DATA_DIR): a mutation log and chunked snapshots on one machine's disk.

Layout of the data directory:

    LOCK                              held (flock) by the one server using the directory
    indexes/<name>/index.json         the index's config; the directory exists iff the index does
    indexes/<name>/CURRENT            {"snapshot": <directory>, "version": v}, absent before the first upload
    indexes/<name>/snapshot-<v>-<id>/ manifest.json and chunk-<n>.bin, the same format as in Redis
    indexes/<name>/log-<first>.bin    framed mutation entries with versions >= first, oldest first
    tmp/                              work area; anything left there by a crash is deleted at start-up

Every change becomes visible through one rename of a fully written and fsynced file or directory
(then the parent directory is fsynced), so a crash leaves either the old or the new state. Row
updates and refits are appended to the log and fsynced before they are acknowledged. A record torn
by a crash can only be the log's last one: it fails its CRC32 and is cut off at the next start.
Uploads write a snapshot and point CURRENT at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import struct
import time
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from midx_service.core import IndexConfig, MidxIndex
from midx_service.errors import AlreadyExistsError, NotFoundError, UnavailableError
from midx_service.persistence.checkpoints import CheckpointScheduler
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
from midx_service.persistence.replay import replay
from midx_service.registry import IndexRegistry, Mutation, RestoredIndex

logger = logging.getLogger(__name__)

_RECORD_MAGIC = b"MXR1"
# Record header: magic, payload length (bytes), CRC32 of the payload.
_RECORD_HEADER = struct.Struct("<4sQI")
_FIELD_NAME = struct.Struct("<H")
_FIELD_VALUE = struct.Struct("<Q")
_LOG_DIGITS = 20


@dataclass
class _IndexFiles:
    """The open state of one index's directory."""

    name: str
    path: Path
    version: int
    snapshot_version: int
    log_first: int
    log: IO[bytes] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LocalStore:
    """Mutation log and snapshots in a local directory; see the module docstring for the layout.

    Only one server may use a directory at a time (an exclusive flock on `LOCK`). chunk_bytes:
    largest snapshot chunk file. snapshot_interval_seconds: how often changed indexes are
    snapshotted (0: only after a refit and at a clean stop); snapshots shorten the log replayed at start-up.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        snapshot_interval_seconds: float = 300.0,
    ) -> None:
        self.directory = Path(directory)
        self.chunk_bytes = chunk_bytes
        self._indexes: dict[str, _IndexFiles] = {}
        self._registry: IndexRegistry | None = None
        self._lock_file: IO[bytes] | None = None
        self._problem: str | None = None
        self._checkpoints = CheckpointScheduler(
            self.checkpoint, lambda: sorted(self._indexes), snapshot_interval_seconds
        )

    @property
    def _index_root(self) -> Path:
        return self.directory / "indexes"

    @property
    def _tmp(self) -> Path:
        return self.directory / "tmp"

    # ---------------------------------------------------------------------------- life cycle

    async def load(self) -> list[RestoredIndex]:
        """Recover every index: its current snapshot plus the log records after it.

        Raises UnavailableError when another server uses the directory, CorruptDataError when a
        snapshot or a record before the log's end fails its checks.
        """
        await asyncio.to_thread(self._open_directory)
        restored = []
        for path in sorted(self._index_root.iterdir()):
            if not (path / "index.json").is_file():
                continue
            recovered = await asyncio.to_thread(self._recover, path)
            restored.append(recovered)
            logger.info("index %r recovered from %s at version %d", recovered.name, path, recovered.version)
        return restored

    async def start(self, registry: IndexRegistry) -> None:
        self._registry = registry
        self._checkpoints.start()

    async def close(self) -> None:
        """Snapshot every changed index once more, then close the logs and release the directory."""
        await self._checkpoints.close(final=self._registry is not None)
        for files in self._indexes.values():
            if files.log is not None:
                files.log.close()
                files.log = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def problem(self) -> str | None:
        return self._problem

    @contextlib.asynccontextmanager
    async def refit_lock(self, name: str) -> AsyncIterator[None]:
        # One server per directory, and the registry runs one refit per index at a time.
        yield

    async def newest_version(self, name: str) -> int | None:
        # One server per directory: the registry's version is the newest.
        return None

    def _open_directory(self) -> None:
        self._index_root.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.directory / "LOCK", "ab")  # noqa: SIM115 - held open until close()
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise UnavailableError(
                f"data directory {self.directory} is in use by another server; give each server its own "
                "MIDX_DATA_DIR, or use MIDX_REDIS_URL to share state between servers"
            ) from None
        self._lock_file = lock_file
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()

    # -------------------------------------------------------------------------------- writes

    async def append(self, mutation: Mutation) -> None:
        """Write `mutation` durably (fsynced) before returning; raise UnavailableError when the disk fails."""
        try:
            await self._append(mutation)
        except OSError as error:
            self._problem = f"writing to the data directory {self.directory} failed: {error}"
            logger.error("recording the %s of index %r failed: %s", mutation.kind, mutation.name, error)
            raise UnavailableError(
                f"could not write the {mutation.kind} of index {mutation.name!r} to {self.directory} ({error}); "
                "the index is unchanged. Free disk space or fix the directory, then retry"
            ) from error
        self._problem = None

    async def _append(self, mutation: Mutation) -> None:
        name = mutation.name
        if mutation.kind == "create":
            assert mutation.config is not None
            await asyncio.to_thread(self._create, name, mutation.config)
            return
        files = self._indexes.get(name)
        if files is None:
            raise NotFoundError(f"index {name!r} has no directory in {self._index_root}")
        async with files.lock:
            if mutation.kind == "delete":
                await asyncio.to_thread(self._delete, files)
                del self._indexes[name]
            elif mutation.kind == "upload":
                assert mutation.index is not None
                snapshot = await asyncio.to_thread(self._write_snapshot, files, mutation.index, mutation.version)
                await asyncio.to_thread(self._adopt_snapshot, files, snapshot, mutation.version)
            else:
                fields = encode_entry(mutation, self.chunk_bytes)
                await asyncio.to_thread(self._append_record, files, fields)
                files.version = mutation.version
        if mutation.kind == "refit":
            self._checkpoints.request(name)

    def _create(self, name: str, config: IndexConfig) -> None:
        target = self._index_root / name
        if target.exists():
            raise AlreadyExistsError(f"index {name!r} exists already in {self._index_root}")
        work = self._tmp / f"create-{secrets.token_hex(6)}"
        work.mkdir()
        _write_synced(work / "index.json", json.dumps({"config": config.to_dict()}).encode())
        _fsync_directory(work)
        os.rename(work, target)
        _fsync_directory(self._index_root)
        self._indexes[name] = _IndexFiles(name, target, version=0, snapshot_version=0, log_first=1)

    def _delete(self, files: _IndexFiles) -> None:
        if files.log is not None:
            files.log.close()
            files.log = None
        trash = self._tmp / f"deleted-{files.name}-{secrets.token_hex(6)}"
        os.rename(files.path, trash)
        _fsync_directory(self._index_root)
        shutil.rmtree(trash, ignore_errors=True)

    def _append_record(self, files: _IndexFiles, fields: Mapping[str, bytes | memoryview]) -> None:
        if files.log is None:
            files.log = open(files.path / _log_name(files.log_first), "ab")  # noqa: SIM115 - kept open
            _fsync_directory(files.path)
        header, pieces = _record(fields)
        files.log.write(header)
        for piece in pieces:
            files.log.write(piece)
        files.log.flush()
        os.fsync(files.log.fileno())

    # ----------------------------------------------------------------------------- snapshots

    async def checkpoint(self, name: str) -> None:
        """Snapshot index `name` when it changed since its current snapshot, then shorten its log."""
        files = self._indexes.get(name)
        snapshot = None if self._registry is None else self._registry.current(name)
        if files is None or snapshot is None or snapshot.index is None:
            return
        if snapshot.version <= files.snapshot_version:
            return
        started = time.perf_counter()
        directory = await asyncio.to_thread(self._write_snapshot, files, snapshot.index, snapshot.version)
        async with files.lock:
            if self._indexes.get(name) is not files or snapshot.version <= files.snapshot_version:
                # Deleted, or an upload adopted a newer snapshot while this one was written.
                await asyncio.to_thread(shutil.rmtree, directory, True)
                return
            await asyncio.to_thread(self._adopt_snapshot, files, directory, snapshot.version)
        logger.info(
            "index %r version %d: snapshot written to %s in %.2f s",
            name,
            snapshot.version,
            directory,
            time.perf_counter() - started,
        )

    def _write_snapshot(self, files: _IndexFiles, index: MidxIndex, version: int) -> Path:
        """Write a complete snapshot directory inside the index's directory and return its path."""
        plan = plan_snapshot(index, version, self.chunk_bytes)
        work = self._tmp / f"snapshot-{secrets.token_hex(6)}"
        work.mkdir()
        for number, chunk in enumerate(plan.chunks):
            _write_synced(work / _chunk_name(number), chunk)
        _write_synced(work / "manifest.json", encode_manifest(plan.manifest))
        _fsync_directory(work)
        target = files.path / f"snapshot-{version}-{secrets.token_hex(6)}"
        os.rename(work, target)
        _fsync_directory(files.path)
        return target

    def _adopt_snapshot(self, files: _IndexFiles, directory: Path, version: int) -> None:
        """Point CURRENT at `directory`, start a new log segment and drop what the snapshot covers."""
        _replace_synced(files.path / "CURRENT", json.dumps({"snapshot": directory.name, "version": version}).encode())
        files.snapshot_version = version
        files.version = max(files.version, version)
        # Records after `version` (appended while the snapshot was written) stay in the segments they are in.
        if files.log is not None:
            files.log.close()
            files.log = None
        files.log_first = files.version + 1
        segments = _segments(files.path)
        for position, (_, path) in enumerate(segments):
            following = segments[position + 1][0] if position + 1 < len(segments) else files.log_first
            if following - 1 <= version:
                path.unlink()
        for path in files.path.glob("snapshot-*"):
            if path != directory:
                shutil.rmtree(path, ignore_errors=True)
        _fsync_directory(files.path)

    # ------------------------------------------------------------------------------ recovery

    def _recover(self, path: Path) -> RestoredIndex:
        name = path.name
        try:
            config = IndexConfig.from_dict(json.loads((path / "index.json").read_bytes())["config"])
        except (ValueError, KeyError, TypeError) as error:
            raise CorruptDataError(f"{path / 'index.json'} is malformed: {error!r}") from None

        index: MidxIndex | None = None
        snapshot_version = 0
        current_path = path / "CURRENT"
        if current_path.exists():
            current = json.loads(current_path.read_bytes())
            snapshot_version = int(current["version"])
            snapshot_dir = path / current["snapshot"]
            index = MidxIndex.from_state_dict(_read_snapshot(snapshot_dir), "cpu")
            for other in path.glob("snapshot-*"):
                if other != snapshot_dir:
                    shutil.rmtree(other, ignore_errors=True)  # written, never adopted

        entries = _read_log(path)
        version = snapshot_version
        pending = [entry for entry in entries if entry.version > snapshot_version]
        if pending:
            index = replay(index, snapshot_version, pending)
            version = pending[-1].version
        segments = _segments(path)
        files = _IndexFiles(name, path, version=version, snapshot_version=snapshot_version, log_first=version + 1)
        if segments:
            # Keep appending to the last segment, which may hold records after the snapshot.
            files.log_first = segments[-1][0]
        self._indexes[name] = files
        return RestoredIndex(name, config, version, None if index is None else index.state_dict())


# ---------------------------------------------------------------------------------- file helpers


def _log_name(first_version: int) -> str:
    return f"log-{first_version:0{_LOG_DIGITS}d}.bin"


def _chunk_name(number: int) -> str:
    return f"chunk-{number:06d}.bin"


def _segments(path: Path) -> list[tuple[int, Path]]:
    """Return the log segments of an index directory as (first version, path), oldest first."""
    found = []
    for segment in path.glob("log-*.bin"):
        digits = segment.stem.removeprefix("log-")
        if digits.isdigit():
            found.append((int(digits), segment))
    return sorted(found)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_synced(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _replace_synced(path: Path, data: bytes) -> None:
    """Replace `path` atomically: write a temporary file, fsync it, rename it over, fsync the directory."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    _write_synced(temporary, data)
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _record(fields: Mapping[str, bytes | memoryview]) -> tuple[bytes, list[bytes | memoryview]]:
    """Return the header and payload pieces of one log record holding `fields`."""
    pieces: list[bytes | memoryview] = []
    for name, value in fields.items():
        encoded = name.encode()
        pieces.append(_FIELD_NAME.pack(len(encoded)) + encoded + _FIELD_VALUE.pack(len(value)))
        pieces.append(value)
    checksum = 0
    length = 0
    for piece in pieces:
        checksum = zlib.crc32(piece, checksum)
        length += len(piece)
    return _RECORD_HEADER.pack(_RECORD_MAGIC, length, checksum), pieces


def _parse_fields(payload: bytes) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {}
    position = 0
    view = memoryview(payload)
    while position < len(payload):
        (name_length,) = _FIELD_NAME.unpack_from(payload, position)
        position += _FIELD_NAME.size
        name = bytes(view[position : position + name_length])
        position += name_length
        (value_length,) = _FIELD_VALUE.unpack_from(payload, position)
        position += _FIELD_VALUE.size
        fields[name] = bytes(view[position : position + value_length])
        position += value_length
    return fields


def _records(path: Path) -> Iterator[tuple[int, dict[bytes, bytes] | None]]:
    """Yield (offset, fields) for each record of a segment; fields is None for a torn or altered record."""
    with open(path, "rb") as file:
        offset = 0
        while True:
            header = file.read(_RECORD_HEADER.size)
            if not header:
                return
            if len(header) < _RECORD_HEADER.size:
                yield offset, None
                return
            magic, length, checksum = _RECORD_HEADER.unpack(header)
            payload = file.read(length) if magic == _RECORD_MAGIC else b""
            if magic != _RECORD_MAGIC or len(payload) != length or zlib.crc32(payload) != checksum:
                yield offset, None
                return
            yield offset, _parse_fields(payload)
            offset += _RECORD_HEADER.size + length


def _read_log(path: Path) -> list[Entry]:
    """Read every segment of an index's log, cutting off a record torn by a crash at the end of the last one."""
    entries: list[Entry] = []
    segments = _segments(path)
    for position, (_, segment) in enumerate(segments):
        for offset, fields in _records(segment):
            if fields is not None:
                entries.append(decode_entry(fields))
                continue
            if position != len(segments) - 1:
                raise CorruptDataError(f"log segment {segment} has an invalid record at byte {offset}")
            logger.warning("cutting off a log record torn by a crash at byte %d of %s", offset, segment)
            with open(segment, "r+b") as file:
                file.truncate(offset)
                os.fsync(file.fileno())
    return entries


def _read_snapshot(directory: Path) -> dict[str, Any]:
    reader = SnapshotReader(decode_manifest((directory / "manifest.json").read_bytes()))
    for number in range(int(reader.manifest["num_chunks"])):
        chunk = directory / _chunk_name(number)
        reader.add(chunk.read_bytes() if chunk.exists() else None)
    return reader.state()
