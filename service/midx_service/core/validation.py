"""Checks that turn caller input into tensors of the expected shape and dtype, or raise a clear error."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from midx_service.errors import InvalidArgumentError

ArrayLike = Any  # torch.Tensor, numpy.ndarray or nested sequences of numbers


def as_float_matrix(value: ArrayLike, name: str, dim: int, device: torch.device) -> torch.Tensor:
    """Return `value` as a contiguous (B, dim) float32 tensor on `device`.

    Raises InvalidArgumentError when it is not 2-D, has another column count, is not numeric, or
    contains NaN or Inf (naming the first offending row).
    """
    tensor = _as_tensor(value, name)
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise InvalidArgumentError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    if tensor.ndim != 2:
        raise InvalidArgumentError(
            f"{name} must be a 2-D array of shape (rows, {dim}), got shape {tuple(tensor.shape)}"
        )
    if tensor.shape[1] != dim:
        raise InvalidArgumentError(f"{name} has {tensor.shape[1]} columns, the index has dim {dim}")
    tensor = tensor.to(device=device, dtype=torch.float32).contiguous()
    finite = torch.isfinite(tensor).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise InvalidArgumentError(f"{name} row {row} contains NaN or Inf; every value must be finite")
    return tensor


def as_id_matrix(value: ArrayLike, name: str, num_rows: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Return `value` as a (num_rows, P) int64 tensor of class ids in [0, num_classes)."""
    tensor = _as_tensor(value, name)
    if tensor.ndim == 1 and num_rows == tensor.shape[0]:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 2 or tensor.shape[0] != num_rows:
        raise InvalidArgumentError(
            f"{name} must have shape ({num_rows}, P), one row per query, got shape {tuple(tensor.shape)}"
        )
    return _check_ids(tensor, name, num_classes).to(device)


def as_id_vector(value: ArrayLike, name: str, num_classes: int, device: torch.device) -> torch.Tensor:
    """Return `value` as a 1-D int64 tensor of ids in [0, num_classes)."""
    tensor = _as_tensor(value, name)
    if tensor.ndim != 1:
        raise InvalidArgumentError(f"{name} must be a 1-D array of ids, got shape {tuple(tensor.shape)}")
    return _check_ids(tensor, name, num_classes).to(device)


def as_weight_vector(value: ArrayLike, name: str, length: int, device: torch.device) -> torch.Tensor:
    """Return `value` as a (length,) float64 tensor of finite weights >= 0."""
    tensor = _as_tensor(value, name)
    if tensor.ndim != 1 or tensor.shape[0] != length:
        raise InvalidArgumentError(
            f"{name} must have shape ({length},), one weight per row, got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise InvalidArgumentError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(device=device, dtype=torch.float64)
    bad = ~torch.isfinite(tensor) | (tensor < 0)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise InvalidArgumentError(f"{name}[{row}] is {float(tensor[row])}; weights must be finite and >= 0")
    return tensor


def check_num_samples(num_samples: object) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise InvalidArgumentError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    return int(num_samples)


def _as_tensor(value: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        array = np.asarray(value)
    except ValueError as error:  # ragged nested lists
        raise InvalidArgumentError(f"{name} must be a rectangular array: {error}") from None
    if array.dtype == object or array.dtype.kind in "USV":
        raise InvalidArgumentError(f"{name} must be a rectangular array of numbers, got dtype {array.dtype}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        # Arrays decoded from a request buffer are read-only. The index never writes into input
        # tensors (it copies what it keeps), so torch's warning about this does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)
    return torch.from_numpy(array)


def _check_ids(tensor: torch.Tensor, name: str, num_classes: int) -> torch.Tensor:
    if tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()) or not bool((tensor == tensor.round()).all()):
            raise InvalidArgumentError(f"{name} must hold integer class ids, got non-integer values")
    elif tensor.dtype == torch.bool or tensor.is_complex():
        raise InvalidArgumentError(f"{name} must hold integer class ids, got dtype {tensor.dtype}")
    tensor = tensor.to(torch.int64)
    if tensor.numel() > 0:
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise InvalidArgumentError(f"{name} contains id {bad}; ids must be in [0, {num_classes}) for this index")
    return tensor
