"""The registry of named indexes: versions, immutable snapshot swaps, writers, background refits.

Every index has a config, a status ("empty", "building", "ready", "failed") and a version that grows by
one with every accepted mutation (table upload, row update, accepted codebook refit). Readers take the current
`Snapshot`, an immutable (version, MidxIndex) pair, so no response mixes two versions. A mutation builds the
next MidxIndex on the compute thread pool while holding the index's writer lock, records it in the
`MutationStore`, and only then swaps it in and acknowledges it.

Persistence hook: `MutationStore` is the seam for a durable layer (a local directory, Redis). The
registry calls `append(mutation)` after the next snapshot is built and BEFORE it is swapped in or
acknowledged, for every kind of mutation: "create", "upload", "update", "refit" and "delete". If
`append` raises, the mutation is rejected with UnavailableError and the index stays as it was. At
start-up `IndexRegistry.restore()` calls `load()` and installs each returned `RestoredIndex` (config,
version and, when the index has a table, a `MidxIndex.state_dict()`). It then calls
`start(registry)`, and `close()` calls the store's `close()`. The default `InMemoryStore` records
nothing and restores nothing. The front ends never see the store.

Replicas: several registries may share one store. The store orders their mutations: `append` raises
`StaleVersionError` when another replica recorded a mutation for that version first, and the registry
then waits until it has applied the newer versions (the store delivers them through
`apply_replicated`, `install_replicated` and `remove_replicated`) and builds the mutation again on
top of them. So every replica applies the same mutations in the same order. A store may also
serialise codebook refits across replicas through `refit_lock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch

from midx_service.core import IndexConfig, MidxIndex
from midx_service.core.learned import MIN_QUERIES, KlFitReport, fit_kl_codebooks
from midx_service.core.quantizer import Codebooks
from midx_service.core.telemetry import ProposalQuality
from midx_service.core.validation import as_float_matrix, as_weight_vector
from midx_service.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    MidxError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from midx_service.reports import REFIT_MODES, QualityMeasurement, RefitMode, RefitReport, RefitTrigger
from midx_service.reservoir import QueryReservoir

logger = logging.getLogger(__name__)

T = TypeVar("T")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

MutationKind = Literal["create", "upload", "update", "refit", "delete"]

# How many times a mutation is rebuilt on newer versions from other replicas before it is rejected.
_MAX_COMMIT_ATTEMPTS = 20
# How long a writer waits for this replica to apply the versions another replica recorded first.
_CATCH_UP_TIMEOUT_SECONDS = 30.0


class IndexStatus(str, enum.Enum):
    EMPTY = "empty"
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class Snapshot:
    """One immutable version of an index; `index` is None before the first table upload."""

    version: int
    index: MidxIndex | None


@dataclass(frozen=True)
class IndexState:
    """State of one index at one moment, as GET /v1/indexes/{name} returns it."""

    name: str
    config: IndexConfig
    status: IndexStatus
    version: int
    num_classes: int
    quantization_error: float
    fit_quantization_error: float
    device: str
    error: str
    build_seconds: float
    codebook_fit: str = "kmeans"
    quality: QualityMeasurement | None = None
    last_refit: RefitReport | None = None


@dataclass(frozen=True)
class Mutation:
    """One accepted change, handed to `MutationStore.append` before it is acknowledged.

    version: the version the index has once this mutation is applied. `index` is the new snapshot
    (None for "create" and "delete"); a store may save `index.state_dict()` instead of replaying the
    delta. For "update", ids (U,) int64, embeddings (U, D) float32 and weights (U,) float64 are the
    request's values on the CPU, before any normalisation, so replaying them with
    `MidxIndex.update_rows` repeats the writer's computation. For "upload" they are the new index's
    table and weights. config is set for "create".
    """

    kind: MutationKind
    name: str
    version: int
    config: IndexConfig | None = None
    ids: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    index: MidxIndex | None = None


@dataclass(frozen=True)
class _Prepared:
    """A mutation ready to record, the snapshot it produces and, when known, that snapshot's quantisation error."""

    mutation: Mutation
    snapshot: Snapshot
    quantization_error: float | None = None


@dataclass(frozen=True)
class _Behind:
    """The store has reached `version`, newer than this registry's version: apply it, then try again."""

    version: int


@dataclass(frozen=True)
class RestoredIndex:
    """An index as a store recovered it: `state` is a `MidxIndex.state_dict()`, or None when empty."""

    name: str
    config: IndexConfig
    version: int
    state: dict[str, Any] | None = None


class StaleVersionError(Exception):
    """Raised by `MutationStore.append` when another replica already recorded a mutation for that version.

    version: the newest version the store holds for the index; the registry applies up to it and retries.
    """

    def __init__(self, name: str, version: int) -> None:
        super().__init__(f"index {name!r} is at version {version} in the store")
        self.name = name
        self.version = version


class MutationStore(Protocol):
    """Durable record of mutations; see the module docstring for when each method is called."""

    async def load(self) -> list[RestoredIndex]: ...

    async def append(self, mutation: Mutation) -> None: ...

    async def start(self, registry: IndexRegistry) -> None:
        """Begin background work (following other replicas, periodic snapshots) once restored."""

    async def close(self) -> None:
        """Finish background work, write final snapshots and release connections."""

    def refit_lock(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the right to refit index `name`, waiting while another replica has it."""

    async def newest_version(self, name: str) -> int | None:
        """Return the newest version of index `name` the store holds, or None when it cannot tell."""

    def problem(self) -> str | None:
        """Describe why mutations are being rejected (e.g. the store is unreachable), or None."""


class InMemoryStore:
    """The default store: nothing is recorded, so indexes live only as long as the process."""

    async def load(self) -> list[RestoredIndex]:
        return []

    async def append(self, mutation: Mutation) -> None:
        return None

    async def start(self, registry: IndexRegistry) -> None:
        return None

    async def close(self) -> None:
        return None

    @contextlib.asynccontextmanager
    async def refit_lock(self, name: str) -> AsyncIterator[None]:
        yield

    async def newest_version(self, name: str) -> int | None:
        return None

    def problem(self) -> str | None:
        return None


@dataclass(frozen=True)
class _RefitRequest:
    """One refit to run: for mode "kl", the (R, D) float32 CPU queries it learns from."""

    mode: RefitMode
    trigger: RefitTrigger
    queries: torch.Tensor | None = None
    uploaded: bool = False


@dataclass(frozen=True)
class _KlBaseline:
    """The KL measured first on a set of codebooks, which the KL refit policy compares against."""

    codebooks: Codebooks
    kl: float


@dataclass(eq=False)
class _Entry:
    name: str
    config: IndexConfig
    current: Snapshot
    status: IndexStatus = IndexStatus.EMPTY
    error: str = ""
    build_seconds: float = 0.0
    deleted: bool = False
    # Incremented by every table upload, so a refit of a replaced table is dropped.
    table_generation: int = 0
    # Incremented by every refit applied here, whichever replica ran it.
    refit_count: int = 0
    # Ids changed by row updates while a refit runs; they are re-encoded with the new codebooks.
    refit_changes: list[torch.Tensor] | None = None
    refit_task: asyncio.Task[int] | None = None
    refit_mode: RefitMode = "kmeans"
    last_refit: RefitReport | None = None
    # Recent served queries, created on the first one recorded.
    reservoir: QueryReservoir | None = None
    quality: QualityMeasurement | None = None
    kl_baseline: _KlBaseline | None = None
    # Measuring the quantisation error walks the whole table, so row updates leave it to a background
    # task. The value lags the current version until that task catches up.
    quantization_error: float = 0.0
    error_task: asyncio.Task[None] | None = None
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class IndexRegistry:
    """Named indexes on one device, safe to use from one event loop.

    device: torch device of every index ("cpu", "cuda", "cuda:1"). compute_threads: size of the pool
    that runs builds, updates and sampling off the event loop. min_version_timeout_seconds: how long
    a request with min_version waits for that version. refit_error_ratio: a background refit starts
    when quantization_error exceeds this multiple of the error measured at the last fit (0 disables).
    reservoir_size: recent query rows kept per index for telemetry and KL refits (0 keeps none).
    auto_refit_mode: the mode of refits the policies start, "kmeans" or "kl" (a "kl" one falls back
    to k-means while the index has served fewer than 8 queries). kl_refit_time_budget_seconds and
    kl_refit_max_queries bound a KL refit's wall time and the queries it learns from.
    """

    def __init__(
        self,
        *,
        device: str = "cpu",
        store: MutationStore | None = None,
        compute_threads: int = 4,
        min_version_timeout_seconds: float = 10.0,
        refit_error_ratio: float = 1.5,
        seed: int = 0,
        reservoir_size: int = 4096,
        auto_refit_mode: RefitMode = "kmeans",
        kl_refit_time_budget_seconds: float = 120.0,
        kl_refit_max_queries: int = 1024,
    ) -> None:
        self.device = torch.device(device)
        self.store: MutationStore = store if store is not None else InMemoryStore()
        self.min_version_timeout_seconds = min_version_timeout_seconds
        self.refit_error_ratio = refit_error_ratio
        self.seed = seed
        self.reservoir_size = reservoir_size
        self.auto_refit_mode: RefitMode = auto_refit_mode
        self.kl_refit_time_budget_seconds = kl_refit_time_budget_seconds
        self.kl_refit_max_queries = kl_refit_max_queries
        self._fit_listeners: list[Callable[[str], None]] = []
        self._executor = ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix="midx-compute")
        self._entries: dict[str, _Entry] = {}
        # Notified when an index is added, so a min_version request can wait for a replica's create.
        self._added = asyncio.Condition()
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------------------ life cycle

    async def restore(self) -> None:
        """Install the indexes the store recovered, then start the store; call once before serving."""
        for restored in await self.store.load():
            snapshot = Snapshot(restored.version, None)
            error = 0.0
            if restored.state is not None:
                index = await self.compute(MidxIndex.from_state_dict, restored.state, self.device)
                snapshot = Snapshot(restored.version, index)
                error = await self.compute(_quantization_error, index)
            entry = _Entry(restored.name, restored.config, snapshot, quantization_error=error)
            entry.status = IndexStatus.READY if snapshot.index is not None else IndexStatus.EMPTY
            self._entries[restored.name] = entry
            logger.info("index %r restored at version %d", restored.name, restored.version)
        await self.store.start(self)

    async def close(self) -> None:
        """Cancel background refits, close the store and stop the compute pool.

        Running computations finish first; the store writes its final snapshots before the pool stops.
        """
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.store.close()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def compute(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `function` on the compute pool so the event loop stays responsive."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))

    # -------------------------------------------------------------------------------- queries

    def state(self, name: str) -> IndexState:
        return self._state(self._entry(name))

    def states(self) -> list[IndexState]:
        return [self._state(entry) for entry in sorted(self._entries.values(), key=lambda entry: entry.name)]

    def ready(self) -> bool:
        """True when every index can serve samples (and so when there is none); see `unready`."""
        return not self.unready()

    def unready(self) -> list[IndexState]:
        """Return the states of the indexes that cannot serve samples, sorted by name.

        An index serves from its current snapshot, so one that builds a new table or refits its
        codebooks while an earlier snapshot serves counts as ready. An empty index, one building its
        first table and one whose first build failed do not.
        """
        return [
            self._state(entry)
            for entry in sorted(self._entries.values(), key=lambda entry: entry.name)
            if entry.current.index is None or entry.status is IndexStatus.FAILED
        ]

    def persistence_problem(self) -> str | None:
        """Why mutations are being rejected by the store (e.g. Redis is unreachable), or None."""
        return self.store.problem()

    def names(self) -> list[str]:
        return sorted(self._entries)

    def current(self, name: str) -> Snapshot | None:
        """Return the current snapshot of index `name` whatever its status, or None when there is no such index."""
        entry = self._entries.get(name)
        return None if entry is None else entry.current

    async def snapshot(self, name: str, min_version: int | None = None) -> Snapshot:
        """Return the current snapshot of a ready index, first waiting for `min_version` if given.

        With min_version, an index that does not exist yet is waited for too (another replica may
        have created it a moment ago). Raises NotFoundError, FailedPreconditionError (no table yet,
        a failed build, or min_version not reached within min_version_timeout_seconds) or
        UnavailableError (first build running).
        """
        if min_version is not None and name not in self._entries:
            await self._wait_for_index(name)
        entry = self._entry(name)
        if min_version is not None and entry.current.version < min_version:
            await self._wait_for_version(entry, min_version)
        if entry.deleted:
            raise NotFoundError(f"index {name!r} was deleted")
        snapshot = entry.current
        if snapshot.index is None:
            raise _no_table_error(entry)
        return snapshot

    async def _wait_for_index(self, name: str) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            async with self._added:
                await asyncio.wait_for(
                    self._added.wait_for(lambda: name in self._entries), self.min_version_timeout_seconds
                )

    async def _add_entry(self, entry: _Entry) -> None:
        self._entries[entry.name] = entry
        async with self._added:
            self._added.notify_all()

    # ------------------------------------------------------------------- served queries, quality

    def record_queries(self, name: str, queries: Any) -> None:
        """Keep the rows of a served (B, D) query batch in the index's reservoir of recent queries.

        Call it only with queries the index accepted. Rows of another shape and unknown indexes are
        ignored, so recording never fails a request that already succeeded.
        """
        entry = self._entries.get(name)
        if entry is None or self.reservoir_size == 0:
            return
        rows = np.asarray(queries)
        if rows.ndim != 2 or rows.shape[1] != entry.config.dim or rows.shape[0] == 0:
            return
        if entry.reservoir is None:
            entry.reservoir = QueryReservoir(self.reservoir_size, entry.config.dim)
        entry.reservoir.add(rows)

    def recent_queries(self, name: str, max_rows: int | None = None) -> np.ndarray:
        """Return a copy of the index's most recent served queries, (R, D) float32 with R <= max_rows."""
        entry = self._entry(name)
        if entry.reservoir is None:
            return np.zeros((0, entry.config.dim), dtype=np.float32)
        return entry.reservoir.recent(max_rows)

    def queries_recorded(self, name: str) -> int:
        """Return how many query rows the index has recorded since it was created."""
        reservoir = self._entry(name).reservoir
        return 0 if reservoir is None else reservoir.total_rows

    def record_quality(
        self,
        name: str,
        snapshot: Snapshot,
        quality: ProposalQuality,
        measured_at: float,
        *,
        sets_baseline: bool = True,
    ) -> QualityMeasurement | None:
        """Cache `quality`, measured on `snapshot` with the queries held at Unix time `measured_at`.

        The first KL measured on a set of codebooks becomes `kl_at_fit`, the reference of the KL refit
        policy, when `sets_baseline` is true (the caller passes false for a sample too small to
        compare with). Returns the cached measurement, or None, caching nothing, when the index is
        gone, `snapshot` has no table, or a measurement that started later was cached already.
        """
        entry = self._entries.get(name)
        measured = snapshot.index
        if entry is None or entry.deleted or measured is None:
            return None
        cached = entry.quality
        if cached is not None and (cached.version, cached.measured_at) > (snapshot.version, measured_at):
            return None

        current = entry.current.index
        baseline = entry.kl_baseline
        fit_is_current = current is not None and current.codebooks is measured.codebooks
        baseline_is_stale = baseline is None or baseline.codebooks is not measured.codebooks
        if fit_is_current and baseline_is_stale and sets_baseline and quality.kl is not None:
            baseline = entry.kl_baseline = _KlBaseline(measured.codebooks, quality.kl)
        kl_at_fit = None
        if baseline is not None and baseline.codebooks is measured.codebooks:
            kl_at_fit = baseline.kl

        measurement = QualityMeasurement(snapshot.version, measured_at, quality, kl_at_fit)
        entry.quality = measurement
        return measurement

    def add_fit_listener(self, listener: Callable[[str], None]) -> None:
        """Call `listener(name)` on the event loop after every table build and every finished refit."""
        self._fit_listeners.append(listener)

    def _notify_fit(self, entry: _Entry) -> None:
        for listener in self._fit_listeners:
            try:
                listener(entry.name)
            except Exception:
                logger.exception("a fit listener failed for index %r", entry.name)

    async def _wait_for_version(self, entry: _Entry, min_version: int) -> None:
        timeout = self.min_version_timeout_seconds
        try:
            async with entry.changed:
                await asyncio.wait_for(
                    entry.changed.wait_for(lambda: entry.deleted or entry.current.version >= min_version),
                    timeout,
                )
        except asyncio.TimeoutError:
            raise FailedPreconditionError(
                f"index {entry.name!r} is at version {entry.current.version}, the request needs "
                f"min_version {min_version}; waited {timeout:g} s. Send the mutation that creates that "
                "version first, or lower min_version"
            ) from None

    # ------------------------------------------------------------------------------ mutations

    async def create(self, name: str, config: IndexConfig) -> IndexState:
        _check_name(name)
        if name in self._entries:
            raise AlreadyExistsError(f"index {name!r} exists already; delete it first or pick another name")
        entry = _Entry(name, config, Snapshot(0, None))
        await self._record(Mutation("create", name, 0, config=config))
        if name in self._entries:  # created by a concurrent request while the store was writing
            raise AlreadyExistsError(f"index {name!r} exists already; delete it first or pick another name")
        await self._add_entry(entry)
        logger.info("index %r created: %s", name, config.to_dict())
        return self._state(entry)

    async def delete(self, name: str) -> None:
        entry = self._entry(name)
        if entry.refit_task is not None:
            entry.refit_task.cancel()
        async with entry.write_lock:
            if entry.deleted:
                raise NotFoundError(f"index {name!r} was deleted")
            await self._record(Mutation("delete", name, entry.current.version))
            entry.deleted = True
            del self._entries[name]
        async with entry.changed:
            entry.changed.notify_all()
        logger.info("index %r deleted", name)

    async def upload(self, name: str, embeddings: Any, weights: Any | None = None) -> int:
        """Build the index from the whole (N, D) table and swap it in; return the new version."""
        entry = self._entry(name)
        started = time.perf_counter()
        built: list[tuple[MidxIndex, float]] = []
        previous_status: list[IndexStatus] = []

        async def prepare(current: Snapshot) -> _Prepared:
            # Built once, under the writer lock; a retry after another replica's write reuses it.
            if not built:
                previous_status.append(entry.status)
                entry.status = IndexStatus.BUILDING
                built.append(await self.compute(self._build, entry.config, embeddings, weights))
            index, error = built[0]
            version = current.version + 1
            mutation = Mutation(
                "upload", name, version, embeddings=index.embeddings, weights=index.weights, index=index
            )
            return _Prepared(mutation, Snapshot(version, index), error)

        try:
            snapshot = await self._commit(entry, prepare)
        except MidxError:
            if previous_status and entry.status is IndexStatus.BUILDING:
                entry.status = previous_status[0]
            raise
        except Exception as failure:
            logger.exception("building index %r failed", name)
            if entry.current.index is None:
                entry.status, entry.error = IndexStatus.FAILED, f"build failed: {failure}"
            elif previous_status:
                entry.status = previous_status[0]
            raise
        assert snapshot is not None and snapshot.index is not None
        entry.build_seconds = time.perf_counter() - started
        logger.info(
            "index %r version %d: table of %d classes uploaded", name, snapshot.version, snapshot.index.num_classes
        )
        self._notify_fit(entry)
        return snapshot.version

    async def update(self, name: str, ids: Any, embeddings: Any, weights: Any | None = None) -> int:
        """Replace or append rows, re-encoding only them; return the new version."""
        entry = self._entry(name)

        async def prepare(current: Snapshot) -> _Prepared:
            if current.index is None:
                raise _no_table_error(entry)
            index, request = await self.compute(_update_rows, current.index, ids, embeddings, weights)
            version = current.version + 1
            request_ids, request_rows, request_weights = request
            mutation = Mutation(
                "update", name, version, ids=request_ids, embeddings=request_rows, weights=request_weights, index=index
            )
            return _Prepared(mutation, Snapshot(version, index))

        snapshot = await self._commit(entry, prepare)
        assert snapshot is not None
        self._measure_error(entry)
        return snapshot.version

    async def refit(self, name: str, mode: str = "kmeans", queries: Any | None = None) -> int:
        """Refit the codebooks now; return the version that contains the result.

        mode "kmeans" refits by k-means warm-started from the current codebooks. Mode "kl" learns
        codebooks that lower KL(P || Q) on `queries` (R, D), or on the index's most recent served
        queries when None. It swaps them in only when they lower the KL on held-out queries, else
        the index and its version stay as they are. Either way `last_refit` records the outcome.
        A request joins a running refit of the same mode unless it brings its own queries. Else it
        waits for the running refit and then starts its own.

        Raises InvalidArgumentError (unknown mode, malformed queries or queries with mode "kmeans"),
        ResourceExhaustedError (more than kl_refit_max_queries queries) and FailedPreconditionError
        (no table yet, or fewer than 8 served queries for mode "kl"); none of them changes the index.
        """
        entry = self._entry(name)
        self._check_live(entry)
        if entry.current.index is None:
            raise _no_table_error(entry)
        request = self._refit_request(entry, mode, queries, "request")
        while True:
            running = entry.refit_task
            if running is None or running.done():
                return await asyncio.shield(self._start_refit(entry, request))
            if entry.refit_mode == request.mode and not request.uploaded:
                return await asyncio.shield(running)
            await asyncio.wait([running])
            self._check_live(entry)

    def start_automatic_refit(self, name: str, trigger: RefitTrigger) -> bool:
        """Start a background refit in auto_refit_mode unless one runs; return whether one started."""
        entry = self._entries.get(name)
        return entry is not None and self._start_automatic_refit(entry, trigger)

    def _start_automatic_refit(self, entry: _Entry, trigger: RefitTrigger) -> bool:
        running = entry.refit_task is not None and not entry.refit_task.done()
        if entry.deleted or entry.current.index is None or running:
            return False
        try:
            request = self._refit_request(entry, self.auto_refit_mode, None, trigger)
        except FailedPreconditionError as error:
            logger.info("index %r: %s; refitting with k-means instead", entry.name, error)
            request = _RefitRequest("kmeans", trigger)
        self._start_refit(entry, request)
        return True

    def _refit_request(self, entry: _Entry, mode: str, queries: Any | None, trigger: RefitTrigger) -> _RefitRequest:
        """Check a refit's mode and queries and take the queries a KL refit learns from."""
        if mode not in REFIT_MODES:
            raise InvalidArgumentError(f"mode must be 'kmeans' or 'kl', got {mode!r}")
        if mode == "kmeans":
            if queries is not None:
                raise InvalidArgumentError("queries are used only by mode 'kl'; drop them or set mode to 'kl'")
            return _RefitRequest("kmeans", trigger)

        if queries is None:
            matrix = torch.from_numpy(self.recent_queries(entry.name, self.kl_refit_max_queries))
            if matrix.shape[0] < MIN_QUERIES:
                raise FailedPreconditionError(
                    f"index {entry.name!r} has {matrix.shape[0]} recent queries, a 'kl' refit needs at least "
                    f"{MIN_QUERIES}; serve more sample or log-prob requests, or send queries with the rebuild"
                )
            return _RefitRequest("kl", trigger, matrix)

        matrix = as_float_matrix(queries, "queries", entry.config.dim, torch.device("cpu"))
        limit = self.kl_refit_max_queries
        if matrix.shape[0] > limit:
            raise ResourceExhaustedError(
                f"queries has {matrix.shape[0]} rows, above the limit of {limit} (MIDX_KL_REFIT_MAX_QUERIES); "
                "send fewer queries"
            )
        if matrix.shape[0] < MIN_QUERIES:
            raise InvalidArgumentError(
                f"queries has {matrix.shape[0]} rows, a 'kl' refit needs at least {MIN_QUERIES}; send more queries"
            )
        return _RefitRequest("kl", trigger, matrix, uploaded=True)

    def _measure_error(self, entry: _Entry) -> None:
        """Start measuring the quantisation error in the background, unless a measurement runs."""
        if entry.error_task is None or entry.error_task.done():
            task = asyncio.create_task(self._run_error_measurement(entry), name=f"error-{entry.name}")
            entry.error_task = task
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _run_error_measurement(self, entry: _Entry) -> None:
        # Measures the latest snapshot until no update arrived meanwhile, so bursts of updates cost
        # one measurement each time the previous one finishes, not one per update.
        while not entry.deleted:
            snapshot = entry.current
            if snapshot.index is None:
                return
            error = await self.compute(_quantization_error, snapshot.index)
            if entry.current.index is None or entry.current.index.codebooks is not snapshot.index.codebooks:
                return  # a new table or a refit measured its own error
            entry.quantization_error = error
            self._maybe_refit(entry, snapshot.index.fit_quantization_error, error)
            if entry.current.version == snapshot.version:
                return

    def _maybe_refit(self, entry: _Entry, fitted: float, error: float) -> None:
        if self.refit_error_ratio <= 0 or entry.refit_task is not None:
            return
        if fitted > 0 and error > self.refit_error_ratio * fitted:
            logger.info(
                "index %r: quantisation error %.4f exceeds %g x %.4f at the last fit; refitting",
                entry.name,
                error,
                self.refit_error_ratio,
                fitted,
            )
            self._start_automatic_refit(entry, "quantization_error")

    def _start_refit(self, entry: _Entry, request: _RefitRequest) -> asyncio.Task[int]:
        if entry.refit_task is None or entry.refit_task.done():
            task = asyncio.create_task(self._run_refit(entry, request), name=f"refit-{entry.name}")
            entry.refit_task = task
            entry.refit_mode = request.mode
            self._background.add(task)
            task.add_done_callback(lambda done: self._refit_done(entry, done))
        return entry.refit_task

    def _refit_done(self, entry: _Entry, task: asyncio.Task[int]) -> None:
        self._background.discard(task)
        if entry.refit_task is task:
            entry.refit_task = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("refit of index %r failed: %s", entry.name, task.exception())

    async def _run_refit(self, entry: _Entry, request: _RefitRequest) -> int:
        refits_before = entry.refit_count
        async with self.store.refit_lock(entry.name):
            self._check_live(entry)
            if entry.refit_count != refits_before and not request.uploaded:
                # Another replica refitted while this one waited for the lock; its codebooks are here now.
                return entry.current.version
            base = entry.current
            if base.index is None:
                raise _no_table_error(entry)
            generation = entry.table_generation
            entry.refit_changes = []
            started = time.perf_counter()
            try:
                fit: KlFitReport | None = None
                if request.mode == "kl":
                    refitted, fit = await self.compute(
                        fit_kl_codebooks,
                        base.index,
                        request.queries,
                        time_budget_seconds=self.kl_refit_time_budget_seconds,
                        seed=self.seed,
                    )
                else:
                    refitted = await self.compute(base.index.refit, seed=self.seed)
                if fit is not None and not fit.accepted:
                    self._finish_refit(entry, request, fit, None, started)
                    logger.info(
                        "index %r: learned codebooks did not lower the held-out KL; the current ones stay", entry.name
                    )
                    return entry.current.version

                async def prepare(current: Snapshot) -> _Prepared | None:
                    if entry.table_generation != generation or current.index is None:
                        # A new table replaced the refitted one while the fit ran; its build fitted
                        # fresh codebooks, so this result is dropped.
                        return None
                    changes = entry.refit_changes
                    index, error = await self.compute(_replay_rows, refitted, current.index, changes)
                    version = current.version + 1
                    return _Prepared(
                        Mutation("refit", entry.name, version, index=index), Snapshot(version, index), error
                    )

                snapshot = await self._commit(entry, prepare)
            finally:
                entry.refit_changes = None
        if snapshot is None:
            return entry.current.version
        self._finish_refit(entry, request, fit, snapshot.version, started)
        logger.info("index %r version %d: codebooks refitted (%s)", entry.name, snapshot.version, request.mode)
        return snapshot.version

    def _finish_refit(
        self,
        entry: _Entry,
        request: _RefitRequest,
        fit: KlFitReport | None,
        version: int | None,
        started: float,
    ) -> None:
        """Record the refit's report and restart the KL policy's reference; `version` None: not accepted."""
        entry.last_refit = RefitReport(
            mode=request.mode,
            trigger=request.trigger,
            accepted=version is not None,
            version=entry.current.version if version is None else version,
            seconds=time.perf_counter() - started,
            heldout_kl_before=None if fit is None else fit.heldout_kl_before,
            heldout_kl_after=None if fit is None else fit.heldout_kl_after,
            num_queries=0 if fit is None else fit.num_train_queries + fit.num_heldout_queries,
            finished_at=time.time(),
        )
        # Also after a rejected KL refit: the KL measured next is the reference for these codebooks,
        # so the policy does not start the same futile refit again at once.
        entry.kl_baseline = None
        self._notify_fit(entry)

    # ---------------------------------------------------------------------------- replication

    async def apply_replicated(
        self,
        name: str,
        kind: MutationKind,
        version: int,
        build: Callable[[MidxIndex | None, int], MidxIndex],
        *,
        changed_ids: torch.Tensor | None = None,
    ) -> bool:
        """Apply a mutation the store recorded (from another replica, or one this replica could not confirm).

        `build(index, current_version)` runs on the compute pool under the writer lock and returns the
        index at `version`; it may raise to leave the index unchanged (e.g. when entries are missing).
        kind is the mutation's kind ("upload" for a whole new state); changed_ids lists the rows an
        "update" changed. Returns False, without calling `build`, when the index already has `version`.
        """
        entry = self._entry(name)
        async with entry.write_lock:
            self._check_live(entry)
            current = entry.current
            if current.version >= version:
                return False
            index = await self.compute(build, current.index, current.version)
            if kind != "update":
                entry.quantization_error = await self.compute(_quantization_error, index)
            self._note_mutation(entry, kind, changed_ids)
            entry.status, entry.error = IndexStatus.READY, ""
            await self._swap(entry, Snapshot(version, index))
        if kind == "update":
            self._measure_error(entry)
        else:
            self._notify_fit(entry)
        logger.debug("index %r version %d: %s applied from the store", name, version, kind)
        return True

    async def install_replicated(
        self, name: str, config: IndexConfig, version: int, index: MidxIndex | None = None
    ) -> None:
        """Create index `name`, or replace its whole state, as the store has it (whatever the version)."""
        _check_name(name)
        error = 0.0 if index is None else await self.compute(_quantization_error, index)
        snapshot = Snapshot(version, index)
        status = IndexStatus.EMPTY if index is None else IndexStatus.READY
        entry = self._entries.get(name)
        if entry is None:
            entry = _Entry(name, config, snapshot, status=status, quantization_error=error)
            await self._add_entry(entry)
            logger.info("index %r installed from the store at version %d", name, version)
        else:
            async with entry.write_lock:
                entry.config = config
                entry.table_generation += 1
                entry.status, entry.error = status, ""
                entry.quantization_error = error
                entry.kl_baseline = None
                await self._swap(entry, snapshot)
            logger.info("index %r replaced from the store at version %d", name, version)
        if index is not None:
            self._notify_fit(entry)

    async def remove_replicated(self, name: str) -> None:
        """Drop index `name` because the store deleted it; no-op when it is not here."""
        entry = self._entries.get(name)
        if entry is None:
            return
        if entry.refit_task is not None:
            entry.refit_task.cancel()
        async with entry.write_lock:
            entry.deleted = True
            if self._entries.get(name) is entry:
                del self._entries[name]
        async with entry.changed:
            entry.changed.notify_all()
        logger.info("index %r deleted through the store", name)

    async def wait_for_version(self, name: str, version: int, timeout_seconds: float) -> bool:
        """Wait until index `name` reaches `version`; False when it does not within the timeout or is gone."""
        entry = self._entries.get(name)
        if entry is None:
            return False
        try:
            async with entry.changed:
                await asyncio.wait_for(
                    entry.changed.wait_for(lambda: entry.deleted or entry.current.version >= version),
                    timeout_seconds,
                )
        except asyncio.TimeoutError:
            return False
        return not entry.deleted

    # -------------------------------------------------------------------------------- helpers

    def _build(self, config: IndexConfig, embeddings: Any, weights: Any | None) -> tuple[MidxIndex, float]:
        index = MidxIndex.build(config, embeddings, weights, device=self.device, seed=self.seed)
        return index, _quantization_error(index)

    async def _commit(
        self, entry: _Entry, prepare: Callable[[Snapshot], Awaitable[_Prepared | None]]
    ) -> Snapshot | None:
        """Record the mutation `prepare` builds on the current snapshot, then swap it in and return it.

        When the store holds versions this registry has not applied yet (another replica recorded
        them first), wait until they are applied and prepare again on top of them, so every replica
        applies mutations in the store's order. Returns None when `prepare` returns None.
        """
        for _ in range(_MAX_COMMIT_ATTEMPTS):
            async with entry.write_lock:
                self._check_live(entry)
                outcome = await self._commit_once(entry, prepare)
            if not isinstance(outcome, _Behind):
                return outcome
            logger.debug("index %r: the store is at version %d; catching up first", entry.name, outcome.version)
            if not await self.wait_for_version(entry.name, outcome.version, _CATCH_UP_TIMEOUT_SECONDS):
                self._check_live(entry)
                raise UnavailableError(
                    f"index {entry.name!r} is at version {outcome.version} in the store, and this replica did "
                    f"not apply it within {_CATCH_UP_TIMEOUT_SECONDS:g} s; the mutation was not applied, retry it"
                )
        raise UnavailableError(
            f"index {entry.name!r} changed through other replicas {_MAX_COMMIT_ATTEMPTS} times while this "
            "mutation was being recorded; it was not applied, retry it"
        )

    async def _commit_once(
        self, entry: _Entry, prepare: Callable[[Snapshot], Awaitable[_Prepared | None]]
    ) -> Snapshot | _Behind | None:
        """Make one attempt under the writer lock; return _Behind when the store holds newer versions."""
        try:
            prepared = await prepare(entry.current)
        except MidxError:
            # The request may be valid on versions another replica recorded but this one has not
            # applied yet (e.g. a table uploaded elsewhere a moment ago), so check before rejecting it.
            newest = await self.store.newest_version(entry.name)
            if newest is None or newest <= entry.current.version:
                raise
            return _Behind(newest)
        if prepared is None:
            return None
        try:
            await self._record(prepared.mutation)
        except StaleVersionError as stale:
            return _Behind(stale.version)
        self._note_mutation(entry, prepared.mutation.kind, prepared.mutation.ids)
        entry.status, entry.error = IndexStatus.READY, ""
        if prepared.quantization_error is not None:
            entry.quantization_error = prepared.quantization_error
        await self._swap(entry, prepared.snapshot)
        return prepared.snapshot

    @staticmethod
    def _note_mutation(entry: _Entry, kind: MutationKind, changed_ids: torch.Tensor | None) -> None:
        """Update the bookkeeping a running refit relies on; call under the writer lock, with the swap."""
        if kind == "upload":
            entry.table_generation += 1
            entry.kl_baseline = None
        elif kind == "refit":
            entry.refit_count += 1
            entry.kl_baseline = None
        elif kind == "update" and entry.refit_changes is not None and changed_ids is not None:
            entry.refit_changes.append(changed_ids)

    async def _record(self, mutation: Mutation) -> None:
        try:
            await self.store.append(mutation)
        except (MidxError, StaleVersionError):
            raise
        except Exception as error:
            logger.error("recording %s of index %r failed: %s", mutation.kind, mutation.name, error)
            raise UnavailableError(
                f"could not record the {mutation.kind} of index {mutation.name!r} ({error}); "
                "the index is unchanged, retry when persistence is back"
            ) from error

    async def _swap(self, entry: _Entry, snapshot: Snapshot) -> None:
        entry.current = snapshot
        async with entry.changed:
            entry.changed.notify_all()

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFoundError(
                f"index {name!r} not found; create it first (client.create_index, gRPC CreateIndex, "
                f"or REST PUT /v1/indexes/{name})"
            )
        return entry

    @staticmethod
    def _check_live(entry: _Entry) -> None:
        if entry.deleted:
            raise NotFoundError(f"index {entry.name!r} was deleted")

    def _state(self, entry: _Entry) -> IndexState:
        snapshot = entry.current
        index = snapshot.index
        return IndexState(
            name=entry.name,
            config=entry.config,
            status=entry.status,
            version=snapshot.version,
            num_classes=0 if index is None else index.num_classes,
            quantization_error=entry.quantization_error,
            fit_quantization_error=0.0 if index is None else index.fit_quantization_error,
            device=str(self.device),
            error=entry.error,
            build_seconds=entry.build_seconds,
            codebook_fit="kmeans" if index is None else index.codebook_fit,
            quality=entry.quality,
            last_refit=entry.last_refit,
        )


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidArgumentError(
            f"index name {name!r} is invalid; use 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _no_table_error(entry: _Entry) -> MidxError:
    if entry.status is IndexStatus.BUILDING:
        return UnavailableError(f"index {entry.name!r} is building its first table; retry when it is ready")
    if entry.status is IndexStatus.FAILED:
        return FailedPreconditionError(
            f"index {entry.name!r} has no table because its build failed ({entry.error}); upload the table again"
        )
    return FailedPreconditionError(
        f"index {entry.name!r} has no table yet; upload embeddings first (client.upload_embeddings, gRPC "
        f"UploadEmbeddings, or REST PUT /v1/indexes/{entry.name}/embeddings)"
    )


def _quantization_error(index: MidxIndex) -> float:
    # Reading it walks the whole table, so it runs on the compute pool, never on the event loop.
    return index.quantization_error


def _update_rows(
    index: MidxIndex, ids: Any, embeddings: Any, weights: Any | None
) -> tuple[MidxIndex, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Return the updated index and the request's (ids, rows, weights) on the CPU."""
    updated = index.update_rows(ids, embeddings, weights)
    cpu = torch.device("cpu")
    id_vector = torch.as_tensor(np.asarray(ids), dtype=torch.int64).reshape(-1)
    rows = as_float_matrix(embeddings, "embeddings", index.config.dim, cpu)
    weight_vector = None if weights is None else as_weight_vector(weights, "weights", rows.shape[0], cpu)
    return updated, (id_vector, rows, weight_vector)


def _replay_rows(
    refitted: MidxIndex, current: MidxIndex, changes: list[torch.Tensor] | None
) -> tuple[MidxIndex, float]:
    """Apply to `refitted` the rows that changed in `current` since the refit started."""
    if changes:
        ids = torch.unique(torch.cat(changes)).to(current.device)
        weights = None if current.weights is None else current.weights[ids]
        refitted = refitted.update_rows(ids, current.embeddings[ids], weights)
    return refitted, _quantization_error(refitted)
