"""Replay recorded row updates and refits onto an index, in order, as the writer applied them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from midx_service.core import MidxIndex
from midx_service.persistence.codec import CorruptDataError, Entry


class ReplayGapError(RuntimeError):
    """The entries do not continue the index's version: some were trimmed or not yet read."""


def replay(index: MidxIndex | None, version: int, entries: Sequence[Entry]) -> MidxIndex:
    """Return `index` (at `version`) with the "update" and "refit" entries after `version` applied.

    Entries at or below `version` are skipped. Raises ReplayGapError when the first entry to apply is
    not version + 1 or the entries skip a version. Consecutive row updates are merged into one
    `update_rows` call (the last write of a row wins, as it would one by one), because each call
    copies the whole table and a replay after a crash may cover thousands of updates.
    """
    pending = [entry for entry in entries if entry.version > version]
    expected = version + 1
    for entry in pending:
        if entry.version != expected:
            raise ReplayGapError(f"expected the entry for version {expected}, found version {entry.version}")
        expected += 1
    if not pending:
        if index is None:
            raise ReplayGapError(f"there is no table at version {version} and no entries to apply")
        return index
    if index is None:
        raise ReplayGapError(f"the entry for version {pending[0].version} needs a table and there is none")

    group: list[Entry] = []
    for entry in pending:
        if entry.kind == "update" and (not group or _same_weighting(group[0], entry)):
            group.append(entry)
            continue
        index = _apply_updates(index, group)
        group = []
        if entry.kind == "update":
            group.append(entry)
        elif entry.kind == "refit":
            index = apply_refit(index, entry)
        else:
            raise ReplayGapError(f"an entry of kind {entry.kind!r} at version {entry.version} cannot be replayed")
    return _apply_updates(index, group)


def apply_refit(index: MidxIndex, entry: Entry) -> MidxIndex:
    """Return `index` with the codebooks and codes the refit entry recorded; the table is unchanged."""
    refit = entry.refit
    if refit is None:
        raise CorruptDataError(f"the refit entry for version {entry.version} carries no codebooks")
    if refit.codes.shape[0] != index.num_classes:
        raise CorruptDataError(
            f"the refit entry for version {entry.version} has codes for {refit.codes.shape[0]} classes, "
            f"the index has {index.num_classes}"
        )
    state = {
        "config": index.config.to_dict(),
        "embeddings": index.embeddings,
        "weights": index.weights,
        "codebook_first": refit.codebook_first,
        "codebook_second": refit.codebook_second,
        "codes": refit.codes,
        "fit_quantization_error": refit.fit_quantization_error,
        "codebook_fit": refit.codebook_fit,
    }
    return MidxIndex.from_state_dict(state, index.device)


def _same_weighting(first: Entry, entry: Entry) -> bool:
    return (first.weights is None) == (entry.weights is None)


def _apply_updates(index: MidxIndex, group: list[Entry]) -> MidxIndex:
    if not group:
        return index
    if len(group) == 1:
        entry = group[0]
        return index.update_rows(entry.ids, entry.rows, entry.weights)

    ids = torch.cat([entry.ids for entry in group if entry.ids is not None])
    rows = torch.cat([entry.rows for entry in group if entry.rows is not None])
    unique, inverse = torch.unique(ids, return_inverse=True)
    # Position of each id's last occurrence, so the latest row of an id wins.
    positions = torch.arange(ids.shape[0])
    last = torch.full((unique.shape[0],), -1, dtype=torch.int64).scatter_reduce(0, inverse, positions, "amax")
    weights = None
    if group[0].weights is not None:
        weights = torch.cat([entry.weights for entry in group if entry.weights is not None])[last]
    return index.update_rows(unique, rows[last], weights)
