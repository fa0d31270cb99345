"""Snapshot chunks and mutation entries: byte-exact round trips and detection of damaged data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midx_service.core import IndexConfig, MidxIndex
from midx_service.persistence.codec import (
    CorruptDataError,
    SnapshotReader,
    decode_entry,
    decode_manifest,
    encode_entry,
    encode_manifest,
    plan_snapshot,
)
from midx_service.registry import Mutation

DIM = 12


def _index(weights: bool) -> MidxIndex:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((300, DIM)).astype(np.float32)
    config = IndexConfig(DIM, num_codewords=4, last_stage="popularity" if weights else "uniform")
    return MidxIndex.build(config, table, rng.random(300) + 0.1 if weights else None)


def _read(plan_manifest: dict, chunks: list) -> dict:
    reader = SnapshotReader(decode_manifest(encode_manifest(plan_manifest)))
    for chunk in chunks:
        reader.add(bytes(chunk))
    return reader.state()


@pytest.mark.parametrize("weights", [False, True])
def test_snapshot_round_trips_bit_for_bit(weights: bool) -> None:
    index = _index(weights)

    plan = plan_snapshot(index, 7, chunk_bytes=1000)
    state = _read(plan.manifest, plan.chunks)

    original = index.state_dict()
    assert plan.manifest["version"] == 7
    assert max(len(chunk) for chunk in plan.chunks) <= 1000
    assert len(plan.chunks) > 5
    for name, value in original.items():
        if isinstance(value, torch.Tensor):
            assert state[name].dtype == value.dtype, name
            assert state[name].shape == value.shape, name
            assert state[name].numpy().tobytes() == value.numpy().tobytes(), name
        else:
            assert state[name] == value, name
    restored = MidxIndex.from_state_dict(state)
    queries = torch.randn(4, DIM, generator=torch.Generator().manual_seed(1))
    assert torch.equal(restored.sample(queries, 20, seed=3).ids, index.sample(queries, 20, seed=3).ids)


def test_snapshot_reader_rejects_altered_chunk() -> None:
    plan = plan_snapshot(_index(False), 1, chunk_bytes=1000)
    chunks = [bytes(chunk) for chunk in plan.chunks]
    chunks[2] = chunks[2][:-1] + bytes([chunks[2][-1] ^ 1])

    with pytest.raises(CorruptDataError, match=r"chunk 2 .* SHA-256"):
        _read(plan.manifest, chunks)


def test_reader_rejects_missing_short_chunks() -> None:
    plan = plan_snapshot(_index(False), 1, chunk_bytes=1000)
    reader = SnapshotReader(plan.manifest)
    reader.add(bytes(plan.chunks[0]))

    with pytest.raises(CorruptDataError, match=r"chunk 1 .* missing"):
        reader.add(None)
    with pytest.raises(CorruptDataError, match=r"chunk 1 .* bytes"):
        reader.add(bytes(plan.chunks[1])[:10])
    with pytest.raises(CorruptDataError, match="chunks, 1 were read"):
        reader.state()


def test_unknown_manifest_format_rejected() -> None:
    with pytest.raises(CorruptDataError, match="format 99"):
        decode_manifest(b'{"format": 99}')
    with pytest.raises(CorruptDataError, match="not valid JSON"):
        decode_manifest(b"{")


def _as_stream_fields(fields: dict) -> dict[bytes, bytes]:
    return {name.encode(): bytes(value) for name, value in fields.items()}


def test_update_entry_round_trips_in_parts() -> None:
    ids = torch.tensor([5, 1, 300], dtype=torch.int64)
    rows = torch.randn(3, DIM, generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    mutation = Mutation("update", "words", 9, ids=ids, embeddings=rows, weights=weights)

    fields = encode_entry(mutation, chunk_bytes=32)
    entry = decode_entry(_as_stream_fields(fields))

    assert "rows.3" in fields  # 3 x 12 float32 = 144 bytes in parts of 32
    assert (entry.kind, entry.version) == ("update", 9)
    assert entry.ids is not None and torch.equal(entry.ids, ids)
    assert entry.rows is not None and entry.rows.numpy().tobytes() == rows.numpy().tobytes()
    assert entry.weights is not None and torch.equal(entry.weights, weights)


def test_refit_entry_round_trips() -> None:
    index = _index(False).refit(seed=4)

    entry = decode_entry(_as_stream_fields(encode_entry(Mutation("refit", "words", 3, index=index), 64)))

    assert entry.refit is not None
    assert torch.equal(entry.refit.codebook_first, index.codebooks.first)
    assert torch.equal(entry.refit.codebook_second, index.codebooks.second)
    assert torch.equal(entry.refit.codes, index.codes)
    assert entry.refit.fit_quantization_error == index.fit_quantization_error


def test_create_and_upload_entries_round_trip() -> None:
    config = IndexConfig(DIM, num_codewords=4, metric="cosine")

    create = decode_entry(_as_stream_fields(encode_entry(Mutation("create", "words", 0, config=config), 64)))
    upload = decode_entry(
        _as_stream_fields(encode_entry(Mutation("upload", "words", 1, index=_index(False)), 64, snapshot="1-ab"))
    )

    assert create.config == config
    assert (upload.kind, upload.version, upload.snapshot) == ("upload", 1, "1-ab")


def test_entry_missing_part_rejected() -> None:
    mutation = Mutation("update", "words", 2, ids=torch.tensor([1]), embeddings=torch.ones(1, DIM))
    fields = _as_stream_fields(encode_entry(mutation, chunk_bytes=16))
    del fields[b"rows.1"]

    with pytest.raises(CorruptDataError, match="part 1 of tensor 'rows'"):
        decode_entry(fields)
