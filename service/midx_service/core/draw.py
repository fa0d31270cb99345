"""Vectorised draws inside contiguous segments of a sorted array, optionally skipping excluded entries.

A segment is a run [start, start + length) of positions: a cell of an index in cell order, or the
whole class range for the query-independent baselines. Entries are drawn uniformly or in proportion
to weights given as an inclusive prefix sum that restarts at each segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Exclusions:
    """Entries to skip, per draw: P slots of which those with `active` set apply.

    position: (S, P) int64 absolute positions, ascending along P for the active slots.
    active: (S, P) bool, set where the slot names a distinct entry inside the draw's segment.
    weight: (S, P) float64 weights of those entries (1 for unit-weight draws).
    """

    position: torch.Tensor
    active: torch.Tensor
    weight: torch.Tensor


def search_segments(
    values: torch.Tensor, start: torch.Tensor, length: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Return, per segment, the first offset j in [0, length) with values[start + j] > target.

    values is non-decreasing inside every segment. Returns `length` where no entry exceeds the
    target. A binary search run on all segments at once: ceil(log2(max length + 1)) gather steps.
    """
    low = torch.zeros_like(start)
    high = length.clone()
    if start.numel() == 0:
        return low
    last = values.shape[0] - 1
    for _ in range(int(length.max()).bit_length()):
        active = low < high
        middle = (low + high) // 2
        probe = values[(start + middle).clamp(max=last)]
        go_right = probe <= target
        low = torch.where(active & go_right, middle + 1, low)
        high = torch.where(active & ~go_right, middle, high)
    return low


def draw_in_segments(
    generator: torch.Generator,
    start: torch.Tensor,
    length: torch.Tensor,
    *,
    prefix: torch.Tensor | None = None,
    mass: torch.Tensor | None = None,
    last_positive: torch.Tensor | None = None,
    exclusions: Exclusions | None = None,
) -> torch.Tensor:
    """Draw one position per segment and return the (S,) absolute positions.

    With `prefix` None every entry of a segment is equally likely. Otherwise `prefix` is the float64
    inclusive prefix of the entry weights within each segment, `mass` (S,) the segment totals and
    `last_positive` (S,) the offset of the segment's last entry of positive weight, so entries of
    weight 0 are never drawn. Excluded entries are skipped exactly: the draw is made over the
    remaining count (or mass) and then shifted past each excluded entry at or before it, in
    ascending order. Every segment must keep at least one drawable entry.
    """
    uniform = torch.rand(start.shape, generator=generator, dtype=torch.float64, device=start.device)
    if prefix is None:
        return start + _unit_offsets(uniform, start, length, exclusions)
    if mass is None or last_positive is None:
        raise ValueError("weighted draws need the segment mass and last positive offset")

    available = mass
    if exclusions is not None:
        available = mass - (exclusions.weight * exclusions.active).sum(dim=1)
    target = uniform * available.clamp_min(0.0)
    if exclusions is not None:
        # Offsets of the excluded entries inside their segment, in mass units (exclusive prefix).
        excluded_offset = prefix[exclusions.position] - exclusions.weight
        for slot in range(exclusions.position.shape[1]):
            skip = exclusions.active[:, slot] & (target >= excluded_offset[:, slot])
            target = target + torch.where(skip, exclusions.weight[:, slot], 0.0)
    offset = search_segments(prefix, start, length, target)
    return start + torch.minimum(offset, last_positive)


def _unit_offsets(
    uniform: torch.Tensor, start: torch.Tensor, length: torch.Tensor, exclusions: Exclusions | None
) -> torch.Tensor:
    available = length
    if exclusions is not None:
        available = length - exclusions.active.sum(dim=1)
    # For available >= 1 and uniform <= 1 - 2**-53, uniform * available rounds below available,
    # so the truncated offset is at most available - 1.
    offset = (uniform * available).to(torch.int64)
    if exclusions is not None:
        for slot in range(exclusions.position.shape[1]):
            excluded_offset = exclusions.position[:, slot] - start
            offset = offset + (exclusions.active[:, slot] & (offset >= excluded_offset)).to(torch.int64)
    return offset


def below_one(total: torch.Tensor) -> torch.Tensor:
    """Return `total` scaled down by one unit in the last place of 1.0.

    For any uniform u in [0, 1) as torch.rand draws it, u * below_one(total) rounds to a value strictly
    below total, so an inverse-CDF search on a cumsum ending in total never runs past its last entry.
    The scaling removes a relative 2**-23 (float32) or 2**-52 (float64) of the last entry's mass, far
    below the rounding error of the cumsum itself, and costs one operation on the small totals tensor
    instead of a clamp on every draw.
    """
    return total * (1.0 - torch.finfo(total.dtype).eps)


def draw_from_cumsum(cumsum: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Draw (B, M) column indices with probability proportional to the increments of each (B, K) row."""
    uniform = torch.rand(cumsum.shape[0], num_samples, generator=generator, dtype=cumsum.dtype, device=cumsum.device)
    target = uniform.mul_(below_one(cumsum[:, -1:]))
    return torch.searchsorted(cumsum, target, right=True)
