"""Tests beside tests/test_tt.py, each killing a mutant that survived the suite
(mutation round 3, of hashemb/torch/tt.py)."""
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from hashemb import tt as _tt
from hashemb.torch import TTEmbeddingBag, TTEmbeddingBagCollection
from hashemb.torch.tt import tt_ranks_for_compression


def test_collection_tables_are_seeded_apart():
    # table t is tt_init(..., seed=seed + t): two tables of one size are not
    # copies of each other (identical tables would be one table's capacity)
    emb = TTEmbeddingBagCollection([300, 300, 120], 8, [3, 3], seed=5, dtype=torch.float64)
    W = emb.full_weights()
    assert not torch.equal(W[0], W[1])
    d = emb._ncores
    for t, n in enumerate(emb.num_embeddings):
        want = _tt.tt_init(n, emb.tt_p_shapes[t], emb.tt_q_shapes[t], emb.tt_ranks,
                           "approx-normal", seed=5 + t, dtype=np.float64)
        for got, c in zip(emb.tt_cores[t * d:(t + 1) * d], want):
            np.testing.assert_array_equal(got.detach().numpy(), c)


@pytest.mark.parametrize("cols", [1, 3])
def test_collection_2d_input_needs_one_column_per_table(cols):
    emb = TTEmbeddingBagCollection([50, 20], 4, [2, 2])
    with pytest.raises(ValueError, match=r"input: expected shape \(B, 2\)"):
        emb(torch.zeros((4, cols), dtype=torch.int64))


def test_extra_state_with_more_rows_than_the_cache_is_refused():
    kw = dict(use_cache=True, cache_size=2, seed=1)
    a = TTEmbeddingBag(500, 8, [4, 4], **kw)
    state = a.get_extra_state()
    rows = state["caches"][0]["rows"]
    state["caches"][0]["rows"] = torch.arange(3, dtype=rows.dtype)
    b = TTEmbeddingBag(500, 8, [4, 4], **kw)
    with pytest.raises(ValueError, match="expected at most cache_size = 2 cached rows, got 3"):
        b.set_extra_state(state)
    b.set_extra_state(a.get_extra_state())          # the module's own state loads


def _tt_params(sizes, D, d, r):
    tot = 0
    for n in sizes:
        p, q = _tt.tt_shapes(n, D, d)
        R = [1] + [r] * (d - 1) + [1]
        tot += sum(p[k] * R[k] * q[k] * R[k + 1] for k in range(d))
    return tot


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=3),
       D=st.sampled_from([4, 8, 16]), d=st.integers(2, 4), r0=st.integers(2, 12))
def test_ranks_for_compression_takes_a_rank_exactly_at_the_budget(sizes, D, d, r0):
    # "at most sum(n) * D / compression floats": a rank whose tables hold
    # exactly the budget is taken
    S = sum(sizes) * D
    p = _tt_params(sizes, D, d, r0)
    assume(p < S)
    compression = S / p
    assume(S / compression == p)          # the budget is exactly p floats
    assume(_tt_params(sizes, D, d, r0 + 1) > p)
    assert tt_ranks_for_compression(sizes, D, compression, num_cores=d) == [r0] * (d - 1)


@pytest.mark.parametrize("bad", [500, 10**6, -1])
def test_out_of_range_tokens_are_not_counted_by_the_lfu_cache(bad):
    # a call refused for an out-of-range token leaves the frequencies alone
    # (counted, it would later be cached as a row the table does not have)
    emb = TTEmbeddingBag(500, 8, [4, 4], use_cache=True, cache_size=4, seed=1)
    emb.train()
    emb(torch.tensor([[3, 3, 7]]))
    c = emb._cache_objs[0]
    keys, freq = c.keys.copy(), c.freq.copy()
    with pytest.raises(IndexError):
        emb(torch.tensor([[bad, bad, bad]]))
    np.testing.assert_array_equal(c.keys, keys)
    np.testing.assert_array_equal(c.freq, freq)
    emb.cache_populate()
    assert {r for r in c.rows.tolist() if r >= 0} == {3, 7}      # (-1: a free slot)
