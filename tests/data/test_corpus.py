"""Tests of the standard-library corpus: tokenisation, the held-out split and the query builder."""

from __future__ import annotations

import numpy as np
import pytest

from midx_service.data import corpus
from midx_service.data.corpus import Document, build_corpus, tokenize

VOCABULARY = [
    "the",
    ",",
    ".",
    "do",
    "n't",
    "'s",
    "e.g.",
    "os",
    "path",
    "join",
    "it",
    "get",
    "paths",
    "(",
    ")",
]
WORD_IDS = {word: row for row, word in enumerate(VOCABULARY)}


def test_tokenize_splits_like_glove() -> None:
    words = tokenize("Don't use os.path.join(), e.g. it's The get_paths.", WORD_IDS)

    assert words == [
        "do",
        "n't",
        "use",
        "os",
        ".",
        "path",
        ".",
        "join",
        "(",
        ")",
        ",",
        "e.g.",
        "it",
        "'s",
        "the",
        "get",
        "paths",
        ".",
    ]


def test_tokenize_drops_layout_lines() -> None:
    text = "Title\n=====\n\n+-----+-----+\n| the | os  |\n+=====+=====+\nthe end"

    words = tokenize(text, WORD_IDS)

    assert words == ["title", "|", "the", "|", "os", "|", "the", "end"]


def test_build_corpus_counts_unknown_words() -> None:
    documents = [Document("a", "the os path"), Document("b", "the unknownword join")]

    built = build_corpus(VOCABULARY, documents=documents, heldout_fraction=0.5, seed=0)

    assert built.num_words == 6
    assert built.num_unknown_words == 1
    assert built.num_tokens == 5
    all_tokens = sorted(np.concatenate([built.train.tokens, built.heldout.tokens]).tolist())
    assert all_tokens == sorted([0, 7, 8, 0, 9])


def test_build_corpus_splits_by_whole_document() -> None:
    words = ["the", "os", "path", "join", "it", "get", "paths", "do", ",", "("]
    documents = [Document(f"doc{i}", " ".join([word] * (i + 1))) for i, word in enumerate(words)]

    built = build_corpus(VOCABULARY, documents=documents, heldout_fraction=0.2, seed=3)

    assert len(built.heldout.document_starts) == 2
    assert len(built.train.document_starts) == 8
    heldout_ids = set(built.heldout.tokens.tolist())
    train_ids = set(built.train.tokens.tolist())
    assert heldout_ids.isdisjoint(train_ids)
    for split in (built.train, built.heldout):
        ends = [*split.document_starts[1:].tolist(), split.num_tokens]
        for start, end in zip(split.document_starts.tolist(), ends, strict=True):
            assert len(set(split.tokens[start:end].tolist())) == 1


def test_build_corpus_split_is_deterministic() -> None:
    documents = [Document(f"doc{i}", word) for i, word in enumerate(["the", "os", "path", "join", "it"] * 2)]

    first = build_corpus(VOCABULARY, documents=documents, seed=7)
    second = build_corpus(VOCABULARY, documents=documents, seed=7)
    other_seed = build_corpus(VOCABULARY, documents=documents, seed=8)

    np.testing.assert_array_equal(first.heldout.tokens, second.heldout.tokens)
    assert first.heldout.tokens.tolist() != other_seed.heldout.tokens.tolist()


def test_build_corpus_rejects_bad_heldout_fraction() -> None:
    with pytest.raises(ValueError, match="heldout_fraction"):
        build_corpus(VOCABULARY, documents=[], heldout_fraction=1.0)


def test_target_positions_stay_inside_documents() -> None:
    split = corpus.Split(tokens=np.arange(10, dtype=np.int64), document_starts=np.array([0, 3, 4], dtype=np.int64))

    assert split.target_positions(2).tolist() == [2, 6, 7, 8, 9]
    assert split.target_positions(0).tolist() == list(range(10))


@pytest.mark.slow
def test_documents_skip_tests_and_site_packages() -> None:
    names = [document.name for document in corpus.iter_documents()]

    assert "argparse.py" in names
    assert "pydoc topic for" in names
    assert not any(name.startswith(("test/", "site-packages/")) for name in names)
    assert not any("/tests/" in name or "/idle_test/" in name for name in names)
    modules = [name for name in names if not name.startswith("pydoc topic ")]
    assert names[: len(modules)] == sorted(modules)
    assert names[len(modules) :] == sorted(names[len(modules) :])


@pytest.mark.slow
def test_load_corpus_has_stdlib_sized_text() -> None:
    built = corpus.load_corpus()

    # About 463,000 tokens on CPython 3.11; other versions differ by a few percent.
    assert 350_000 < built.num_tokens < 600_000
    assert built.num_unknown_words < 0.05 * built.num_words
    assert 0.05 < built.heldout.num_tokens / built.num_tokens < 0.2


@pytest.mark.slow
def test_context_queries_are_deterministic_means() -> None:
    queries = corpus.context_queries(64, seed=5)
    again = corpus.context_queries(64, seed=5)
    other = corpus.context_queries(64, seed=6)

    assert queries.shape == (64, 50)
    assert queries.dtype == np.float32
    np.testing.assert_array_equal(queries, again)
    assert not np.array_equal(queries, other)
    assert corpus.context_queries(0, seed=0).shape == (0, 50)


def test_restricted_split_drops_rare_words() -> None:
    split = corpus.Split(
        tokens=np.array([0, 5, 1, 7, 2, 3], dtype=np.int64), document_starts=np.array([0, 2, 4], dtype=np.int64)
    )

    restricted = split.restricted(4)

    assert restricted.tokens.tolist() == [0, 1, 2, 3]
    assert restricted.document_starts.tolist() == [0, 1, 2]
    assert split.restricted(8) is split
