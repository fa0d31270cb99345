"""Concurrent samplers and updaters never see a torn version: each response matches its version."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from midx_client import RestSamplerClient, SamplerClient
from midx_service.core import IndexConfig, MidxIndex

DIM = 8
NUM_CLASSES = 200
NUM_UPDATES = 25
ROWS_PER_UPDATE = 20


def test_answers_match_the_version_they_report(start_server: Any) -> None:
    running = start_server(refit_error_ratio=0.0, batch_window_ms=1.0)
    rng = np.random.default_rng(0)
    table = rng.standard_normal((NUM_CLASSES, DIM)).astype(np.float32)
    config = IndexConfig(DIM, num_codewords=8)
    with SamplerClient(running.grpc_target) as setup:
        setup.create_index("words", DIM, num_codewords=8)
        assert setup.upload_embeddings("words", table) == 1

    updates: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    answers: list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def update(seed: int) -> None:
        local = np.random.default_rng(seed)
        try:
            with SamplerClient(running.grpc_target) as client:
                for _ in range(NUM_UPDATES):
                    ids = local.choice(NUM_CLASSES, ROWS_PER_UPDATE, replace=False)
                    rows = (3 * local.standard_normal((ROWS_PER_UPDATE, DIM))).astype(np.float32)
                    updates[client.update_embeddings("words", ids, rows)] = (ids, rows)
        except BaseException as error:
            failures.append(error)

    def sample(client: Any, sampler: str, seed: int) -> None:
        local = np.random.default_rng(seed)
        try:
            with client:
                while not done.is_set():
                    queries = local.standard_normal((3, DIM)).astype(np.float32)
                    result = client.sample("words", queries, 6, sampler=sampler)
                    answers.append((sampler, result.version, queries, result.ids, result.log_q))
        except BaseException as error:
            failures.append(error)

    updaters = [threading.Thread(target=update, args=(seed,)) for seed in (1, 2)]
    samplers = [
        threading.Thread(target=sample, args=(SamplerClient(running.grpc_target), "exact", 3)),
        threading.Thread(target=sample, args=(RestSamplerClient(running.http_url), "exact", 4)),
        threading.Thread(target=sample, args=(SamplerClient(running.grpc_target), "midx", 5)),
        threading.Thread(target=sample, args=(RestSamplerClient(running.http_url), "midx", 6)),
    ]
    for thread in samplers + updaters:
        thread.start()
    for thread in updaters:
        thread.join(timeout=120)
    done.set()
    for thread in samplers:
        thread.join(timeout=120)

    assert failures == []
    assert sorted(updates) == list(range(2, 2 + 2 * NUM_UPDATES))
    tables = {1: table}
    references = {1: MidxIndex.build(config, table)}
    for version in sorted(updates):
        ids, rows = updates[version]
        tables[version] = tables[version - 1].copy()
        tables[version][ids] = rows
        references[version] = references[version - 1].update_rows(ids, rows)
    versions_seen = {version for _, version, *_ in answers}
    assert len(versions_seen) > 3, "the samplers should have observed several versions"
    for sampler, version, queries, ids, log_q in answers:
        if sampler == "exact":
            logits = torch.from_numpy(queries).double() @ torch.from_numpy(tables[version]).double().T
            expected = torch.log_softmax(logits, dim=1).gather(1, torch.from_numpy(ids)).numpy()
            np.testing.assert_allclose(log_q, expected, atol=1e-4, err_msg=f"exact sampler, version {version}")
        else:
            expected = references[version].log_prob(queries, ids).numpy()
            np.testing.assert_allclose(log_q, expected, atol=1e-4, err_msg=f"midx sampler, version {version}")
