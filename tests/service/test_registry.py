"""The index registry: versions, snapshot swaps, min_version waits, refits and the persistence hook."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from midx_service.core import IndexConfig, MidxIndex
from midx_service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from midx_service.registry import (
    IndexRegistry,
    IndexStatus,
    InMemoryStore,
    Mutation,
    RestoredIndex,
    StaleVersionError,
)
from tests.conftest import LEARNABLE_CODEWORDS, LEARNABLE_DIM, learnable_queries, learnable_table

DIM = 6
NUM_CLASSES = 200
CONFIG = IndexConfig(DIM, num_codewords=8)
LEARNABLE = IndexConfig(LEARNABLE_DIM, num_codewords=LEARNABLE_CODEWORDS)


def _table(seed: int = 0, rows: int = NUM_CLASSES) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)


class RecordingStore(InMemoryStore):
    """Records mutations; fails on demand; restores what it is given."""

    def __init__(self, restored: list[RestoredIndex] | None = None) -> None:
        self.mutations: list[Mutation] = []
        self.fail = False
        self.restored = restored or []

    async def load(self) -> list[RestoredIndex]:
        return self.restored

    async def append(self, mutation: Mutation) -> None:
        if self.fail:
            raise ConnectionError("store is down")
        self.mutations.append(mutation)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_versions_grow_by_one_per_mutation() -> None:
    async def scenario() -> list[int]:
        registry = IndexRegistry(refit_error_ratio=0.0)
        state = await registry.create("words", CONFIG)
        versions = [state.version]
        versions.append(await registry.upload("words", _table()))
        versions.append(await registry.update("words", [1, 2], _table(1, 2)))
        versions.append(await registry.refit("words"))
        versions.append(registry.state("words").version)
        await registry.close()
        return versions

    assert run(scenario()) == [0, 1, 2, 3, 3]


def test_store_sees_each_mutation_before_acknowledgement() -> None:
    async def scenario() -> tuple[RecordingStore, int, int]:
        store = RecordingStore()
        registry = IndexRegistry(store=store, refit_error_ratio=0.0)
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())
        await registry.update("words", [3], _table(1, 1))
        await registry.refit("words")
        store.fail = True
        with pytest.raises(UnavailableError):
            await registry.update("words", [4], _table(2, 1))
        version_after_failure = registry.state("words").version
        store.fail = False
        version = await registry.update("words", [4], _table(2, 1))
        await registry.delete("words")
        await registry.close()
        return store, version_after_failure, version

    store, version_after_failure, version = run(scenario())

    assert [mutation.kind for mutation in store.mutations] == [
        "create",
        "upload",
        "update",
        "refit",
        "update",
        "delete",
    ]
    assert [mutation.version for mutation in store.mutations[:5]] == [0, 1, 2, 3, 4]
    assert version_after_failure == 3
    assert version == 4
    update = store.mutations[2]
    assert update.ids is not None
    assert update.ids.tolist() == [3]
    assert update.index is not None


def test_restore_installs_state_dicts() -> None:
    table = _table()
    index = MidxIndex.build(CONFIG, table)
    queries = _table(5, 3)
    restored = [
        RestoredIndex("words", CONFIG, 7, index.state_dict()),
        RestoredIndex("empty", CONFIG, 0, None),
    ]

    async def scenario() -> tuple[Any, Any, Any]:
        registry = IndexRegistry(store=RecordingStore(restored))
        await registry.restore()
        snapshot = await registry.snapshot("words")
        states = registry.states()
        await registry.close()
        return snapshot, states, snapshot.index.sample(queries, 4, seed=1)

    snapshot, states, result = run(scenario())

    assert snapshot.version == 7
    assert [(state.name, state.status) for state in states] == [
        ("empty", IndexStatus.EMPTY),
        ("words", IndexStatus.READY),
    ]
    np.testing.assert_array_equal(result.ids, index.sample(queries, 4, seed=1).ids)


def test_bad_upload_leaves_index_unchanged() -> None:
    async def scenario() -> tuple[int, IndexStatus]:
        registry = IndexRegistry()
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())
        bad = _table(1)
        bad[3, 3] = np.nan
        with pytest.raises(InvalidArgumentError):
            await registry.upload("words", bad)
        state = registry.state("words")
        await registry.close()
        return state.version, state.status

    assert run(scenario()) == (1, IndexStatus.READY)


def test_min_version_waits_for_a_later_mutation() -> None:
    async def scenario() -> int:
        registry = IndexRegistry(min_version_timeout_seconds=10.0)
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())
        waiter = asyncio.create_task(registry.snapshot("words", min_version=2))
        await asyncio.sleep(0)
        assert not waiter.done()
        await registry.update("words", [0], _table(1, 1))
        snapshot = await waiter
        await registry.close()
        return snapshot.version

    assert run(scenario()) == 2


def test_min_version_times_out() -> None:
    async def scenario() -> str:
        registry = IndexRegistry(min_version_timeout_seconds=0.05)
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())
        with pytest.raises(FailedPreconditionError) as failure:
            await registry.snapshot("words", min_version=3)
        await registry.close()
        return str(failure.value)

    message = run(scenario())

    assert "version 1" in message
    assert "min_version 3" in message


def test_delete_wakes_min_version_waiters() -> None:
    async def scenario() -> None:
        registry = IndexRegistry(min_version_timeout_seconds=10.0)
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())
        waiter = asyncio.create_task(registry.snapshot("words", min_version=5))
        await asyncio.sleep(0)
        await registry.delete("words")
        with pytest.raises(NotFoundError):
            await waiter
        await registry.close()

    run(scenario())


def test_refit_keeps_rows_updated_while_it_ran() -> None:
    table = _table()

    async def scenario() -> tuple[Any, np.ndarray, np.ndarray]:
        registry = IndexRegistry(refit_error_ratio=0.0, compute_threads=2)
        await registry.create("words", CONFIG)
        await registry.upload("words", table)
        refit = asyncio.create_task(registry.refit("words"))
        await asyncio.sleep(0)  # the refit task has taken its base snapshot
        rows = _table(3, 2) * 5
        await registry.update("words", [5, NUM_CLASSES], rows)
        version = await refit
        snapshot = await registry.snapshot("words")
        await registry.close()
        return (version, snapshot), rows, snapshot.index.embeddings.numpy()

    (version, snapshot), rows, embeddings = run(scenario())

    assert version == 3
    assert snapshot.version == 3
    assert snapshot.index.num_classes == NUM_CLASSES + 1
    np.testing.assert_allclose(embeddings[[5, NUM_CLASSES]], rows)
    expected_codes = snapshot.index.codebooks.encode(snapshot.index.embeddings)
    np.testing.assert_array_equal(snapshot.index.codes.numpy(), expected_codes.numpy())


def test_error_growth_triggers_background_refit() -> None:
    table = _table()

    async def scenario() -> tuple[int, float, float]:
        registry = IndexRegistry(refit_error_ratio=1.2)
        await registry.create("words", CONFIG)
        await registry.upload("words", table)
        before = registry.state("words").fit_quantization_error
        # Moving half the rows far from every codeword raises the quantisation error well past 1.2 x.
        ids = np.arange(0, NUM_CLASSES, 2)
        await registry.update("words", ids, _table(9, len(ids)) * 20 + 50)
        for _ in range(500):
            if registry.state("words").version >= 3:
                break
            await asyncio.sleep(0.01)
        state = registry.state("words")
        await registry.close()
        return state.version, before, state.fit_quantization_error

    version, before, after = run(scenario())

    assert version == 3
    assert after != before


def test_sample_on_empty_index_fails_precondition() -> None:
    async def scenario() -> None:
        registry = IndexRegistry()
        await registry.create("words", CONFIG)
        with pytest.raises(FailedPreconditionError):
            await registry.snapshot("words")
        with pytest.raises(FailedPreconditionError):
            await registry.update("words", [0], _table(1, 1))
        await registry.close()

    run(scenario())


@pytest.mark.parametrize("name", ["", "has space", "-leading", "a" * 129, "slash/name"])
def test_create_rejects_bad_names(name: str) -> None:
    async def scenario() -> None:
        registry = IndexRegistry()
        with pytest.raises(InvalidArgumentError):
            await registry.create(name, CONFIG)
        await registry.close()

    run(scenario())


class OtherReplicaStore(InMemoryStore):
    """Acts as a store shared with another replica whose write lands first, once."""

    def __init__(self) -> None:
        self.mutations: list[Mutation] = []
        self.registry: IndexRegistry | None = None
        self.other_rows = _table(40, 1)
        self.raced = False
        self.deliveries: list[asyncio.Future[bool]] = []

    async def append(self, mutation: Mutation) -> None:
        if mutation.kind == "update" and not self.raced:
            self.raced = True
            # The other replica's update takes this version; it reaches this registry a moment later.
            asyncio.get_running_loop().call_soon(self._deliver_other_write, mutation.version)
            raise StaleVersionError(mutation.name, mutation.version)
        self.mutations.append(mutation)

    def _deliver_other_write(self, version: int) -> None:
        assert self.registry is not None
        rows = self.other_rows

        def build(index: MidxIndex | None, current: int) -> MidxIndex:
            assert index is not None and current == version - 1
            return index.update_rows([7], rows)

        self.deliveries.append(asyncio.ensure_future(self.registry.apply_replicated("words", "update", version, build)))


def test_stale_write_rebuilt_on_newer_version() -> None:
    async def scenario() -> tuple[int, Any, OtherReplicaStore]:
        store = OtherReplicaStore()
        registry = IndexRegistry(store=store, refit_error_ratio=0.0)
        store.registry = registry
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())
        version = await registry.update("words", [3], _table(41, 1))
        snapshot = await registry.snapshot("words")
        await registry.close()
        return version, snapshot, store

    version, snapshot, store = run(scenario())

    assert version == 3
    assert snapshot.version == 3
    assert np.array_equal(snapshot.index.embeddings[7].numpy(), store.other_rows[0])
    assert np.array_equal(snapshot.index.embeddings[3].numpy(), _table(41, 1)[0])
    assert [(mutation.kind, mutation.version) for mutation in store.mutations] == [
        ("create", 0),
        ("upload", 1),
        ("update", 3),
    ]


class AheadStore(InMemoryStore):
    """Acts as a store that already has version 1 (a table uploaded through another replica)."""

    async def newest_version(self, name: str) -> int | None:
        return 1


def test_stale_replica_catches_up_before_rejecting() -> None:
    async def scenario() -> tuple[int, int]:
        registry = IndexRegistry(store=AheadStore(), refit_error_ratio=0.0)
        await registry.create("words", CONFIG)
        table_index = MidxIndex.build(CONFIG, _table())

        deliveries: list[asyncio.Future[bool]] = []

        def deliver_upload() -> None:
            upload = registry.apply_replicated("words", "upload", 1, lambda index, current: table_index)
            deliveries.append(asyncio.ensure_future(upload))

        # Runs once the update is under way, on the table-less version 0.
        asyncio.get_running_loop().call_soon(deliver_upload)
        version = await registry.update("words", [2], _table(3, 1))
        num_classes = registry.state("words").num_classes
        await registry.close()
        return version, num_classes

    assert run(scenario()) == (2, NUM_CLASSES)


def test_min_version_waits_for_new_index() -> None:
    async def scenario() -> tuple[int, bool]:
        registry = IndexRegistry(min_version_timeout_seconds=5.0)
        waiting = asyncio.ensure_future(registry.snapshot("words", min_version=1))
        await asyncio.sleep(0)
        started_early = waiting.done()
        await registry.install_replicated("words", CONFIG, 1, MidxIndex.build(CONFIG, _table()))
        snapshot = await waiting
        await registry.close()
        return snapshot.version, started_early

    assert run(scenario()) == (1, False)


def test_apply_replicated_skips_applied_version() -> None:
    async def scenario() -> tuple[bool, int]:
        registry = IndexRegistry(refit_error_ratio=0.0)
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())

        def never(index: MidxIndex | None, current: int) -> MidxIndex:
            raise AssertionError("an applied version was built again")

        applied = await registry.apply_replicated("words", "update", 1, never)
        version = registry.state("words").version
        await registry.close()
        return applied, version

    assert run(scenario()) == (False, 1)


# ------------------------------------------------------------------- served queries, kl refits


def test_reservoir_keeps_most_recent_served_queries() -> None:
    async def scenario() -> tuple[np.ndarray, int, np.ndarray]:
        registry = IndexRegistry(reservoir_size=5)
        await registry.create("words", CONFIG)
        registry.record_queries("words", _table(1, 4))
        registry.record_queries("words", _table(2, 3))
        registry.record_queries("words", np.zeros((2, DIM + 1), np.float32))  # wrong width: ignored
        registry.record_queries("missing", _table(3, 2))  # unknown index: ignored
        recent, recorded = registry.recent_queries("words"), registry.queries_recorded("words")
        latest = registry.recent_queries("words", 2)
        await registry.close()
        return recent, recorded, latest

    recent, recorded, latest = run(scenario())

    np.testing.assert_array_equal(recent, np.concatenate([_table(1, 4)[2:], _table(2, 3)]))
    np.testing.assert_array_equal(latest, _table(2, 3)[1:])
    assert recorded == 7


def test_zero_reservoir_keeps_nothing() -> None:
    async def scenario() -> np.ndarray:
        registry = IndexRegistry(reservoir_size=0)
        await registry.create("words", CONFIG)
        registry.record_queries("words", _table(1, 4))
        recent = registry.recent_queries("words")
        await registry.close()
        return recent

    assert run(scenario()).shape == (0, DIM)


@pytest.mark.slow
def test_kl_refit_swaps_in_learned_codebooks() -> None:
    async def scenario() -> tuple[int, Any, RecordingStore]:
        store = RecordingStore()
        registry = IndexRegistry(store=store, refit_error_ratio=0.0, kl_refit_time_budget_seconds=20)
        await registry.create("learned", LEARNABLE)
        await registry.upload("learned", learnable_table())
        registry.record_queries("learned", learnable_queries())
        version = await registry.refit("learned", "kl")
        state = registry.state("learned")
        await registry.close()
        return version, state, store

    version, state, store = run(scenario())

    assert version == 2
    assert state.version == 2
    assert state.codebook_fit == "kl"
    report = state.last_refit
    assert report.mode == "kl"
    assert report.trigger == "request"
    assert report.accepted
    assert report.version == 2
    assert report.heldout_kl_after < report.heldout_kl_before
    assert report.num_queries == 200
    assert store.mutations[-1].kind == "refit"
    assert store.mutations[-1].index.codebook_fit == "kl"


def test_kl_refit_that_cannot_help_keeps_index() -> None:
    async def scenario() -> tuple[int, Any, Any, list[str]]:
        store = RecordingStore()
        registry = IndexRegistry(store=store, refit_error_ratio=0.0)
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())
        before = await registry.snapshot("words")
        # Zero queries make P uniform, which the current Q already matches exactly.
        version = await registry.refit("words", "kl", np.zeros((16, DIM), np.float32))
        after = await registry.snapshot("words")
        state = registry.state("words")
        await registry.close()
        return version, (before, after), state, [mutation.kind for mutation in store.mutations]

    version, (before, after), state, kinds = run(scenario())

    assert version == 1
    assert after is before
    assert state.codebook_fit == "kmeans"
    assert not state.last_refit.accepted
    assert state.last_refit.version == 1
    assert state.last_refit.heldout_kl_after == state.last_refit.heldout_kl_before
    assert kinds == ["create", "upload"]


def test_kmeans_refit_reports_without_kl() -> None:
    async def scenario() -> Any:
        registry = IndexRegistry(refit_error_ratio=0.0)
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())
        await registry.refit("words")
        state = registry.state("words")
        await registry.close()
        return state

    report = run(scenario()).last_refit

    assert (report.mode, report.trigger, report.accepted, report.version) == ("kmeans", "request", True, 2)
    assert report.heldout_kl_before is None
    assert report.heldout_kl_after is None
    assert report.seconds > 0


@pytest.mark.parametrize(
    ("mode", "queries", "error", "match"),
    [
        ("annealing", None, InvalidArgumentError, "mode must be 'kmeans' or 'kl'"),
        ("kmeans", np.zeros((16, DIM), np.float32), InvalidArgumentError, "only by mode 'kl'"),
        ("kl", np.zeros((16, DIM + 1), np.float32), InvalidArgumentError, "columns"),
        ("kl", np.full((16, DIM), np.nan, np.float32), InvalidArgumentError, "NaN"),
        ("kl", np.zeros((3, DIM), np.float32), InvalidArgumentError, "at least 8"),
        ("kl", np.zeros((40, DIM), np.float32), ResourceExhaustedError, "MIDX_KL_REFIT_MAX_QUERIES"),
        ("kl", None, FailedPreconditionError, "has 2 recent queries"),
    ],
)
def test_bad_refit_request_changes_nothing(mode: str, queries: Any, error: type[Exception], match: str) -> None:
    async def scenario() -> Any:
        registry = IndexRegistry(refit_error_ratio=0.0, kl_refit_max_queries=32)
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())
        registry.record_queries("words", _table(1, 2))
        with pytest.raises(error, match=match):
            await registry.refit("words", mode, queries)
        state = registry.state("words")
        await registry.close()
        return state

    state = run(scenario())

    assert state.version == 1
    assert state.last_refit is None


@pytest.mark.slow
def test_kl_refit_keeps_rows_updated_while_it_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    from midx_service import registry as registry_module

    fit_started = threading.Event()
    update_done = threading.Event()
    real_fit = registry_module.fit_kl_codebooks

    def fit_after_update(*args: Any, **kwargs: Any) -> Any:
        fit_started.set()
        if not update_done.wait(timeout=30):
            raise TimeoutError("the row update never finished")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(registry_module, "fit_kl_codebooks", fit_after_update)
    rows = np.full((2, LEARNABLE_DIM), 3.0, np.float32)

    async def scenario() -> tuple[int, int, Any]:
        registry = IndexRegistry(refit_error_ratio=0.0, compute_threads=2, kl_refit_time_budget_seconds=20)
        await registry.create("learned", LEARNABLE)
        await registry.upload("learned", learnable_table())
        refit = asyncio.create_task(registry.refit("learned", "kl", learnable_queries()))
        await asyncio.get_running_loop().run_in_executor(None, fit_started.wait, 30)
        updated = await registry.update("learned", [5, 240], rows)
        update_done.set()
        version = await refit
        snapshot = await registry.snapshot("learned")
        await registry.close()
        return updated, version, snapshot

    updated, version, snapshot = run(scenario())

    assert updated == 2
    assert version == 3
    index = snapshot.index
    assert index.codebook_fit == "kl"
    assert index.num_classes == 241
    np.testing.assert_allclose(index.embeddings[[5, 240]].numpy(), rows)
    # The replayed rows are coded with the learned codebooks, not the ones they were updated with.
    np.testing.assert_array_equal(index.codes[[5, 240]].numpy(), index.codebooks.encode(index.embeddings[[5, 240]]))


def test_refit_requests_join_or_queue() -> None:
    async def scenario() -> tuple[list[int], list[int], Any]:
        registry = IndexRegistry(refit_error_ratio=0.0)
        await registry.create("words", CONFIG)
        await registry.upload("words", _table())
        # Two k-means requests at once share one refit.
        joined = await asyncio.gather(registry.refit("words"), registry.refit("words"))
        # A kl request with its own queries waits for the running k-means refit, then runs.
        queued = await asyncio.gather(
            registry.refit("words"), registry.refit("words", "kl", np.zeros((16, DIM), np.float32))
        )
        state = registry.state("words")
        await registry.close()
        return list(joined), list(queued), state

    joined, queued, state = run(scenario())

    assert joined == [2, 2]
    assert queued == [3, 3]
    assert state.version == 3
    assert state.last_refit.mode == "kl"
    assert not state.last_refit.accepted
