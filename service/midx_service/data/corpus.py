"""Real text for the main job: standard-library docstrings and pydoc topics as GloVe word ids.

The text is the docstrings (module, class and function) of the Python standard library's own .py
sources, read with `ast` so no module is imported, plus the topic pages of `pydoc_data.topics`. It is
lower-cased and split the way GloVe 6B was tokenised (punctuation marks and clitics such as "n't" and
"'s" are words of their own), then mapped to rows of the GloVe table. Words missing from the
vocabulary are dropped and counted. Everything is derived from the running Python install, so two
runs on the same install give the same ids; nothing is written to disk.
"""

from __future__ import annotations

import ast
import functools
import logging
import re
import sysconfig
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midx_service.data.glove import load_glove

logger = logging.getLogger(__name__)

DEFAULT_HELDOUT_FRACTION = 0.1
DEFAULT_SPLIT_SEED = 0
QUERY_CONTEXT_WORDS = 4

# Folders of the standard library that hold test suites, third-party packages or caches, not
# library documentation.
_SKIPPED_FOLDERS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "__phello__"}
)

# A candidate word: letters and digits, possibly joined by an apostrophe, dot, hyphen or slash and
# ending in a dot ("u.s.", "e.g.", "non-empty", "don't", "3.14"); or "..." or "--"; or any other
# single non-space character except the underscore. Underscores only join the parts of identifiers
# ("__init__", "get_paths"), so they are dropped and the parts become words of their own.
_CANDIDATE = re.compile(r"[a-z0-9]+(?:['.\-/][a-z0-9]+)*\.?|\.\.\.|--|[^\s_]")
_PIECE = re.compile(r"[a-z0-9]+|[^\s_]")
# A line of nothing but punctuation marks used for layout: a reStructuredText heading underline, a
# table border ("+-----+-----+", "===== =====") or a rule.
_LAYOUT_LINE = re.compile(r"^[ \t]*[=\-+*~^#`'\".:_|][=\-+*~^#`'\".:_| \t]{2,}$", re.MULTILINE)


@dataclass(frozen=True)
class Document:
    """One unit of the corpus: a standard-library module's docstrings, or one pydoc topic page."""

    name: str
    text: str


@dataclass(frozen=True)
class Split:
    """The token ids of a set of documents, concatenated.

    tokens: (T,) int64 GloVe row ids. document_starts: (number of documents,) int64 offsets into
    `tokens` where each document begins, ascending, the first being 0.
    """

    tokens: np.ndarray
    document_starts: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def target_positions(self, context: int) -> np.ndarray:
        """Return the (T',) int64 positions t whose `context` previous tokens lie in t's own document."""
        position = np.arange(self.num_tokens, dtype=np.int64)
        document = np.searchsorted(self.document_starts, position, side="right") - 1
        offset_in_document = position - self.document_starts[document]
        return position[offset_in_document >= context]

    def restricted(self, num_classes: int) -> Split:
        """Return this split without the tokens whose id is num_classes or more (rarer words)."""
        keep = self.tokens < num_classes
        if bool(keep.all()):
            return self
        kept_before = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
        return Split(tokens=self.tokens[keep], document_starts=kept_before[self.document_starts])


@dataclass(frozen=True)
class Corpus:
    """The tokenised corpus with a held-out split made by whole documents.

    num_words counts every word the tokeniser produced, num_unknown_words those missing from the
    vocabulary (dropped, so num_tokens = num_words - num_unknown_words).
    """

    train: Split
    heldout: Split
    num_documents: int
    num_words: int
    num_unknown_words: int

    @property
    def num_tokens(self) -> int:
        return self.train.num_tokens + self.heldout.num_tokens


def iter_documents() -> Iterator[Document]:
    """Yield the standard library's documents in a fixed order: modules by path, then pydoc topics."""
    yield from _stdlib_documents(Path(sysconfig.get_paths()["stdlib"]))
    yield from _topic_documents()


def tokenize(text: str, vocabulary: Mapping[str, int]) -> list[str]:
    """Split `text` into lower-case words the way GloVe 6B was tokenised.

    A candidate word found in `vocabulary` is kept whole ("e.g.", "non-empty"). Otherwise a clitic is
    split off ("don't" -> "do", "n't"; "it's" -> "it", "'s"), a trailing dot becomes its own word, and
    anything else is split into runs of letters and digits and single punctuation marks
    ("os.path" -> "os", ".", "path"). Underscores are dropped ("get_paths" -> "get", "paths"), and so
    are lines of layout punctuation (heading underlines, table borders). Words missing from the
    vocabulary are returned too, so the caller can count them.
    """
    words: list[str] = []
    text = _LAYOUT_LINE.sub("", text.lower().replace("\u2019", "'"))
    for candidate in _CANDIDATE.findall(text):
        if candidate in vocabulary:
            words.append(candidate)
        else:
            words.extend(_split_candidate(candidate, vocabulary))
    return words


def build_corpus(
    vocabulary: Sequence[str],
    *,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    documents: Sequence[Document] | None = None,
) -> Corpus:
    """Tokenise the documents and split them into train and held-out sets by whole document.

    vocabulary: word of each row id. heldout_fraction: the share of documents held out, chosen by a
    permutation drawn with `seed` (at least one document goes to each side when there are two or
    more). documents: defaults to `iter_documents()`.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    started = time.perf_counter()
    word_ids = {word: row for row, word in enumerate(vocabulary)}
    if documents is None:
        documents = list(iter_documents())

    token_lists: list[np.ndarray] = []
    num_words = 0
    num_unknown = 0
    for document in documents:
        words = tokenize(document.text, word_ids)
        ids = [word_ids[word] for word in words if word in word_ids]
        num_words += len(words)
        num_unknown += len(words) - len(ids)
        token_lists.append(np.asarray(ids, dtype=np.int64))

    num_heldout = _heldout_count(len(documents), heldout_fraction)
    order = np.random.default_rng(seed).permutation(len(documents))
    heldout_documents = np.sort(order[:num_heldout])
    train_documents = np.sort(order[num_heldout:])
    corpus = Corpus(
        train=_concatenate([token_lists[i] for i in train_documents]),
        heldout=_concatenate([token_lists[i] for i in heldout_documents]),
        num_documents=len(documents),
        num_words=num_words,
        num_unknown_words=num_unknown,
    )
    logger.info(
        "corpus built: %d documents, %d tokens (%d train, %d held out), %d unknown words dropped, %.1f s",
        corpus.num_documents,
        corpus.num_tokens,
        corpus.train.num_tokens,
        corpus.heldout.num_tokens,
        num_unknown,
        time.perf_counter() - started,
    )
    return corpus


def load_corpus() -> Corpus:
    """Build the corpus over the GloVe vocabulary with the default split; cached for the process."""
    return _load_corpus()


@functools.lru_cache(maxsize=1)
def _load_corpus() -> Corpus:
    _, vocabulary = load_glove()
    return build_corpus(vocabulary)


def context_queries(num_queries: int, seed: int) -> np.ndarray:
    """Build (num_queries, 50) float32 query vectors that look like a language model's contexts.

    Each query is the mean of the GloVe vectors of 4 consecutive words of the training text, starting
    at a position drawn uniformly with `seed`. Such queries score related words highly, the way a
    trained model's hidden state does, unlike random Gaussian queries.
    """
    if num_queries < 0:
        raise ValueError(f"num_queries must be >= 0, got {num_queries}")
    embeddings, _ = load_glove()
    split = load_corpus().train
    ends = split.target_positions(QUERY_CONTEXT_WORDS - 1)
    generator = np.random.default_rng(seed)
    last = ends[generator.integers(0, ends.shape[0], size=num_queries)]
    windows = last[:, None] - np.arange(QUERY_CONTEXT_WORDS)[None, :]
    return embeddings[split.tokens[windows]].mean(axis=1, dtype=np.float64).astype(np.float32)


def _split_candidate(candidate: str, vocabulary: Mapping[str, int]) -> list[str]:
    if candidate.endswith("n't") and len(candidate) > 3:
        return [*_split_candidate_or_keep(candidate[:-3], vocabulary), "n't"]
    apostrophe = candidate.rfind("'")
    if apostrophe > 0 and candidate[apostrophe:] in vocabulary:
        return [*_split_candidate_or_keep(candidate[:apostrophe], vocabulary), candidate[apostrophe:]]
    if candidate.endswith(".") and len(candidate) > 1:
        return [*_split_candidate_or_keep(candidate[:-1], vocabulary), "."]
    return _PIECE.findall(candidate)


def _split_candidate_or_keep(candidate: str, vocabulary: Mapping[str, int]) -> list[str]:
    if candidate in vocabulary:
        return [candidate]
    return _split_candidate(candidate, vocabulary)


def _stdlib_documents(root: Path) -> Iterator[Document]:
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_FOLDERS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        text = _module_docstrings(path)
        if text:
            yield Document(name=relative.as_posix(), text=text)


def _module_docstrings(path: Path) -> str:
    """Return the module, class and function docstrings of one source file in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError) as error:
        # A few files (encoding test data, Python 2 examples) are not valid Python 3.
        logger.debug("skipped %s: %s", path, error)
        return ""
    docstrings = [docstring for node in _documented_nodes(tree) if (docstring := ast.get_docstring(node))]
    return "\n\n".join(docstrings)


def _documented_nodes(
    node: ast.AST,
) -> Iterator[ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield node
    for child in ast.iter_child_nodes(node):
        yield from _documented_nodes(child)


def _topic_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(name=f"pydoc topic {name}", text=topics[name])


def _heldout_count(num_documents: int, fraction: float) -> int:
    if num_documents < 2:
        return 0
    return min(num_documents - 1, max(1, round(num_documents * fraction)))


def _concatenate(token_lists: list[np.ndarray]) -> Split:
    lengths = np.asarray([len(tokens) for tokens in token_lists], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    tokens = np.concatenate(token_lists) if token_lists else np.empty(0, dtype=np.int64)
    return Split(tokens=tokens, document_starts=starts)
