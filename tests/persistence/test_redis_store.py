"""The Redis store against a real Redis: recovery, replicas, snapshots, outages and a killed server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch

from midx_client import RestSamplerClient, SamplerClient, SamplerError
from midx_service.core import IndexConfig, MidxIndex
from midx_service.errors import UnavailableError
from midx_service.persistence.codec import CorruptDataError
from midx_service.persistence.redis_store import RedisStore
from midx_service.registry import IndexRegistry
from tests.persistence.conftest import PrivateRedis, wait_until

DIM = 8
NUM_CLASSES = 240
CONFIG = IndexConfig(DIM, num_codewords=8, last_stage="popularity")


def _table(seed: int, rows: int = NUM_CLASSES) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)


def _weights(seed: int, rows: int = NUM_CLASSES) -> np.ndarray:
    return np.random.default_rng(seed).random(rows) + 0.1


def _store(url: str, prefix: str, **options: Any) -> RedisStore:
    options = {"chunk_bytes": 4096, "snapshot_interval_seconds": 0.0, **options}
    return RedisStore(url, prefix=prefix, **options)


async def _replica(url: str, prefix: str, **options: Any) -> tuple[IndexRegistry, RedisStore]:
    store = _store(url, prefix, **options)
    registry = IndexRegistry(store=store, refit_error_ratio=0.0, min_version_timeout_seconds=10.0)
    await registry.restore()
    return registry, store


def _assert_same_index(left: MidxIndex, right: MidxIndex) -> None:
    assert torch.equal(left.embeddings, right.embeddings)
    assert torch.equal(left.codes, right.codes)
    assert torch.equal(left.codebooks.first, right.codebooks.first)
    assert torch.equal(left.codebooks.second, right.codebooks.second)
    if left.weights is None:
        assert right.weights is None
    else:
        assert right.weights is not None
        assert torch.equal(left.weights, right.weights)


def _index_keys(url: str, prefix: str, name: str) -> tuple[str, str]:
    """Return the (head, log) keys of index `name` as the catalog names them."""
    client = redis.Redis.from_url(url)
    try:
        value = client.hget(f"{prefix}:indexes", name)
    finally:
        client.close()
    assert value is not None, f"index {name!r} is not in the catalog"
    incarnation = json.loads(value)["incarnation"]
    base = f"{prefix}:index:{name}:{incarnation}:"
    return base + "head", base + "log"


def _head(url: str, prefix: str, name: str) -> dict[str, str]:
    head, _ = _index_keys(url, prefix, name)
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return dict(client.hgetall(head))
    finally:
        client.close()


def _log_kinds(url: str, prefix: str, name: str) -> list[tuple[int, str]]:
    _, log = _index_keys(url, prefix, name)
    client = redis.Redis.from_url(url)
    try:
        return [(int(fields[b"version"]), fields[b"kind"].decode()) for _, fields in client.xrange(log)]
    finally:
        client.close()


# ------------------------------------------------------------------------------- one process


def test_recovery_replays_log_after_snapshot(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> tuple[MidxIndex, int, dict[str, str], list[tuple[int, str]], MidxIndex, int]:
        writer, store = await _replica(redis_url, redis_prefix)
        await writer.create("words", CONFIG)
        await writer.upload("words", _table(0), _weights(0))
        for step in range(4):
            await writer.update("words", [step, 10 + step], _table(10 + step, 2), _weights(10 + step, 2))
        await store.checkpoint("words")
        for step in range(3):
            await writer.update("words", [NUM_CLASSES + step], _table(20 + step, 1), _weights(20 + step, 1))
        await writer.refit("words")
        await writer.update("words", [1, 2], _table(30, 2), _weights(30, 2))
        head = _head(redis_url, redis_prefix, "words")
        kinds = _log_kinds(redis_url, redis_prefix, "words")

        # A second server starts while the writer still runs: snapshot + entries after it.
        reader, _ = await _replica(redis_url, redis_prefix)
        recovered = await reader.snapshot("words")
        written = await writer.snapshot("words")
        await reader.close()
        await writer.close()
        assert recovered.index is not None and written.index is not None
        return recovered.index, recovered.version, head, kinds, written.index, written.version

    recovered, version, head, kinds, written, written_version = asyncio.run(scenario())

    assert version == written_version == 10
    assert recovered.num_classes == NUM_CLASSES + 3
    _assert_same_index(recovered, written)
    # The refit wrote a snapshot in the background; either way entries after the last snapshot remain.
    assert int(head["snapshot_version"]) in (5, 9)
    # The log is trimmed up to the current snapshot, whose own entry stays.
    assert kinds[0][0] == int(head["snapshot_version"])
    assert [version for version, _ in kinds] == list(range(kinds[0][0], 11))
    assert kinds[-1] == (10, "update")
    assert all(kind != "upload" for _, kind in kinds)


def test_replicas_order_concurrent_writes(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> tuple[list[int], list[int], Any, Any]:
        first, _ = await _replica(redis_url, redis_prefix)
        second, _ = await _replica(redis_url, redis_prefix)
        await first.create("words", CONFIG)
        await first.upload("words", _table(0), _weights(0))

        async def burst(registry: IndexRegistry, seed: int) -> list[int]:
            rng = np.random.default_rng(seed)
            versions = []
            for _ in range(15):
                # Both replicas append the next id, so every retry changes what the ids mean.
                size = registry.state("words").num_classes
                ids = [*rng.choice(NUM_CLASSES, 3, replace=False).tolist(), size]
                rows = rng.standard_normal((4, DIM)).astype(np.float32)
                versions.append(await registry.update("words", ids, rows, rng.random(4) + 0.1))
            return versions

        from_first, from_second = await asyncio.gather(burst(first, 1), burst(second, 2))
        newest = max(from_first + from_second)
        left = await first.snapshot("words", min_version=newest)
        right = await second.snapshot("words", min_version=newest)
        await first.close()
        await second.close()
        return from_first, from_second, left, right

    from_first, from_second, left, right = asyncio.run(scenario())

    assert sorted(from_first + from_second) == list(range(2, 32))
    assert left.version == right.version == 31
    _assert_same_index(left.index, right.index)


def test_refit_runs_on_one_replica(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> tuple[int, int, IndexRegistry, IndexRegistry]:
        first, _ = await _replica(redis_url, redis_prefix)
        second, _ = await _replica(redis_url, redis_prefix)
        await first.create("words", CONFIG)
        await first.upload("words", _table(0), _weights(0))
        await first.update("words", [1, 2, 3], _table(5, 3), _weights(5, 3))
        await second.snapshot("words", min_version=2)

        versions = await asyncio.gather(first.refit("words"), second.refit("words"))
        return versions[0], versions[1], first, second

    async def run() -> tuple[int, int, Any, Any]:
        left_version, right_version, first, second = await scenario()
        left = await first.snapshot("words", min_version=3)
        right = await second.snapshot("words", min_version=3)
        await first.close()
        await second.close()
        return left_version, right_version, left, right

    left_version, right_version, left, right = asyncio.run(run())

    kinds = _log_kinds(redis_url, redis_prefix, "words")
    assert left_version == right_version == 3
    assert [kind for _, kind in kinds].count("refit") == 1
    _assert_same_index(left.index, right.index)
    assert int(_head(redis_url, redis_prefix, "words")["snapshot_version"]) == 3


def test_delete_leaves_no_index_keys(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> tuple[list[str], int]:
        first, first_store = await _replica(redis_url, redis_prefix)
        second, _ = await _replica(redis_url, redis_prefix)
        await first.create("words", CONFIG)
        await first.upload("words", _table(0), _weights(0))
        await first.update("words", [4], _table(1, 1), _weights(1, 1))
        await first_store.checkpoint("words")
        await second.snapshot("words", min_version=2)

        await first.delete("words")
        deadline = time.monotonic() + 10
        while "words" in second.names() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        names_on_second = second.names()

        # A new index of the same name starts over, and the first server follows it.
        await second.create("words", IndexConfig(DIM, num_codewords=4))
        version = await second.upload("words", _table(2, 50))
        recreated = await first.snapshot("words", min_version=version)
        await first.close()
        await second.close()
        assert recreated.index is not None
        return names_on_second, recreated.index.num_classes

    names_on_second, recreated_classes = asyncio.run(scenario())

    assert names_on_second == []
    assert recreated_classes == 50
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = set(client.scan_iter(match=f"{redis_prefix}:*"))
        index_keys = {key for key in keys if key.startswith(f"{redis_prefix}:index:")}
    finally:
        client.close()
    head, log = _index_keys(redis_url, redis_prefix, "words")
    new_base = head.removesuffix("head")
    # Only the new index's keys are left: its head, log and current snapshot.
    assert {head, log} <= index_keys
    assert all(key.startswith(new_base) for key in index_keys), sorted(index_keys)


def test_interrupted_snapshot_is_never_loaded(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> tuple[Any, Any, int, int]:
        writer, store = await _replica(redis_url, redis_prefix)
        await writer.create("words", CONFIG)
        await writer.upload("words", _table(0), _weights(0))
        await writer.update("words", [3], _table(1, 1), _weights(1, 1))
        await store.checkpoint("words")
        await writer.update("words", [4, 5], _table(2, 2), _weights(2, 2))
        before = _head(redis_url, redis_prefix, "words")

        # 1. A checkpoint whose chunk writes fail half-way is not adopted.
        client = store._client
        real_set = client.set
        writes = 0

        async def failing_set(*args: Any, **kwargs: Any) -> Any:
            nonlocal writes
            writes += 1
            if writes > 2:
                raise redis.ConnectionError("connection reset while writing a chunk")
            return await real_set(*args, **kwargs)

        client.set = failing_set
        with pytest.raises(redis.ConnectionError):
            await store.checkpoint("words")
        client.set = real_set

        # 2. A complete snapshot that no script adopted (its writer died before committing) is
        # ignored, and expires by itself.
        incarnation = store._incarnations["words"]
        garbage = MidxIndex.build(CONFIG, np.zeros((NUM_CLASSES, DIM), np.float32) + 1, _weights(9))
        orphan = await store.write_snapshot("words", incarnation, garbage, 99)
        orphan_ttl = await client.pttl(f"{redis_prefix}:index:words:{incarnation}:snapshot:{orphan}")

        after = _head(redis_url, redis_prefix, "words")
        reader, _ = await _replica(redis_url, redis_prefix)
        recovered = await reader.snapshot("words")
        written = await writer.snapshot("words")
        await reader.close()
        await writer.close()
        assert before == after
        return recovered, written, orphan_ttl, int(after["snapshot_version"])

    recovered, written, orphan_ttl, snapshot_version = asyncio.run(scenario())

    assert snapshot_version == 2
    assert recovered.version == written.version == 3
    _assert_same_index(recovered.index, written.index)
    assert 0 < orphan_ttl <= 3_600_000


def test_incomplete_snapshot_never_current(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> tuple[bytes, dict[str, str], dict[str, str]]:
        writer, store = await _replica(redis_url, redis_prefix)
        await writer.create("words", CONFIG)
        await writer.upload("words", _table(0), _weights(0))
        await writer.update("words", [3], _table(1, 1), _weights(1, 1))
        current = await writer.snapshot("words")
        incarnation = store._incarnations["words"]
        snapshot_id = await store.write_snapshot("words", incarnation, current.index, current.version)
        base = f"{redis_prefix}:index:words:{incarnation}:"
        await store._client.delete(f"{base}snapshot:{snapshot_id}:1")
        before = _head(redis_url, redis_prefix, "words")
        result = await store._checkpoint_script(
            keys=[base + "head", base + "log"], args=[incarnation, current.version, base, snapshot_id]
        )
        after = _head(redis_url, redis_prefix, "words")
        await writer.close()
        return result, before, after

    result, before, after = asyncio.run(scenario())

    assert result == b"incomplete"
    assert after == before
    assert after["snapshot_version"] == "1"


def test_damaged_current_snapshot_stops_recovery(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> None:
        writer, store = await _replica(redis_url, redis_prefix)
        await writer.create("words", CONFIG)
        await writer.upload("words", _table(0), _weights(0))
        head = _head(redis_url, redis_prefix, "words")
        chunk = f"{redis_prefix}:index:words:{head['incarnation']}:snapshot:{head['snapshot']}:0"
        value = await store._client.get(chunk)
        await store._client.set(chunk, bytes([value[0] ^ 0xFF]) + value[1:])
        await writer.close()

        fresh = _store(redis_url, redis_prefix)
        try:
            with pytest.raises(CorruptDataError, match=r"chunk 0 \(embeddings\) of the snapshot does not match"):
                await fresh.load()
        finally:
            await fresh.close()

    asyncio.run(scenario())


def test_unreachable_redis_at_start() -> None:
    async def scenario() -> None:
        store = RedisStore("redis://127.0.0.1:9/0", prefix="midx-test-unreachable")
        try:
            with pytest.raises(UnavailableError, match=r"cannot read the indexes from Redis at 127\.0\.0\.1:9/0"):
                await store.load()
        finally:
            await store.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_large_table_snapshot_round_trips(redis_url: str, redis_prefix: str) -> None:
    rows, dim, chunk_bytes = 175_000, 768, 64 * 1024 * 1024
    generator = torch.Generator().manual_seed(0)
    config = IndexConfig(dim, num_codewords=64)
    state = {
        "config": config.to_dict(),
        "embeddings": torch.randn(rows, dim, generator=generator),
        "weights": torch.rand(rows, generator=generator, dtype=torch.float64),
        "codebook_first": torch.randn(64, dim, generator=generator),
        "codebook_second": torch.randn(64, dim, generator=generator),
        "codes": torch.randint(0, 64, (rows, 2), generator=generator),
        "fit_quantization_error": 0.25,
        "codebook_fit": "kmeans",
    }
    index = MidxIndex.from_state_dict(state)
    table_bytes = rows * dim * 4

    async def scenario() -> tuple[dict[str, Any], list[int], float, int | None]:
        store = _store(redis_url, redis_prefix, chunk_bytes=chunk_bytes)
        try:
            snapshot_id = await store.write_snapshot("big", "0", index, 1)
            key = f"{redis_prefix}:index:big:0:snapshot:{snapshot_id}"
            manifest = json.loads(await store._client.get(key))
            sizes = [await store._client.strlen(f"{key}:{n}") for n in range(manifest["num_chunks"])]
            resident = _resident_bytes()
            _reset_peak_resident()
            started = time.perf_counter()
            loaded = await store.read_snapshot("big", "0", snapshot_id)
            seconds = time.perf_counter() - started
            peak = _peak_resident_bytes()
            growth = None if peak is None or resident is None else peak - resident
            return loaded, sizes, seconds, growth
        finally:
            await store.close()

    loaded, sizes, seconds, growth = asyncio.run(scenario())

    assert max(sizes) <= chunk_bytes
    assert sum(sizes) > table_bytes
    assert len(sizes) >= table_bytes // chunk_bytes + 1
    for name in ("embeddings", "weights", "codebook_first", "codebook_second", "codes"):
        assert loaded[name].dtype == state[name].dtype, name
        assert loaded[name].numpy().tobytes() == state[name].numpy().tobytes(), name
    print(f"read {table_bytes / 2**20:.0f} MiB table in {seconds:.2f} s, resident memory grew {growth} bytes")
    if growth is not None:
        # One buffer per tensor plus one chunk in flight; well under two copies of the table.
        assert growth < 1.6 * table_bytes


def _resident_bytes() -> int | None:
    return _status_bytes("VmRSS")


def _peak_resident_bytes() -> int | None:
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_resident() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current resident size (Linux 4.0 and later).
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass


# ----------------------------------------------------------------------------- whole servers


def _exact_log_q(table: np.ndarray, queries: np.ndarray) -> np.ndarray:
    logits = torch.from_numpy(queries).double() @ torch.from_numpy(table).double().T
    return torch.log_softmax(logits, dim=1).numpy()


def test_write_visible_through_other_server(
    start_server: Callable[..., Any], redis_url: str, redis_prefix: str
) -> None:
    options = {"redis_url": redis_url, "redis_prefix": redis_prefix, "refit_error_ratio": 0.0}
    first = start_server(**options)
    second = start_server(**options)
    table = _table(0)
    rows = _table(1, 3)
    queries = _table(2, 4)
    all_ids = np.tile(np.arange(NUM_CLASSES), (4, 1))

    with SamplerClient(first.grpc_target) as writer, RestSamplerClient(second.http_url) as reader:
        writer.create_index("words", DIM, num_codewords=8)
        assert writer.upload_embeddings("words", table) == 1
        version = writer.update_embeddings("words", [5, 6, 7], rows)
        sampled = reader.sample("words", queries, 10, min_version=version, seed=1)
        exact = reader.log_prob("words", queries, all_ids, sampler="exact", min_version=version)

    table[[5, 6, 7]] = rows
    assert version == 2
    assert sampled.version == version
    assert sampled.ids.shape == (4, 10)
    assert exact.version == version
    np.testing.assert_allclose(exact.log_q, _exact_log_q(table, queries), atol=1e-4)


def test_two_servers_converge_under_writes(start_server: Callable[..., Any], redis_url: str, redis_prefix: str) -> None:
    options = {"redis_url": redis_url, "redis_prefix": redis_prefix, "refit_error_ratio": 0.0}
    servers = [start_server(**options), start_server(**options)]
    with SamplerClient(servers[0].grpc_target) as setup:
        setup.create_index("words", DIM, num_codewords=8)
        setup.upload_embeddings("words", _table(0))

    acknowledged: list[int] = []
    failures: list[BaseException] = []

    def burst(client: Any, seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with client:
                for _ in range(20):
                    ids = rng.choice(NUM_CLASSES, 5, replace=False)
                    rows = rng.standard_normal((5, DIM)).astype(np.float32)
                    acknowledged.append(client.update_embeddings("words", ids, rows))
        except BaseException as error:
            failures.append(error)

    threads = [
        threading.Thread(target=burst, args=(SamplerClient(servers[0].grpc_target), 1)),
        threading.Thread(target=burst, args=(RestSamplerClient(servers[1].http_url), 2)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert failures == []
    assert sorted(acknowledged) == list(range(2, 42))
    snapshots = [running.call(running.server.registry.snapshot("words", min_version=41)) for running in servers]
    assert [snapshot.version for snapshot in snapshots] == [41, 41]
    _assert_same_index(snapshots[0].index, snapshots[1].index)


def _readiness(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/readyz", timeout=5)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _mutations_fail_with_unavailable(grpc_target: str, http_url: str) -> list[str]:
    """Try every kind of mutation through both transports; return the messages (all must be UNAVAILABLE)."""
    messages = []
    rows = _table(7, 2)
    with SamplerClient(grpc_target, retries=0) as grpc_client, RestSamplerClient(http_url, retries=0) as rest:
        calls: list[Callable[[], object]] = [
            lambda: grpc_client.update_embeddings("words", [1, 2], rows),
            lambda: rest.update_embeddings("words", [1, 2], rows),
            lambda: rest.upload_embeddings("words", _table(8)),
            lambda: grpc_client.rebuild("words"),
            lambda: rest.create_index("other", DIM, num_codewords=4),
            lambda: grpc_client.delete_index("words"),
        ]
        for call in calls:
            with pytest.raises(SamplerError) as failure:
                call()
            assert failure.value.code == "unavailable", failure.value
            assert failure.value.status in (503, "UNAVAILABLE")
            messages.append(failure.value.message)
    return messages


def test_outage_keeps_sampling_rejects_mutations(
    private_redis: Callable[..., PrivateRedis], start_server: Callable[..., Any]
) -> None:
    own = private_redis(append_only=True)
    server = start_server(redis_url=own.url, refit_error_ratio=0.0)
    queries = _table(3, 5)
    all_ids = np.tile(np.arange(NUM_CLASSES), (5, 1))
    table = _table(0)
    with SamplerClient(server.grpc_target) as client:
        client.create_index("words", DIM, num_codewords=8)
        client.upload_embeddings("words", table)
        client.update_embeddings("words", [1, 2], _table(1, 2))
        table[[1, 2]] = _table(1, 2)
        before = client.log_prob("words", queries, all_ids, sampler="exact")

    own.stop()
    wait_until(lambda: _readiness(server.http_url)["status"] == "degraded", 10, "/readyz to report degraded")
    degraded = _readiness(server.http_url)
    messages = _mutations_fail_with_unavailable(server.grpc_target, server.http_url)
    with SamplerClient(server.grpc_target) as client, RestSamplerClient(server.http_url) as rest:
        during = client.log_prob("words", queries, all_ids, sampler="exact")
        sampled = rest.sample("words", queries, 7, seed=2)
        info = rest.get_index("words")

    own.start()
    wait_until(lambda: _readiness(server.http_url)["status"] == "ready", 30, "/readyz to report ready again")
    with SamplerClient(server.grpc_target) as client:
        version = client.update_embeddings("words", [3], _table(4, 1))
    table[[3]] = _table(4, 1)

    assert all("persistence" in message or "Redis" in message for message in messages), messages
    assert "unreachable" in degraded["persistence"]
    assert during.version == before.version == 2
    np.testing.assert_array_equal(during.log_q, before.log_q)
    assert sampled.version == 2
    assert sampled.ids.shape == (5, 7)
    assert info.version == 2
    assert version == 3
    recovered = _load_in_fresh_store(own.url, "midx")
    assert recovered.version == 3
    np.testing.assert_array_equal(recovered.table, table)


class _Recovered:
    def __init__(self, version: int, table: np.ndarray, state: dict[str, Any]) -> None:
        self.version = version
        self.table = table
        self.state = state


def _load_in_fresh_store(url: str, prefix: str, name: str = "words") -> _Recovered:
    async def load() -> _Recovered:
        store = RedisStore(url, prefix=prefix)
        try:
            restored = {index.name: index for index in await store.load()}
        finally:
            await store.close()
        found = restored[name]
        assert found.state is not None
        return _Recovered(found.version, found.state["embeddings"].numpy(), found.state)

    return asyncio.run(load())


def test_empty_redis_gets_indexes_back(
    private_redis: Callable[..., PrivateRedis], start_server: Callable[..., Any]
) -> None:
    own = private_redis(append_only=False)
    server = start_server(redis_url=own.url, refit_error_ratio=0.0)
    table = _table(0)
    with SamplerClient(server.grpc_target) as client:
        client.create_index("words", DIM, num_codewords=8)
        client.create_index("empty", DIM, num_codewords=4)
        client.upload_embeddings("words", table)
        client.update_embeddings("words", [9], _table(1, 1))
    table[[9]] = _table(1, 1)

    # /readyz returns 503 while "empty" has no table, so the test reads the persistence state directly.
    registry = server.server.registry
    own.stop()
    wait_until(lambda: registry.persistence_problem() is not None, 10, "the server to notice the outage")
    own.start()  # no append-only file: Redis comes back empty
    wait_until(lambda: registry.persistence_problem() is None, 30, "the server to write its indexes back")
    with SamplerClient(server.grpc_target) as client:
        version = client.update_embeddings("words", [10], _table(2, 1))
        names = sorted(info.name for info in client.list_indexes())
    table[[10]] = _table(2, 1)

    assert version == 3
    assert names == ["empty", "words"]
    recovered = _load_in_fresh_store(own.url, "midx")
    assert recovered.version == 3
    np.testing.assert_array_equal(recovered.table, table)


def test_older_redis_data_gets_newer_state(
    private_redis: Callable[..., PrivateRedis], start_server: Callable[..., Any]
) -> None:
    own = private_redis(append_only=False)
    server = start_server(redis_url=own.url, refit_error_ratio=0.0)
    table = _table(0)
    later_table = _table(2, 30)
    with SamplerClient(server.grpc_target) as client:
        client.create_index("words", DIM, num_codewords=8)
        client.upload_embeddings("words", table)
        admin = own.client()
        try:
            admin.save()  # the RDB file Redis restarts from: "words" at version 1, no "later"
        finally:
            admin.close()
        client.update_embeddings("words", [4], _table(1, 1))
        client.create_index("later", DIM, num_codewords=4)
        client.upload_embeddings("later", later_table)
    table[[4]] = _table(1, 1)

    registry = server.server.registry
    own.stop()
    wait_until(lambda: registry.persistence_problem() is not None, 10, "the server to notice the outage")
    own.start()
    wait_until(lambda: registry.persistence_problem() is None, 30, "the server to write its newer state back")
    with SamplerClient(server.grpc_target) as client:
        version = client.update_embeddings("words", [5], _table(3, 1))
        later = client.get_index("later")
    table[[5]] = _table(3, 1)

    assert version == 3
    assert later.version == 1
    recovered = _load_in_fresh_store(own.url, "midx")
    assert recovered.version == 3
    np.testing.assert_array_equal(recovered.table, table)
    recovered_later = _load_in_fresh_store(own.url, "midx", "later")
    np.testing.assert_array_equal(recovered_later.table, later_table)


def test_rejected_writes_reported_then_accepted(
    private_redis: Callable[..., PrivateRedis], start_server: Callable[..., Any]
) -> None:
    own = private_redis(append_only=True)
    server = start_server(redis_url=own.url, refit_error_ratio=0.0)
    with SamplerClient(server.grpc_target) as client:
        client.create_index("words", DIM, num_codewords=8)
        client.upload_embeddings("words", _table(0))

    admin = own.client()
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        with SamplerClient(server.grpc_target, retries=0) as client:
            with pytest.raises(SamplerError) as refused:
                client.update_embeddings("words", [1], _table(1, 1))
            sampled = client.sample("words", _table(2, 3), 4)
            info = client.get_index("words")
        degraded = _readiness(server.http_url)
        admin.config_set("maxmemory", 0)
    finally:
        admin.close()
    wait_until(lambda: _readiness(server.http_url)["status"] == "ready", 30, "/readyz to report ready again")
    with SamplerClient(server.grpc_target) as client:
        version = client.update_embeddings("words", [1], _table(1, 1))

    assert refused.value.code == "unavailable"
    assert "maxmemory" in refused.value.message
    assert degraded["status"] == "degraded"
    assert "rejects writes" in degraded["persistence"]
    assert sampled.version == info.version == 1
    assert version == 2


# ------------------------------------------------------------------------------ a killed server

_PORTS_LINE = re.compile(r"REST port (\d+), gRPC port (\d+)")


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "midx_service.cli", "serve", "--http-port", "0", "--grpc-port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert process.stderr is not None
    lines = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = _PORTS_LINE.search(line)
        if match:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, int(match.group(2))
    process.kill()
    raise AssertionError("the server did not report its ports:\n" + "".join(lines))


def _midx_log_q(state: dict[str, Any], queries: np.ndarray) -> np.ndarray:
    """Brute-force MIDX log Q (uniform last stage, rq): softmax over classes of s1[a_i] + s2[b_i]."""
    query = torch.from_numpy(queries).double()
    s1 = query @ state["codebook_first"].double().T
    s2 = query @ state["codebook_second"].double().T
    codes = state["codes"]
    scores = s1[:, codes[:, 0]] + s2[:, codes[:, 1]]
    return torch.log_softmax(scores, dim=1).numpy()


@pytest.mark.slow
def test_killed_server_loses_no_update(redis_url: str, redis_prefix: str) -> None:
    env = {
        "MIDX_REDIS_URL": redis_url,
        "MIDX_REDIS_PREFIX": redis_prefix,
        "MIDX_DEVICE": "cpu",
        "MIDX_REFIT_ERROR_RATIO": "0",
        "MIDX_SNAPSHOT_INTERVAL_SECONDS": "0.5",
        "MIDX_SNAPSHOT_CHUNK_BYTES": "4096",
    }
    table = _table(0, 400)
    process, grpc_port = _serve(env)
    acknowledged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    in_flight: list[tuple[np.ndarray, np.ndarray]] = []
    stop = threading.Event()
    try:
        with SamplerClient(f"127.0.0.1:{grpc_port}") as client:
            client.create_index("words", DIM, num_codewords=8)
            assert client.upload_embeddings("words", table) == 1

        def burst() -> None:
            rng = np.random.default_rng(1)
            with SamplerClient(f"127.0.0.1:{grpc_port}", retries=0, timeout_seconds=10) as client:
                while not stop.is_set():
                    ids = rng.choice(400, 8, replace=False)
                    rows = rng.standard_normal((8, DIM)).astype(np.float32)
                    in_flight[:] = [(ids, rows)]
                    try:
                        version = client.update_embeddings("words", ids, rows)
                    except SamplerError:
                        return
                    in_flight.clear()
                    acknowledged[version] = (ids, rows)

        updater = threading.Thread(target=burst)
        updater.start()
        wait_until(lambda: len(acknowledged) >= 40, 60, "40 acknowledged updates")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        updater.join(timeout=30)
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
    assert not updater.is_alive()

    restarted, grpc_port = _serve(env)
    try:
        queries = _table(5, 6)
        all_ids = np.tile(np.arange(400), (6, 1))
        with SamplerClient(f"127.0.0.1:{grpc_port}") as client:
            info = client.get_index("words")
            exact = client.log_prob("words", queries, all_ids, sampler="exact")
            midx = client.log_prob("words", queries, all_ids)
            sampled = client.sample("words", queries, 16)
        recovered = _load_in_fresh_store(redis_url, redis_prefix)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=60)

    newest = max(acknowledged)
    assert sorted(acknowledged) == list(range(2, newest + 1))
    # The update in flight at the kill may or may not have reached Redis; nothing else may differ.
    assert info.version in (newest, newest + 1)
    if info.version == newest + 1:
        assert in_flight, "a version nobody sent appeared"
        acknowledged[newest + 1] = in_flight[0]
    expected = table.copy()
    for version in sorted(acknowledged):
        ids, rows = acknowledged[version]
        expected[ids] = rows
    assert recovered.version == info.version
    np.testing.assert_array_equal(recovered.table, expected)
    assert exact.version == midx.version == sampled.version == info.version
    np.testing.assert_allclose(exact.log_q, _exact_log_q(expected, queries), atol=1e-4)
    np.testing.assert_allclose(midx.log_q, _midx_log_q(recovered.state, queries), atol=1e-4)
    assert sampled.ids.shape == (6, 16)
