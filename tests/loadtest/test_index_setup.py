"""Tests of the load test's index set-up against a real server on loopback."""

from __future__ import annotations

import numpy as np
import pytest
from workload import WorkloadSettings, ensure_index, load_table

from midx_client import RestSamplerClient, SamplerClient


@pytest.fixture
def settings() -> WorkloadSettings:
    return WorkloadSettings(index_name="setup-test", table="random", rows=600, dim=8, num_codewords=8, update_rows=10)


def test_ensure_index_creates_and_uploads_once(server, settings):
    table = load_table(settings)

    with RestSamplerClient(server.http_url, retries=0) as client:
        first = ensure_index(client, settings, table, ready_timeout_seconds=30)
        second = ensure_index(client, settings, table, ready_timeout_seconds=30)
        info = client.get_index(settings.index_name)

    assert first == second == info.version
    assert (info.num_classes, info.dim, info.num_codewords, info.status) == (600, 8, 8, "ready")


def test_ensure_index_works_over_grpc(server, settings):
    table = load_table(settings)

    with SamplerClient(server.grpc_target, retries=0) as client:
        version = ensure_index(client, settings, table, ready_timeout_seconds=30)
        result = client.sample(settings.index_name, table[:3], 5)

    assert result.version == version
    assert result.ids.shape == (3, 5)


def test_ensure_index_rejects_index_of_other_dim(server, settings):
    with RestSamplerClient(server.http_url, retries=0) as client:
        client.create_index(settings.index_name, 4, num_codewords=8)

        with pytest.raises(RuntimeError, match="has dim 4 but the load test's table has 8"):
            ensure_index(client, settings, load_table(settings), ready_timeout_seconds=30)


def test_ensure_index_rejects_table_of_other_size(server, settings):
    table = load_table(settings)
    with RestSamplerClient(server.http_url, retries=0) as client:
        client.create_index(settings.index_name, 8, num_codewords=8)
        client.upload_embeddings(settings.index_name, np.ascontiguousarray(table[:300]))

        with pytest.raises(RuntimeError, match="has 300 classes but the load test's table has 600"):
            ensure_index(client, settings, table, ready_timeout_seconds=30)
