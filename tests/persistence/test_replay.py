"""Replaying recorded row updates and refits gives the index the writer built, merged or one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midx_service.core import IndexConfig, MidxIndex
from midx_service.persistence.codec import Entry, RefitResult
from midx_service.persistence.replay import ReplayGapError, replay

DIM = 8


def _update(version: int, ids: list[int], seed: int, weights: bool = False) -> Entry:
    rng = np.random.default_rng(seed)
    rows = torch.from_numpy(rng.standard_normal((len(ids), DIM)).astype(np.float32))
    weight_vector = torch.from_numpy(rng.random(len(ids)) + 0.5) if weights else None
    return Entry("update", version, ids=torch.tensor(ids, dtype=torch.int64), rows=rows, weights=weight_vector)


def _refit(version: int, index: MidxIndex) -> Entry:
    refit = RefitResult(
        index.codebooks.first, index.codebooks.second, index.codes, index.fit_quantization_error, index.codebook_fit
    )
    return Entry("refit", version, refit=refit)


def _base(metric: str = "dot", weights: bool = False) -> MidxIndex:
    rng = np.random.default_rng(0)
    config = IndexConfig(DIM, num_codewords=4, metric=metric, last_stage="popularity" if weights else "uniform")
    return MidxIndex.build(
        config, rng.standard_normal((50, DIM)).astype(np.float32), rng.random(50) + 0.5 if weights else None
    )


def _assert_same(left: MidxIndex, right: MidxIndex) -> None:
    assert torch.equal(left.embeddings, right.embeddings)
    assert torch.equal(left.codes, right.codes)
    assert torch.equal(left.codebooks.first, right.codebooks.first)
    if left.weights is None:
        assert right.weights is None
    else:
        assert right.weights is not None and torch.equal(left.weights, right.weights)


@pytest.mark.parametrize(("metric", "weights"), [("dot", False), ("cosine", False), ("dot", True)])
def test_merged_replay_matches_one_by_one(metric: str, weights: bool) -> None:
    base = _base(metric, weights)
    # Overlapping ids, appends (50, 51, then 52) and an update of an appended row.
    entries = [
        _update(2, [3, 50], 1, weights),
        _update(3, [3, 7, 51], 2, weights),
        _update(4, [50, 52], 3, weights),
        _update(5, [0, 7], 4, weights),
    ]

    one_by_one = base
    for entry in entries:
        one_by_one = one_by_one.update_rows(entry.ids, entry.rows, entry.weights)
    merged = replay(base, 1, entries)

    assert merged.num_classes == 53
    _assert_same(merged, one_by_one)


def test_replay_applies_refit_between_updates() -> None:
    base = _base()
    first = _update(2, [1, 2], 1)
    after_first = base.update_rows(first.ids, first.rows)
    refitted = after_first.refit(seed=5)
    last = _update(4, [2, 9], 2)
    expected = refitted.update_rows(last.ids, last.rows)

    replayed = replay(base, 1, [first, _refit(3, refitted), last])

    _assert_same(replayed, expected)
    assert replayed.fit_quantization_error == refitted.fit_quantization_error


def test_replay_skips_applied_entries() -> None:
    base = _base()
    entries = [_update(2, [1], 1), _update(3, [2], 2)]
    at_two = base.update_rows(entries[0].ids, entries[0].rows)

    replayed = replay(at_two, 2, entries)

    _assert_same(replayed, at_two.update_rows(entries[1].ids, entries[1].rows))


def test_replay_rejects_gap() -> None:
    with pytest.raises(ReplayGapError, match="expected the entry for version 2, found version 3"):
        replay(_base(), 1, [_update(3, [1], 1)])
    with pytest.raises(ReplayGapError, match="version 4"):
        replay(_base(), 1, [_update(2, [1], 1), _update(4, [1], 2)])


def test_replay_without_table_is_a_gap() -> None:
    with pytest.raises(ReplayGapError, match="needs a table"):
        replay(None, 0, [_update(1, [1], 1)])
