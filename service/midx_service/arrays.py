"""Decoding of request arrays (JSON lists, .npy/.npz bodies, protobuf tensors) into numpy arrays."""

from __future__ import annotations

import io
import math
import zipfile
from typing import Any

import numpy as np

from midx_service.errors import InvalidArgumentError

# Wire dtypes of protobuf tensors, always little-endian.
FLOAT_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
ID_DTYPES: dict[str, np.dtype[Any]] = {"int64": np.dtype("<i8"), "int32": np.dtype("<i4")}

NPY_CONTENT_TYPE = "application/x-npy"
NPZ_CONTENT_TYPE = "application/x-npz"


def from_json(value: Any, name: str, dtype: type[np.generic]) -> np.ndarray:
    """Return JSON numbers (nested lists) as an array; ragged lists and non-numbers are rejected.

    Strings such as "NaN" and "Infinity" become NaN / Inf and are rejected later by the finiteness
    check, with the same message as the bare JSON tokens.
    """
    try:
        return np.asarray(value, dtype=dtype)
    except (ValueError, TypeError) as error:
        raise InvalidArgumentError(
            f"{name} must be a rectangular array of numbers, one row per entry: {error}"
        ) from None


def from_tensor(dtype: str, shape: list[int], data: bytes, name: str, allowed: dict[str, np.dtype[Any]]) -> np.ndarray:
    """Return a protobuf tensor {dtype, shape, little-endian data} as a read-only array over `data`."""
    if dtype not in allowed:
        raise InvalidArgumentError(f"{name}.dtype is {dtype!r}; expected one of {sorted(allowed)}")
    if any(size < 0 for size in shape):
        raise InvalidArgumentError(f"{name}.shape {list(shape)} has a negative size")
    wire_dtype = allowed[dtype]
    expected = math.prod(shape) * wire_dtype.itemsize
    if len(data) != expected:
        raise InvalidArgumentError(
            f"{name} has shape {list(shape)} of {dtype}, which needs {expected} bytes, but data has "
            f"{len(data)} bytes; send shape and data of the same array"
        )
    # No copy: the index core reads request arrays without writing to them and copies what it keeps.
    return np.frombuffer(data, dtype=wire_dtype).reshape(tuple(shape))


def load_npy(body: bytes, name: str) -> np.ndarray:
    """Return the array of a .npy body (pickled objects are refused)."""
    if not body.startswith(b"\x93NUMPY"):
        raise InvalidArgumentError(
            f"the {name} body is not a .npy file: it lacks the NumPy magic bytes; save the array with numpy.save"
        )
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InvalidArgumentError(f"the {name} body is not a valid .npy file: {error}") from None


def load_npz(body: bytes, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Return the arrays of a .npz body, which must contain `required` and nothing beyond `allowed`."""
    if not body.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise InvalidArgumentError(
            "the body is not a .npz file: it is not a zip archive; save the arrays with numpy.savez"
        )
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise InvalidArgumentError(f"the body is not a valid .npz file: {error}") from None
    unknown = sorted(set(arrays) - set(allowed))
    missing = sorted(set(required) - set(arrays))
    if unknown or missing:
        raise InvalidArgumentError(
            f"the .npz body must hold arrays {list(required)} and may hold "
            f"{sorted(set(allowed) - set(required))}; got {sorted(arrays)}"
        )
    return arrays


def save_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """Return `arrays` as the bytes of an uncompressed .npz file, the format `load_npz` reads."""
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def json_floats(array: np.ndarray) -> list[Any]:
    """Return `array` as nested lists for JSON, with -inf (and any other non-finite value) as null."""
    finite = np.isfinite(array)
    if finite.all():
        return array.tolist()
    values = array.astype(object)
    values[~finite] = None
    return values.tolist()
