"""Tests of the MIDX proposal: closed-form log Q, draw frequencies, updates and edge cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from midx_service.core import IndexConfig, MidxIndex
from midx_service.errors import InvalidArgumentError
from tests.core.conftest import assert_draws_follow, brute_force_log_q, exact_log_softmax

VARIANTS = list(itertools.product(["rq", "pq"], ["uniform", "popularity"], ["dot", "cosine"]))


def build(table: torch.Tensor, weights: torch.Tensor | None = None, **options: object) -> MidxIndex:
    config = IndexConfig(dim=table.shape[1], **options)  # type: ignore[arg-type]
    return MidxIndex.build(config, table, weights, seed=3)


@pytest.mark.parametrize(("quantizer", "last_stage", "metric"), VARIANTS)
def test_log_prob_matches_brute_force(quantizer, last_stage, metric, table, queries, weights):
    index = build(table, weights, num_codewords=6, quantizer=quantizer, last_stage=last_stage, metric=metric)
    all_ids = torch.arange(index.num_classes).expand(queries.shape[0], -1)

    log_q = index.log_prob(queries, all_ids)
    expected = brute_force_log_q(index, queries)

    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(log_q), finite)
    torch.testing.assert_close(log_q.double()[finite], expected[finite], atol=1e-5, rtol=0)
    total = log_q.double().exp().sum(dim=1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("quantizer", "last_stage", "metric"), VARIANTS)
def test_sample_log_q_matches_brute_force(quantizer, last_stage, metric, table, queries, weights):
    index = build(table, weights, num_codewords=6, quantizer=quantizer, last_stage=last_stage, metric=metric)

    result = index.sample(queries, 50, positives=torch.arange(5).unsqueeze(1), seed=1)

    expected = brute_force_log_q(index, queries)
    torch.testing.assert_close(result.log_q.double(), expected.gather(1, result.ids), atol=1e-5, rtol=0)
    assert result.positive_log_q is not None
    torch.testing.assert_close(
        result.positive_log_q.double(), expected.gather(1, torch.arange(5).unsqueeze(1)), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(("quantizer", "last_stage"), [("rq", "uniform"), ("pq", "popularity")])
def test_draw_frequencies_follow_q(quantizer, last_stage, weights):
    table = torch.randn(60, 4, generator=torch.Generator().manual_seed(5))
    index = build(table, weights[:60], num_codewords=4, quantizer=quantizer, last_stage=last_stage)
    query = torch.randn(1, 4, generator=torch.Generator().manual_seed(6))

    result = index.sample(query, 200_000, seed=2)

    assert_draws_follow(result.ids, brute_force_log_q(index, query)[0].exp())


@pytest.mark.parametrize("last_stage", ["uniform", "popularity"])
def test_exclusion_draws_follow_renormalised_q(last_stage, weights):
    table = torch.randn(40, 4, generator=torch.Generator().manual_seed(8))
    index = build(table, weights[1:41], num_codewords=3, last_stage=last_stage)
    query = torch.randn(1, 4, generator=torch.Generator().manual_seed(9))
    full = brute_force_log_q(index, query)[0].exp()
    # Exclude the most likely class, a duplicate of it and one of its cell-mates.
    top = int(full.argmax())
    cell_mates = ((index.codes == index.codes[top]).all(dim=1)).nonzero().squeeze(1)
    positives = torch.tensor([[top, top, int(cell_mates[-1])]])

    result = index.sample(query, 100_000, positives=positives, exclude_positives=True, seed=4)

    renormalised = full.clone()
    renormalised[positives[0]] = 0.0
    renormalised /= renormalised.sum()
    assert not bool(torch.isin(result.ids, positives).any())
    assert_draws_follow(result.ids, renormalised)
    torch.testing.assert_close(result.log_q.double(), renormalised.log()[result.ids], atol=1e-5, rtol=0)


def test_exactly_representable_table_gives_exact_softmax():
    first = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    second = torch.tensor([[1.0, 2.0], [-2.0, 1.0], [0.5, -1.5]])
    table = torch.stack([torch.cat([first[a], second[b]]) for a in range(3) for b in range(3) for _ in range(4)])
    index = build(table, num_codewords=3, quantizer="pq")
    queries = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.3
    all_ids = torch.arange(index.num_classes).expand(4, -1)

    assert index.quantization_error < 1e-6
    torch.testing.assert_close(
        index.log_prob(queries, all_ids).double(), exact_log_softmax(table, queries), atol=1e-5, rtol=0
    )


def test_residual_quantisation_of_representable_table_is_exact():
    coarse = torch.tensor([[20.0, 0.0, 0.0], [0.0, 20.0, 0.0], [0.0, 0.0, 20.0]])
    fine = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    table = torch.stack([coarse[a] + fine[b] for a in range(3) for b in range(3)])
    index = build(table, num_codewords=3, quantizer="rq")
    queries = torch.randn(3, 3, generator=torch.Generator().manual_seed(2)) * 0.2

    assert index.quantization_error < 1e-6
    torch.testing.assert_close(
        index.log_prob(queries, torch.arange(9).expand(3, -1)).double(),
        exact_log_softmax(table, queries),
        atol=1e-5,
        rtol=0,
    )


def test_single_codeword_samples_uniformly(table, queries):
    index = build(table, num_codewords=1)

    log_q = index.log_prob(queries, torch.arange(300).expand(5, -1))
    result = index.sample(queries[:1], 60_000, seed=3)

    torch.testing.assert_close(log_q, torch.full_like(log_q, -math.log(300)))
    assert_draws_follow(result.ids, torch.full((300,), 1 / 300))


def test_tail_class_log_q_stays_finite():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    index = build(table, num_codewords=2)
    query = torch.tensor([[200.0, 0.0]])

    log_q = index.log_prob(query, [[0, 1]])

    torch.testing.assert_close(log_q, torch.tensor([[0.0, -200.0]]), atol=1e-4, rtol=0)


def test_sample_large_norm_queries(table):
    index = build(table, num_codewords=6)
    queries = torch.randn(3, 8, generator=torch.Generator().manual_seed(4)) * 300

    result = index.sample(queries, 20, seed=5)

    expected = brute_force_log_q(index, queries)
    assert bool(torch.isfinite(result.log_q).all())
    torch.testing.assert_close(result.log_q.double(), expected.gather(1, result.ids), atol=1e-3, rtol=1e-5)
    assert bool((expected.gather(1, result.ids) > -30).all()), "draws must come from the high-probability region"


def test_update_rows_matches_brute_force_on_new_table(table, queries, weights):
    index = build(table, weights, num_codewords=6, last_stage="popularity")
    old_log_q = index.log_prob(queries, torch.arange(300).expand(5, -1))
    ids = torch.tensor([3, 299, 300, 301])
    rows = torch.randn(4, 8, generator=torch.Generator().manual_seed(8)) * 3
    new_weights = torch.tensor([0.0, 2.0, 1.0, 4.0], dtype=torch.float64)

    updated = index.update_rows(ids, rows, new_weights)

    assert updated.num_classes == 302
    torch.testing.assert_close(updated.embeddings[ids], rows)
    torch.testing.assert_close(updated.codes[ids], updated.codebooks.encode(rows))
    all_ids = torch.arange(302).expand(5, -1)
    expected = brute_force_log_q(updated, queries)
    log_q = updated.log_prob(queries, all_ids)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(log_q.double()[finite], expected[finite], atol=1e-5, rtol=0)
    assert bool(torch.isneginf(log_q[:, 3]).all()), "a class whose weight became 0 can never be drawn"
    # The old snapshot is untouched.
    assert index.num_classes == 300
    torch.testing.assert_close(index.log_prob(queries, torch.arange(300).expand(5, -1)), old_log_q)


def test_update_tracks_quantisation_error(table):
    index = build(table, num_codewords=4)
    drifted = table + torch.randn(1, 8, generator=torch.Generator().manual_seed(3)) * 3

    updated = index.update_rows(torch.arange(300), drifted)

    assert updated.quantization_error > index.quantization_error
    assert updated.fit_quantization_error == index.fit_quantization_error
    refitted = updated.refit()
    assert refitted.quantization_error < updated.quantization_error
    assert refitted.fit_quantization_error == pytest.approx(refitted.quantization_error)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([1, 1], "more than once"),
        ([-1], "ids must be in"),
        ([302], "next ids"),
    ],
)
def test_update_rejects_bad_ids(table, ids, message):
    index = build(table, num_codewords=4)

    with pytest.raises(InvalidArgumentError, match=message):
        index.update_rows(ids, torch.zeros(len(ids), 8))


def test_update_rejects_nan_rows(table):
    index = build(table, num_codewords=4)
    rows = torch.zeros(2, 8)
    rows[1, 3] = math.nan

    with pytest.raises(InvalidArgumentError, match="row 1 contains NaN"):
        index.update_rows([0, 1], rows)


def test_same_seed_gives_same_draws(table, queries):
    index = build(table, num_codewords=6)

    first = index.sample(queries, 30, seed=9)
    second = index.sample(queries, 30, seed=9)
    third = index.sample(queries, 30, seed=10)

    assert torch.equal(first.ids, second.ids)
    assert not torch.equal(first.ids, third.ids)


def test_state_dict_round_trip_samples_identically(table, queries, weights):
    index = build(table, weights, num_codewords=5, last_stage="popularity", quantizer="pq")

    restored = MidxIndex.from_state_dict(index.state_dict())

    assert torch.equal(restored.sample(queries, 40, seed=1).ids, index.sample(queries, 40, seed=1).ids)
    assert restored.config == index.config


@pytest.mark.parametrize(
    "table",
    [
        torch.ones(1, 4),  # N = 1
        torch.randn(5, 4, generator=torch.Generator().manual_seed(1)),  # N < K
        torch.ones(50, 4) * 2.5,  # all rows equal
        torch.zeros(20, 4),  # all rows zero
        torch.cat([torch.zeros(10, 4), torch.randn(10, 4, generator=torch.Generator().manual_seed(2))]),
        torch.randn(30, 4, generator=torch.Generator().manual_seed(3)).repeat(3, 1),  # duplicate rows
        torch.randn(40, 4, generator=torch.Generator().manual_seed(4)) * 1e6,  # large norms
    ],
    ids=["one-row", "fewer-rows-than-codewords", "all-equal", "all-zero", "some-zero", "duplicates", "large-norm"],
)
def test_degenerate_tables_build_and_sample(table):
    index = build(table, num_codewords=8)
    # Keep logits of order 1 so float32 scores can be compared with the float64 brute force.
    scale = max(1.0, float(table.norm(dim=1).max()))
    queries = torch.randn(3, 4, generator=torch.Generator().manual_seed(5)) / scale

    result = index.sample(queries, 7, seed=1)

    assert not bool(torch.isnan(index.codebooks.first).any() or torch.isnan(index.codebooks.second).any())
    assert result.ids.shape == (3, 7)
    assert bool(((result.ids >= 0) & (result.ids < table.shape[0])).all())
    expected = brute_force_log_q(index, queries)
    torch.testing.assert_close(result.log_q.double(), expected.gather(1, result.ids), atol=1e-4, rtol=1e-6)


def test_zero_weight_classes_are_never_drawn(table, weights):
    index = build(table, weights, num_codewords=4, last_stage="popularity")
    queries = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))

    result = index.sample(queries, 5_000, seed=2)

    assert not bool((weights[result.ids] == 0).any())
    assert bool(torch.isneginf(index.log_prob(queries, torch.arange(0, 300, 7).expand(4, -1))).all())


def test_empty_batch_returns_empty_result(table):
    index = build(table, num_codewords=4)

    result = index.sample(torch.empty(0, 8), 10, positives=torch.empty(0, 2, dtype=torch.int64))

    assert result.ids.shape == (0, 10)
    assert result.log_q.shape == (0, 10)
    assert result.positive_log_q is not None
    assert result.positive_log_q.shape == (0, 2)


@pytest.mark.parametrize("num_samples", [1, 10_000])
def test_sample_sizes(table, queries, num_samples):
    index = build(table, num_codewords=4)

    result = index.sample(queries, num_samples, seed=1)

    assert result.ids.shape == (5, num_samples)
    expected = brute_force_log_q(index, queries)
    torch.testing.assert_close(result.log_q.double(), expected.gather(1, result.ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("queries", "options", "message"),
    [
        (torch.tensor([[0.0] * 8, [math.nan] + [0.0] * 7]), {}, "queries row 1 contains NaN"),
        (torch.tensor([[math.inf] * 8]), {}, "queries row 0 contains NaN or Inf"),
        (torch.zeros(2, 7), {}, "7 columns, the index has dim 8"),
        (torch.zeros(8), {}, "2-D array"),
        (torch.zeros(2, 8), {"num_samples": 0}, "num_samples must be an integer >= 1"),
        (torch.zeros(2, 8), {"positives": [[0], [300]]}, "id 300"),
        (torch.zeros(2, 8), {"positives": [[0]]}, r"shape \(2, P\)"),
        (torch.zeros(2, 8), {"exclude_positives": True}, "needs positives"),
        (torch.zeros(2, 8), {"sampler": "softmax"}, "sampler must be one of"),
    ],
)
def test_sample_rejects_bad_input(table, queries, options, message):
    index = build(table, num_codewords=4)
    arguments = {"num_samples": 3, **options}

    with pytest.raises(InvalidArgumentError, match=message):
        index.sample(queries, **arguments)  # type: ignore[arg-type]


def test_excluding_every_class_is_rejected():
    index = build(torch.randn(3, 2, generator=torch.Generator().manual_seed(1)), num_codewords=2)

    with pytest.raises(InvalidArgumentError, match="query 1: excluding its positives leaves no class"):
        index.sample(torch.zeros(2, 2), 4, positives=[[0, 0, 1], [0, 1, 2]], exclude_positives=True)


@pytest.mark.parametrize(
    ("options", "weights", "message"),
    [
        ({"last_stage": "popularity"}, None, "needs weights"),
        ({"last_stage": "popularity"}, torch.zeros(300), "all 0"),
        ({}, -torch.ones(300), "finite and >= 0"),
        ({}, torch.ones(299), r"shape \(300,\)"),
    ],
)
def test_build_rejects_bad_weights(table, options, weights, message):
    with pytest.raises(InvalidArgumentError, match=message):
        build(table, weights, **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_codewords": 0}, "num_codewords"),
        ({"quantizer": "opq"}, "quantizer must be one of"),
        ({"metric": "l2"}, "metric must be one of"),
        ({"last_stage": "weighted"}, "last_stage must be one of"),
    ],
)
def test_config_rejects_bad_options(options, message):
    with pytest.raises(InvalidArgumentError, match=message):
        IndexConfig(dim=8, **options)


def test_update_keeps_quantisation_error_exact(table):
    index = build(table, num_codewords=4)
    rows = torch.randn(30, 8, generator=torch.Generator().manual_seed(4)) * 4
    rows[3] = 0.0

    updated = index.update_rows(torch.cat([torch.arange(0, 50, 2), torch.arange(300, 305)]), rows)

    rebuilt = MidxIndex.from_state_dict(updated.state_dict())
    assert updated.quantization_error == pytest.approx(rebuilt.quantization_error, rel=1e-9)


def test_update_within_cells_shares_cell_structure(table, queries):
    index = build(table, num_codewords=4)
    ids = torch.tensor([5, 17])
    # A row moved a tiny step towards its own reconstruction keeps both of its codes.
    rows = table[ids] + 1e-4 * (index.codebooks.reconstruct(index.codes[ids]) - table[ids])

    updated = index.update_rows(ids, rows)

    assert updated.cells is index.cells
    torch.testing.assert_close(updated.embeddings[ids], rows)
    expected = brute_force_log_q(updated, queries)
    torch.testing.assert_close(
        updated.log_prob(queries, torch.arange(300).expand(5, -1)).double(), expected, atol=1e-5, rtol=0
    )


def test_build_copies_the_callers_table(table, queries):
    array = table.numpy().copy()
    index = build(torch.from_numpy(array), num_codewords=4)
    before = index.log_prob(queries, torch.arange(300).expand(5, -1))

    array[:] = 0.0

    torch.testing.assert_close(index.log_prob(queries, torch.arange(300).expand(5, -1)), before)


def test_read_only_input_is_accepted_without_warning(table, queries, recwarn):
    array = table.numpy().copy()
    array.flags.writeable = False

    index = build(array, num_codewords=4)
    index.sample(queries.numpy(), 3, seed=1)

    assert not [warning for warning in recwarn if "not writable" in str(warning.message)]


@pytest.mark.parametrize(("quantizer", "last_stage", "metric"), VARIANTS)
def test_log_prob_all_matches_log_prob(quantizer, last_stage, metric, table, queries, weights):
    index = build(table, weights, num_codewords=5, quantizer=quantizer, last_stage=last_stage, metric=metric)

    every = index.log_prob_all(queries)

    torch.testing.assert_close(every, index.log_prob(queries, torch.arange(300).expand(5, -1)), atol=1e-6, rtol=0)
