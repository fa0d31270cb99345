"""The local-directory store: round trips, crashes between and during writes, damaged files."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from midx_client import SamplerClient
from midx_service.core import IndexConfig, MidxIndex
from midx_service.errors import UnavailableError
from midx_service.persistence.codec import CorruptDataError
from midx_service.persistence.local_store import LocalStore
from midx_service.registry import IndexRegistry, RestoredIndex
from midx_service.settings import load_settings
from tests.conftest import RunningServer

DIM = 6
CONFIG = IndexConfig(DIM, num_codewords=4, last_stage="popularity")


def _table(seed: int, rows: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)


def _weights(seed: int, rows: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).random(rows) + 0.1


async def _open(directory: Path) -> IndexRegistry:
    registry = IndexRegistry(store=LocalStore(directory, chunk_bytes=4096, snapshot_interval_seconds=0.0))
    await registry.restore()
    return registry


def _load(directory: Path) -> dict[str, RestoredIndex]:
    async def load() -> dict[str, RestoredIndex]:
        store = LocalStore(directory, chunk_bytes=4096)
        try:
            return {restored.name: restored for restored in await store.load()}
        finally:
            await store.close()

    return asyncio.run(load())


def _assert_state_matches(state: dict[str, Any] | None, index: MidxIndex) -> None:
    assert state is not None
    expected = index.state_dict()
    for name in ("embeddings", "codes", "codebook_first", "codebook_second"):
        assert torch.equal(state[name], expected[name]), name
    if expected["weights"] is None:
        assert state["weights"] is None
    else:
        assert torch.equal(state["weights"], expected["weights"])


def test_every_mutation_kind_round_trips(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        registry = await _open(tmp_path)
        await registry.create("words", CONFIG)
        await registry.create("items", IndexConfig(DIM, num_codewords=4, metric="cosine"))
        await registry.create("gone", IndexConfig(DIM, num_codewords=4))
        await registry.create("empty", IndexConfig(DIM, num_codewords=4))
        await registry.upload("words", _table(0), _weights(0))
        await registry.upload("items", _table(1))
        await registry.upload("gone", _table(2))
        await registry.update("words", [3, 120], _table(3, 2), _weights(3, 2))
        await registry.update("items", [5], _table(4, 1))
        await registry.refit("words")
        await registry.update("words", [7], _table(5, 1), _weights(5, 1))
        await registry.delete("gone")
        final = {name: await registry.snapshot(name) for name in ("words", "items")}
        await registry.close()
        return final

    final = asyncio.run(scenario())
    restored = _load(tmp_path)

    assert sorted(restored) == ["empty", "items", "words"]
    assert restored["empty"].version == 0
    assert restored["empty"].state is None
    for name, snapshot in final.items():
        assert restored[name].version == snapshot.version
        _assert_state_matches(restored[name].state, snapshot.index)
    assert restored["words"].version == 4
    assert restored["items"].config.metric == "cosine"


_CRASHING_WRITER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import numpy as np
    from midx_service.core import IndexConfig
    from midx_service.persistence.local_store import LocalStore
    from midx_service.registry import IndexRegistry

    directory = sys.argv[1]

    async def main():
        store = LocalStore(directory, chunk_bytes=4096, snapshot_interval_seconds=0.0)
        registry = IndexRegistry(store=store, refit_error_ratio=0.0)
        await registry.restore()
        rng = np.random.default_rng(0)
        await registry.create("words", IndexConfig(6, num_codewords=4))
        await registry.upload("words", rng.standard_normal((120, 6)).astype(np.float32))
        for step in range(6):
            await registry.update("words", [step, 100 + step], rng.standard_normal((2, 6)).astype(np.float32))
            if step == 2:
                await store.checkpoint("words")
        snapshot = await registry.snapshot("words")
        np.save(os.path.join(directory, "..", "expected.npy"), snapshot.index.embeddings.numpy())
        print(json.dumps({"version": snapshot.version}), flush=True)
        os._exit(0)  # a crash: no final snapshot, no close

    asyncio.run(main())
    """
)


@pytest.fixture(scope="module")
def crashed_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, np.ndarray]:
    """A data directory whose server process exited without closing it, written once per module."""
    root = tmp_path_factory.mktemp("crashed")
    directory = root / "data"
    output = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(directory)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    version = json.loads(output.stdout.strip().splitlines()[-1])["version"]
    return directory, version, np.load(root / "expected.npy")


@pytest.fixture
def crashed_directory(crashed_template: tuple[Path, int, np.ndarray], tmp_path: Path) -> tuple[Path, int, np.ndarray]:
    """A copy of the crashed data directory: snapshot at version 4, log up to version 7."""
    template, version, expected = crashed_template
    directory = tmp_path / "data"
    shutil.copytree(template, directory)
    return directory, version, expected


def test_crash_loses_nothing(crashed_directory: tuple[Path, int, np.ndarray]) -> None:
    directory, version, expected = crashed_directory
    current = json.loads((directory / "indexes" / "words" / "CURRENT").read_text())

    restored = _load(directory)["words"]

    assert current["version"] == 4
    assert version == 7
    assert restored.version == 7
    assert restored.state is not None
    np.testing.assert_array_equal(restored.state["embeddings"].numpy(), expected)


def test_torn_record_is_cut_off(crashed_directory: tuple[Path, int, np.ndarray]) -> None:
    directory, version, expected = crashed_directory
    segment = sorted((directory / "indexes" / "words").glob("log-*.bin"))[-1]
    intact_size = segment.stat().st_size
    with open(segment, "ab") as log:
        log.write(b"MXR1\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00half a record")

    restored = _load(directory)["words"]

    assert restored.version == version
    assert restored.state is not None
    np.testing.assert_array_equal(restored.state["embeddings"].numpy(), expected)
    assert segment.stat().st_size == intact_size

    async def append_and_reopen() -> int:
        registry = await _open(directory)
        await registry.update("words", [0], _table(9, 1))
        await registry.close()
        reopened = await _open(directory)
        reached = (await reopened.snapshot("words")).version
        await reopened.close()
        return reached

    assert asyncio.run(append_and_reopen()) == version + 1


def test_half_written_snapshot_is_ignored(crashed_directory: tuple[Path, int, np.ndarray]) -> None:
    directory, version, expected = crashed_directory
    index_directory = directory / "indexes" / "words"
    # A snapshot renamed into place but never made current, and one still in the work area.
    orphan = index_directory / "snapshot-9-abcdef"
    orphan.mkdir()
    (orphan / "chunk-000000.bin").write_bytes(b"\x00" * 100)
    (directory / "tmp" / "snapshot-123456").mkdir(parents=True, exist_ok=True)

    restored = _load(directory)["words"]

    assert restored.version == version
    assert restored.state is not None
    np.testing.assert_array_equal(restored.state["embeddings"].numpy(), expected)
    assert not orphan.exists()
    assert list((directory / "tmp").iterdir()) == []


def test_damaged_snapshot_chunk_is_reported(crashed_directory: tuple[Path, int, np.ndarray]) -> None:
    directory, _, _ = crashed_directory
    index_directory = directory / "indexes" / "words"
    current = json.loads((index_directory / "CURRENT").read_text())
    chunk = index_directory / current["snapshot"] / "chunk-000000.bin"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))

    with pytest.raises(CorruptDataError, match=r"chunk 0 \(embeddings\) of the snapshot does not match"):
        _load(directory)


def test_damaged_record_before_end_reported(crashed_directory: tuple[Path, int, np.ndarray]) -> None:
    directory, _, _ = crashed_directory
    index_directory = directory / "indexes" / "words"
    segment = sorted(index_directory.glob("log-*.bin"))[-1]
    data = bytearray(segment.read_bytes())
    data[20] ^= 0xFF
    segment.write_bytes(bytes(data))
    # A later, valid segment means the damaged record was not the last write before a crash.
    later = index_directory / "log-00000000000000000099.bin"
    later.write_bytes(b"")

    with pytest.raises(CorruptDataError, match="has an invalid record at byte 0"):
        _load(directory)


def test_directory_in_use_is_rejected(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = LocalStore(tmp_path)
        second = LocalStore(tmp_path)
        await first.load()
        try:
            with pytest.raises(UnavailableError, match="is in use by another server"):
                await second.load()
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())


def test_server_restores_from_data_dir(tmp_path: Path) -> None:
    settings = load_settings(
        host="127.0.0.1",
        http_port=0,
        grpc_port=0,
        device="cpu",
        compute_threads=2,
        shutdown_grace_seconds=1.0,
        data_dir=tmp_path,
        snapshot_chunk_bytes=4096,
    )
    queries = _table(7, 3)
    first = RunningServer(settings).start()
    try:
        with SamplerClient(first.grpc_target) as client:
            client.create_index("words", DIM, num_codewords=4)
            client.upload_embeddings("words", _table(0))
            version = client.update_embeddings("words", [2, 3], _table(1, 2))
            before = client.log_prob("words", queries, np.tile(np.arange(120), (3, 1)))
    finally:
        first.stop()

    second = RunningServer(settings).start()
    try:
        with SamplerClient(second.grpc_target) as client:
            info = client.get_index("words")
            after = client.log_prob("words", queries, np.tile(np.arange(120), (3, 1)))
    finally:
        second.stop()

    assert info.version == version == 2
    assert after.version == 2
    np.testing.assert_array_equal(after.log_q, before.log_q)
    assert os.path.isdir(tmp_path / "indexes" / "words")
