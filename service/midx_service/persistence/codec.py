"""Byte formats shared by the Redis and local-directory stores: chunked snapshots and mutation entries.

A snapshot is a `MidxIndex.state_dict()` written as a JSON manifest plus numbered chunks. Each tensor
is split into chunks of at most `chunk_bytes` raw little-endian bytes, so no single stored value
comes near Redis's 512 MB limit. The manifest lists every chunk's SHA-256, so a torn or overwritten
chunk is detected instead of loaded. A chunk never spans two tensors, which lets the writer hand out views
of the tensors' memory without copying them.

A mutation entry is a flat mapping of field name to bytes (a Redis stream entry, or one framed
record in a local log): `kind`, `version`, a JSON `meta` field with scalars and tensor shapes, and
each tensor as raw little-endian bytes in one or more `<name>.<part>` fields of at most
`chunk_bytes` each.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from midx_service.core import IndexConfig, MidxIndex
from midx_service.registry import Mutation

FORMAT = 1
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024

# Tensor dtypes a snapshot or entry may hold, by their little-endian numpy name.
_DTYPES: dict[str, torch.dtype] = {
    "<f4": torch.float32,
    "<f8": torch.float64,
    "<i8": torch.int64,
    "<i4": torch.int32,
}
_NUMPY_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class CorruptDataError(RuntimeError):
    """Stored bytes do not match their manifest or record (a torn write or an outside change)."""


# ------------------------------------------------------------------------------------ tensors


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Return a flat byte view of `tensor`'s little-endian contents (a copy only when not on the CPU)."""
    if tensor.dtype not in _NUMPY_NAMES:
        raise TypeError(f"tensors of dtype {tensor.dtype} cannot be stored; use one of {sorted(_DTYPES)}")
    array = tensor.detach().cpu().contiguous().numpy()
    if sys.byteorder != "little":
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(array).cast("B")  # type: ignore[arg-type]  # numpy arrays implement the buffer protocol


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    """Return a CPU tensor of `shape` read from little-endian `data`; raise CorruptDataError on a size mismatch."""
    if dtype not in _DTYPES:
        raise CorruptDataError(f"unknown tensor dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    array = np.frombuffer(data, dtype=np.dtype(dtype)) if len(data) else np.empty(0, dtype=np.dtype(dtype))
    expected = int(np.prod(shape)) if shape else 1
    if array.size != expected:
        raise CorruptDataError(f"a tensor of shape {shape} needs {expected} values, the stored bytes hold {array.size}")
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False)).reshape(shape)


def _split(view: memoryview, chunk_bytes: int) -> list[memoryview]:
    return [view[start : start + chunk_bytes] for start in range(0, len(view), chunk_bytes)]


# ---------------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class SnapshotPlan:
    """A snapshot ready to write: `manifest` (JSON-serialisable) and `chunks`, to be stored as chunk 0, 1, ..."""

    manifest: dict[str, Any]
    chunks: list[memoryview]


def plan_snapshot(index: MidxIndex, version: int, chunk_bytes: int) -> SnapshotPlan:
    """Split `index.state_dict()` into chunks of at most `chunk_bytes` and describe them in a manifest.

    Computes every chunk's SHA-256, so it takes about a second per GB; run it off the event loop.
    """
    state = index.state_dict()
    tensors: list[dict[str, Any]] = []
    scalars: dict[str, Any] = {}
    chunks: list[memoryview] = []
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            scalars[name] = value
            continue
        view = tensor_bytes(value)
        pieces = _split(view, chunk_bytes)
        tensors.append(
            {
                "name": name,
                "dtype": _NUMPY_NAMES[value.dtype],
                "shape": list(value.shape),
                "chunks": [{"bytes": len(piece), "sha256": hashlib.sha256(piece).hexdigest()} for piece in pieces],
            }
        )
        chunks.extend(pieces)
    manifest = {
        "format": FORMAT,
        "version": version,
        "chunk_bytes": chunk_bytes,
        "num_chunks": len(chunks),
        "total_bytes": sum(len(chunk) for chunk in chunks),
        "scalars": scalars,
        "tensors": tensors,
    }
    return SnapshotPlan(manifest, chunks)


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True).encode()


def decode_manifest(data: bytes) -> dict[str, Any]:
    """Parse a manifest; raise CorruptDataError when it is not one this version can read."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptDataError(f"the snapshot manifest is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorruptDataError(f"the snapshot manifest has format {found!r}; this server reads format {FORMAT}")
    return manifest


def chunk_sizes(manifest: Mapping[str, Any]) -> list[int]:
    """Return the expected byte size of every chunk, in storage order."""
    return [chunk["bytes"] for tensor in manifest["tensors"] for chunk in tensor["chunks"]]


class SnapshotReader:
    """Reassembles a snapshot's tensors from its chunks, given one at a time in storage order."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self._expected = [
            (tensor_index, chunk)
            for tensor_index, tensor in enumerate(manifest["tensors"])
            for chunk in tensor["chunks"]
        ]
        self._buffers = [bytearray(sum(chunk["bytes"] for chunk in tensor["chunks"])) for tensor in manifest["tensors"]]
        self._filled = [0] * len(self._buffers)
        self._next = 0

    def add(self, data: bytes | None) -> None:
        """Check the next chunk against its size and SHA-256 and copy it into place.

        Raises CorruptDataError naming the chunk when it is missing (None), too long, too short or altered.
        """
        position = self._next
        if position >= len(self._expected):
            raise CorruptDataError(f"the snapshot has {len(self._expected)} chunks; chunk {position} is extra")
        tensor_index, expected = self._expected[position]
        name = self.manifest["tensors"][tensor_index]["name"]
        if data is None:
            raise CorruptDataError(f"chunk {position} ({name}) of the snapshot is missing")
        if len(data) != expected["bytes"]:
            raise CorruptDataError(
                f"chunk {position} ({name}) of the snapshot has {len(data)} bytes, "
                f"its manifest says {expected['bytes']}"
            )
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CorruptDataError(f"chunk {position} ({name}) of the snapshot does not match its SHA-256")
        start = self._filled[tensor_index]
        self._buffers[tensor_index][start : start + len(data)] = data
        self._filled[tensor_index] = start + len(data)
        self._next += 1

    def state(self) -> dict[str, Any]:
        """Return the state dict once every chunk has been added."""
        if self._next != len(self._expected):
            raise CorruptDataError(f"the snapshot has {len(self._expected)} chunks, {self._next} were read")
        state = dict(self.manifest["scalars"])
        for tensor, buffer in zip(self.manifest["tensors"], self._buffers, strict=True):
            state[tensor["name"]] = tensor_from_bytes(buffer, tensor["dtype"], tensor["shape"])
        return state


# ------------------------------------------------------------------------------------ entries


@dataclass(frozen=True)
class RefitResult:
    """New codebooks and every class's codes, as a refit produced them."""

    codebook_first: torch.Tensor
    codebook_second: torch.Tensor
    codes: torch.Tensor
    fit_quantization_error: float
    codebook_fit: str


@dataclass(frozen=True)
class Entry:
    """One decoded mutation entry.

    kind "create" carries `config`; "upload" names the `snapshot` that contains the new state; "update"
    carries ids (U,) int64, rows (U, D) float32 as the request sent them and optional weights (U,)
    float64; "refit" carries `refit`.
    """

    kind: str
    version: int
    config: IndexConfig | None = None
    snapshot: str | None = None
    ids: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    refit: RefitResult | None = None


def encode_entry(
    mutation: Mutation,
    chunk_bytes: int,
    *,
    snapshot: str | None = None,
    request_rows: torch.Tensor | None = None,
) -> dict[str, bytes | memoryview]:
    """Return the fields of the entry that records `mutation`.

    An "upload" is recorded as a reference to `snapshot`, which must be stored first. An "update"
    records the ids, rows and weights of the request, so replaying it repeats exactly the
    computation the writer did. A "refit" records the new codebooks and codes, so a replica loads
    the refit result instead of running k-means itself.
    """
    meta: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    if mutation.kind == "create":
        assert mutation.config is not None
        meta["config"] = mutation.config.to_dict()
    elif mutation.kind == "upload":
        if snapshot is None:
            raise ValueError("an upload entry needs the id of the snapshot written before it")
        meta["snapshot"] = snapshot
    elif mutation.kind == "update":
        assert mutation.ids is not None and mutation.embeddings is not None
        tensors["ids"] = mutation.ids.to(torch.int64)
        tensors["rows"] = (request_rows if request_rows is not None else mutation.embeddings).to(torch.float32)
        if mutation.weights is not None:
            tensors["weights"] = mutation.weights.to(torch.float64)
    elif mutation.kind == "refit":
        assert mutation.index is not None
        index = mutation.index
        tensors["codebook_first"] = index.codebooks.first
        tensors["codebook_second"] = index.codebooks.second
        tensors["codes"] = index.codes
        meta["fit_quantization_error"] = index.fit_quantization_error
        meta["codebook_fit"] = index.codebook_fit
    else:
        raise ValueError(f"mutations of kind {mutation.kind!r} have no entry")

    fields: dict[str, bytes | memoryview] = {
        "kind": mutation.kind.encode(),
        "version": str(mutation.version).encode(),
    }
    layout: dict[str, Any] = {}
    for name, tensor in tensors.items():
        parts = _split(tensor_bytes(tensor), chunk_bytes)
        layout[name] = {"dtype": _NUMPY_NAMES[tensor.dtype], "shape": list(tensor.shape), "parts": len(parts)}
        for number, part in enumerate(parts):
            fields[f"{name}.{number}"] = part
    meta["tensors"] = layout
    meta["format"] = FORMAT
    fields["meta"] = json.dumps(meta, sort_keys=True).encode()
    return fields


def decode_entry(fields: Mapping[bytes, bytes]) -> Entry:
    """Decode the fields written by `encode_entry`; raise CorruptDataError when they do not fit together."""
    try:
        kind = fields[b"kind"].decode()
        version = int(fields[b"version"])
        meta = json.loads(fields[b"meta"])
    except (KeyError, ValueError, UnicodeDecodeError) as error:
        raise CorruptDataError(f"a mutation entry is malformed: {error!r}") from None
    if meta.get("format") != FORMAT:
        raise CorruptDataError(f"a mutation entry has format {meta.get('format')!r}; this server reads {FORMAT}")
    tensors = {name: _read_tensor(fields, name, layout) for name, layout in meta["tensors"].items()}

    if kind == "create":
        return Entry(kind, version, config=IndexConfig.from_dict(meta["config"]))
    if kind == "upload":
        return Entry(kind, version, snapshot=str(meta["snapshot"]))
    if kind == "update":
        return Entry(kind, version, ids=tensors["ids"], rows=tensors["rows"], weights=tensors.get("weights"))
    if kind == "refit":
        refit = RefitResult(
            tensors["codebook_first"],
            tensors["codebook_second"],
            tensors["codes"],
            float(meta["fit_quantization_error"]),
            str(meta["codebook_fit"]),
        )
        return Entry(kind, version, refit=refit)
    raise CorruptDataError(f"a mutation entry has unknown kind {kind!r}")


def _read_tensor(fields: Mapping[bytes, bytes], name: str, layout: Mapping[str, Any]) -> torch.Tensor:
    parts = []
    for number in range(int(layout["parts"])):
        part = fields.get(f"{name}.{number}".encode())
        if part is None:
            raise CorruptDataError(f"a mutation entry lacks part {number} of tensor {name!r}")
        parts.append(part)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    return tensor_from_bytes(data, layout["dtype"], list(layout["shape"]))
