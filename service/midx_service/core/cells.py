"""The inverted multi-index proper: classes grouped by cell (pair of codes), with per-cell masses."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Cells:
    """Classes sorted by cell id a * K + b, and what a draw needs to pick one inside a cell.

    order: (N,) class ids in cell order; position: (N,) the inverse permutation.
    start, count: (K*K,) first position and number of classes of each cell.
    mass: (K*K,) float64 cell masses w_ab (class counts, or sums of class weights).
    drawable: (K*K,) int64 number of classes of positive weight in each cell.
    scaled_mass: (K, K) float32 masses divided by `mass_scale`, so sums of large weights cannot
        overflow float32; log_scaled_mass is its log (-inf for empty cells).
    prefix: (N,) float64 inclusive prefix of the class weights in cell order, restarting at each
        cell (popularity last stage only). last_positive: (K*K,) offset of each cell's last class
        of positive weight (popularity only).
    """

    num_codewords: int
    order: torch.Tensor
    position: torch.Tensor
    start: torch.Tensor
    count: torch.Tensor
    mass: torch.Tensor
    drawable: torch.Tensor
    mass_scale: float
    scaled_mass: torch.Tensor
    log_scaled_mass: torch.Tensor
    row_nonempty: torch.Tensor
    prefix: torch.Tensor | None
    last_positive: torch.Tensor | None


def build_cells(codes: torch.Tensor, num_codewords: int, weights: torch.Tensor | None) -> Cells:
    """Group classes by cell. `weights` (N,) float64 selects the popularity last stage; None is uniform."""
    num_classes = codes.shape[0]
    num_cells = num_codewords * num_codewords
    device = codes.device
    cell = codes[:, 0] * num_codewords + codes[:, 1]
    sorted_cell, order = torch.sort(cell, stable=True)
    count = torch.bincount(cell, minlength=num_cells)
    start = torch.cumsum(count, 0) - count
    position = torch.empty_like(order)
    position[order] = torch.arange(num_classes, device=device)

    prefix = last_positive = None
    if weights is None:
        mass = count.to(torch.float64)
        drawable = count
    else:
        sorted_weight = weights[order]
        mass = torch.zeros(num_cells, dtype=torch.float64, device=device).index_add_(0, cell, weights)
        positive = sorted_weight > 0
        drawable = torch.bincount(sorted_cell[positive], minlength=num_cells)
        # Segmented inclusive prefix: a global cumsum minus the running total before each cell.
        # Float64 keeps the error near 1e-16 of the table's total weight.
        running = torch.cumsum(sorted_weight, 0)
        before_cell = (running - sorted_weight)[start.clamp(max=max(num_classes - 1, 0))]
        prefix = running - before_cell[sorted_cell]
        offsets = torch.arange(num_classes, device=device) - start[sorted_cell]
        last_positive = torch.zeros(num_cells, dtype=torch.int64, device=device).scatter_reduce_(
            0, sorted_cell[positive], offsets[positive], reduce="amax", include_self=True
        )

    mass_scale = float(mass.max()) if num_classes > 0 and float(mass.max()) > 0 else 1.0
    scaled_mass = (mass / mass_scale).to(torch.float32).view(num_codewords, num_codewords)
    log_scaled_mass = torch.where(scaled_mass > 0, scaled_mass.log(), torch.full_like(scaled_mass, -torch.inf))
    return Cells(
        num_codewords=num_codewords,
        order=order,
        position=position,
        start=start,
        count=count,
        mass=mass,
        drawable=drawable,
        mass_scale=mass_scale,
        scaled_mass=scaled_mass,
        log_scaled_mass=log_scaled_mass,
        row_nonempty=(drawable.view(num_codewords, num_codewords) > 0).any(dim=1),
        prefix=prefix,
        last_positive=last_positive,
    )
