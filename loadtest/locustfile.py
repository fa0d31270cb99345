"""Locust scenarios for the sampling service: simulated trainers over REST and over gRPC.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \
        --users 4 --spawn-rate 4 --run-time 60s

The REST user sends JSON to --host; the gRPC user calls MIDX_GRPC_ADDRESS (default 127.0.0.1:50051)
through the project's `SamplerClient`. Both do what a trainer does, in the same proportions: mostly
sample calls (B = 256 queries, M = 100 negatives, with positives), some row updates (1,000 rows),
a few log-prob calls. Every response is checked (shapes, id range, finite log Q, versions that never
go backwards), and a response that fails a check counts as a failed request. On test start the index is created and the
table uploaded when the server lacks them. workload.py lists the settings (MIDX_LOADTEST_*); set
MIDX_LOADTEST_TABLE=random to use a random table of the GloVe table's shape.

`python loadtest/locustfile.py --host http://127.0.0.1:8000 [GrpcTrainer]` runs a single REST (or
gRPC) user in this process until interrupted, printing every call, for debugging.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

import gevent
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import HttpUser, User, constant, events, task
from locust.env import Environment
from locust.runners import WorkerRunner
from workload import (
    RequestFactory,
    ResponseCheckError,
    VersionTracker,
    WorkloadSettings,
    check_log_prob,
    check_sample,
    ensure_index,
    load_table,
)

from midx_client import RestSamplerClient, SamplerClient, SamplerError

# grpcio blocks in C by default, which would stall every greenlet of this process during a call.
grpc_gevent.init_gevent()

logger = logging.getLogger(__name__)

# Relative task weights: per training step a trainer samples negatives, pushes its updated output rows
# every few steps, and scores a held-out batch now and then.
SAMPLE_WEIGHT = 8
UPDATE_WEIGHT = 2
LOG_PROB_WEIGHT = 1

SETUP_TIMEOUT_SECONDS = 600.0

_settings: WorkloadSettings | None = None
_table: np.ndarray | None = None
_user_numbers = itertools.count()


def workload() -> tuple[WorkloadSettings, np.ndarray]:
    """Return the settings and the class table, read once per locust process."""
    global _settings, _table
    if _settings is None or _table is None:
        _settings = WorkloadSettings.from_environ()
        _table = load_table(_settings)
    return _settings, _table


@events.test_start.add_listener
def create_index_when_missing(environment: Environment, **_kwargs: Any) -> None:
    """Create and upload the index before the users start; a failure stops the run with exit code 1.

    Runs on the master or the single local process only: workers share the master's index.
    """
    if isinstance(environment.runner, WorkerRunner):
        return
    settings, table = workload()
    if not environment.host:
        _abort(environment, "no --host given; pass the REST front end's URL, e.g. --host http://127.0.0.1:8000")
        return
    try:
        with RestSamplerClient(
            environment.host, token=settings.api_token, timeout_seconds=SETUP_TIMEOUT_SECONDS, retries=0
        ) as client:
            version = ensure_index(client, settings, table, ready_timeout_seconds=SETUP_TIMEOUT_SECONDS)
    except (SamplerError, RuntimeError, OSError) as error:
        _abort(environment, f"setting up index {settings.index_name!r} failed: {error}")
        return
    logger.info("index %r is ready at version %d", settings.index_name, version)


def _abort(environment: Environment, message: str) -> None:
    logger.error("%s", message)
    environment.process_exit_code = 1
    if environment.runner is not None:
        # The runner is still starting while test_start runs, so it is stopped from another greenlet.
        gevent.spawn(environment.runner.quit)


class RestTrainer(HttpUser):
    """A trainer that calls the REST front end with JSON bodies, back to back."""

    wait_time = constant(0)
    weight = 1

    def on_start(self) -> None:
        self.settings, table = workload()
        self.request_factory = RequestFactory(self.settings, table, seed=self.settings.seed + 1 + next(_user_numbers))
        self.versions = VersionTracker()
        self.num_classes = table.shape[0]
        self.route = f"/v1/indexes/{self.settings.index_name}"
        self.headers = {"Content-Type": "application/json"}
        if self.settings.api_token:
            self.headers["Authorization"] = f"Bearer {self.settings.api_token}"

    def _post(self, method: str, suffix: str, body: dict[str, Any], check: Callable[[dict[str, Any]], None]) -> None:
        name = f"/v1/indexes/[name]{suffix}"
        with self.client.request(
            method,
            self.route + suffix,
            data=json.dumps(body),
            headers=self.headers,
            name=name,
            timeout=self.settings.timeout_seconds,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:500]}")
                return
            try:
                check(response.json())
            except (ResponseCheckError, ValueError, KeyError, TypeError) as error:
                response.failure(f"{type(error).__name__}: {error}")

    @task(SAMPLE_WEIGHT)
    def sample(self) -> None:
        queries, positives = self.request_factory.sample_batch()
        body = {
            "queries": queries.tolist(),
            "num_samples": self.settings.num_samples,
            "positives": positives.tolist(),
        }

        def check(response: dict[str, Any]) -> None:
            check_sample(
                response["ids"],
                response["log_q"],
                response.get("positive_log_q"),
                batch_size=self.settings.batch_size,
                num_samples=self.settings.num_samples,
                num_positives=1,
                num_classes=self.num_classes,
            )
            self.versions.observe(response["version"], "sample")

        self._post("POST", "/sample", body, check)

    @task(UPDATE_WEIGHT)
    def update_rows(self) -> None:
        ids, embeddings = self.request_factory.row_update()
        body = {"ids": ids.tolist(), "embeddings": embeddings.tolist()}
        self._post("PATCH", "/embeddings", body, lambda response: self.versions.observe(response["version"], "update"))

    @task(LOG_PROB_WEIGHT)
    def log_prob(self) -> None:
        queries, ids = self.request_factory.log_prob_batch()
        body = {"queries": queries.tolist(), "ids": ids.tolist()}

        def check(response: dict[str, Any]) -> None:
            check_log_prob(response["log_q"], batch_size=self.settings.batch_size, num_ids=self.settings.log_prob_ids)
            self.versions.observe(response["version"], "log-prob")

        self._post("POST", "/log-prob", body, check)


class GrpcTrainer(User):
    """A trainer that calls the gRPC front end through `SamplerClient`, back to back.

    Locust times only HTTP users by itself, so each call here is timed and reported as a request
    event of type "grpc", named after the RPC. Retries are off so that every failed call counts.
    """

    wait_time = constant(0)
    weight = 1
    request_type: ClassVar[str] = "grpc"

    def on_start(self) -> None:
        self.settings, table = workload()
        self.request_factory = RequestFactory(self.settings, table, seed=self.settings.seed + 1 + next(_user_numbers))
        self.versions = VersionTracker()
        self.num_classes = table.shape[0]
        self.sampler = SamplerClient(
            self.settings.grpc_address,
            token=self.settings.api_token,
            timeout_seconds=self.settings.timeout_seconds,
            retries=0,
        )

    def on_stop(self) -> None:
        self.sampler.close()

    def _call(self, name: str, call: Callable[[], Any], check: Callable[[Any], int]) -> None:
        started = time.perf_counter()
        error: Exception | None = None
        response_length = 0
        try:
            result = call()
        except SamplerError as failure:
            error = failure
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        if error is None:
            try:
                response_length = check(result)
            except ResponseCheckError as failure:
                error = failure
        self.environment.events.request.fire(
            request_type=self.request_type,
            name=name,
            response_time=elapsed_ms,
            response_length=response_length,
            exception=error,
            context={},
        )

    @task(SAMPLE_WEIGHT)
    def sample(self) -> None:
        queries, positives = self.request_factory.sample_batch()

        def check(result: Any) -> int:
            check_sample(
                result.ids,
                result.log_q,
                result.positive_log_q,
                batch_size=self.settings.batch_size,
                num_samples=self.settings.num_samples,
                num_positives=1,
                num_classes=self.num_classes,
            )
            self.versions.observe(result.version, "Sample")
            return int(result.ids.nbytes + result.log_q.nbytes + result.positive_log_q.nbytes)

        self._call(
            "Sample",
            lambda: self.sampler.sample(
                self.settings.index_name, queries, self.settings.num_samples, positives=positives
            ),
            check,
        )

    @task(UPDATE_WEIGHT)
    def update_rows(self) -> None:
        ids, embeddings = self.request_factory.row_update()

        def check(version: Any) -> int:
            self.versions.observe(version, "UpdateEmbeddings")
            return 0  # the response is one integer; locust needs no size for it

        self._call(
            "UpdateEmbeddings",
            lambda: self.sampler.update_embeddings(self.settings.index_name, ids, embeddings),
            check,
        )

    @task(LOG_PROB_WEIGHT)
    def log_prob(self) -> None:
        queries, ids = self.request_factory.log_prob_batch()

        def check(result: Any) -> int:
            check_log_prob(result.log_q, batch_size=self.settings.batch_size, num_ids=self.settings.log_prob_ids)
            self.versions.observe(result.version, "LogProb")
            return int(result.log_q.nbytes)

        self._call("LogProb", lambda: self.sampler.log_prob(self.settings.index_name, queries, ids), check)


if __name__ == "__main__":
    from locust import run_single_user
    from locust.argument_parser import get_parser

    # `python loadtest/locustfile.py --host URL [GrpcTrainer]` takes locust's own options.
    chosen = get_parser().parse_args().user_classes or ["RestTrainer"]
    run_single_user(GrpcTrainer if chosen == ["GrpcTrainer"] else RestTrainer, loglevel="INFO")
