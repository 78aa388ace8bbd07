"""Every error path names its argument; malformed input never crashes."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he

import fuzzing

robe = he.RobeZ(100, 4)
full = he.FullTable([5, 7], 4)
M = robe.init_weight()
W = full.init_weight()
X = np.array([1, 2, 3])
O = np.array([0, 1])


@pytest.mark.parametrize("call, exc, match", [
    (lambda: he.embedding_bag(X.astype(np.float32), M, O, scheme=robe), TypeError, "indices"),
    (lambda: he.embedding_bag(X.astype(np.int16), M, O, scheme=robe), TypeError, "indices"),
    (lambda: he.embedding_bag(X, M.astype(np.int32), O, scheme=robe), TypeError, "weight"),
    (lambda: he.embedding_bag(X, M[:50], O, scheme=robe), ValueError, "weight"),
    (lambda: he.embedding_bag(X, M, O.astype(np.float64), scheme=robe), TypeError, "offsets"),
    (lambda: he.embedding_bag(X, M, np.array([1, 2]), scheme=robe), ValueError, r"offsets\[0\]"),
    (lambda: he.embedding_bag(X, M, np.array([0, 2, 1]), scheme=robe), ValueError, "non-decreasing"),
    (lambda: he.embedding_bag(X, M, np.array([0, 5]), scheme=robe), ValueError, "len\\(indices\\)"),
    (lambda: he.embedding_bag(X, M, np.array([[0, 1]]), scheme=robe), ValueError, "offsets"),
    (lambda: he.embedding_bag(X, M, scheme=robe), ValueError, "offsets"),
    (lambda: he.embedding_bag(X.reshape(1, 3), M, O, scheme=robe), ValueError, "offsets"),
    (lambda: he.embedding_bag(X.reshape(1, 1, 3), M, scheme=robe), ValueError, "indices"),
    (lambda: he.embedding_bag(X, M, O, scheme=robe, mode="median"), ValueError, "mode"),
    (lambda: he.embedding_bag(X, M, O, scheme=robe, mode="max",
                              per_sample_weights=np.ones(3)), ValueError, "per_sample_weights"),
    (lambda: he.embedding_bag(X, M, O, scheme=robe, per_sample_weights=np.ones(2)),
     ValueError, "per_sample_weights"),
    (lambda: he.embedding_bag(X, M, O, scheme=robe, per_sample_weights=np.ones(3, int)),
     TypeError, "per_sample_weights"),
    (lambda: he.embedding_bag(X, M, O, scheme="robe"), TypeError, "scheme"),
    (lambda: he.embedding_bag(X, M, O, scheme=robe, table=-1), ValueError, "table"),
    (lambda: he.embedding_bag(X, W, O, scheme=full, table=2), ValueError, "table"),
    (lambda: he.embedding_bag(np.array([5]), W, np.array([0]), scheme=full), IndexError, "indices"),
    (lambda: he.embedding_bag(np.array([-1]), W, np.array([0]), scheme=full), IndexError, "indices"),
    (lambda: he.embedding_bag(X, W, O, scheme=full, padding_idx=5), ValueError, "padding_idx"),
    (lambda: he.embedding_bag(X, [1.0, 2.0], O, scheme=robe), TypeError, "weight"),
    (lambda: he.embedding_bag(X, M, np.zeros(0, np.int64), scheme=robe,
                              include_last_offset=True), ValueError, "at least one offset"),
    (lambda: he.embedding_bags(np.arange(6), W, np.arange(7), scheme=full, num_tables=3),
     ValueError, "num_tables"),
    (lambda: he.embedding_bags(np.arange(6) % 5, W, np.arange(6), scheme=full, num_tables=2),
     ValueError, "offsets"),
    (lambda: he.embedding_bags(np.zeros((3, 4), np.int64), M, scheme=robe, num_tables=3),
     ValueError, "indices"),
    (lambda: he.embedding_bags(np.arange(7) % 5, W, np.arange(7), scheme=full, num_tables=0),
     ValueError, "num_tables"),
    (lambda: he.embedding_bag_backward(np.ones((2, 3)), X, O, scheme=robe), ValueError, "grad_output"),
    (lambda: he.embedding_bag_backward(np.ones((2, 4), int), X, O, scheme=robe), TypeError, "grad_output"),
    (lambda: he.embedding_bag_backward(np.ones((2, 4)), X, O, scheme=robe, mode="max"),
     ValueError, "weight"),
    (lambda: he.embedding_bag_backward(np.ones((2, 4)), X, O, scheme=robe, optimizer=he.SGD(1)),
     ValueError, "weight"),
    (lambda: he.embedding_bag_backward(np.ones((2, 4)), X, O, scheme=robe, weight=M[::1].copy(),
                                       optimizer="sgd"), TypeError, "optimizer"),
    (lambda: he.embedding_bag_backward(np.ones((2, 4), np.float32), X, O, scheme=robe,
                                       weight=np.zeros(200, np.float32)[::2],
                                       optimizer=he.SGD(1)), ValueError, "weight"),
    # a value past the end, then a smaller one: the first is named
    (lambda: he.embedding_bag(X, M, np.array([0, 5, 3]), scheme=robe,
                              include_last_offset=True), ValueError, "len\\(indices\\) = 3, got 5"),
    (lambda: he.embedding(X, np.zeros((0, 4), np.float32)), ValueError, "weight"),
    (lambda: he.embedding(X, np.zeros((4, 0), np.float32)), ValueError, "weight"),
    (lambda: he.embedding_backward(np.ones((3, 2)), X, 0), ValueError, "num_embeddings"),
    (lambda: he.embedding_backward(np.ones((3, 2)), X, 2.5), TypeError, "num_embeddings"),
    (lambda: he.multi_embedding(X.reshape(3, 1), np.zeros(8), 2.5, [1]), TypeError, "sizes"),
    (lambda: he.multi_embedding(X.reshape(3, 1), np.zeros(8), [8], None), TypeError, "dims"),
    # byte-swapped arrays (files written on another machine): named as such
    (lambda: he.embedding_bag(X.astype(">i8"), M, O, scheme=robe), TypeError,
     r"got dtype >i8 \(int64 in non-native byte order: convert with .astype\('int64'\)\)"),
    (lambda: he.embedding_bag(X, M.astype(">f4"), O, scheme=robe), TypeError, "weight: .*non-native"),
    (lambda: he.embedding_bag(X, M, O.astype(">i8"), scheme=robe), TypeError, "offsets: .*non-native"),
    (lambda: he.SGD(-1), ValueError, "lr"),
    (lambda: he.Adagrad(0.1, eps=float("nan")), ValueError, "eps"),
    (lambda: he.SGD("a"), TypeError, "lr"),
    # flags: a string such as "no" is not read as True
    (lambda: he.RobeZ(100, 4, signed="no"), TypeError, "signed: expected True or False"),
    (lambda: he.RobeZ(100, 4, wrap="False"), TypeError, "wrap: expected True or False"),
    (lambda: he.SGD(0.1, stochastic_rounding="no"), TypeError, "stochastic_rounding"),
    (lambda: he.embedding_bag(X, M, O, scheme=robe, include_last_offset="no"), TypeError,
     "include_last_offset"),
    (lambda: he.embedding_bag(X, M, O, scheme=robe, return_saved=2), TypeError, "return_saved"),
    (lambda: he.embedding_bag_backward(np.ones((2, 4), np.float32), X, O, scheme=robe,
                                       deterministic="yes"), TypeError, "deterministic"),
    (lambda: he.tt_embedding_bag(X, he.tt_init(10, [2, 5], [2, 2], [2]), O,
                                 include_last_offset="no"), TypeError, "include_last_offset"),
    # sizes, configs and options name themselves
    (lambda: he.FullTable(3.5, 4), TypeError, "num_embeddings: expected an integer"),
    (lambda: he.RobeZ.reference(100, 4, table_sizes=2.0), TypeError, "num_embeddings"),
    (lambda: he.tt_embedding_bag(X, he.tt_init(10, [2, 5], [2, 2], [2]), O,
                                 num_embeddings=5.0), TypeError, "num_embeddings"),
    (lambda: he.Scheme.from_config({"type": "RobeZ", "size": 10, "dim": 2, "bogus": 1}),
     ValueError, "config: .*unknown bogus"),
    (lambda: he.set_gpu_options(foo=1), TypeError, "options: .*unknown foo"),
    (lambda: he.theory.inner_product_variance([[1, 2], [3]], np.ones(2), 4, block=1),
     TypeError, "x: expected a real array"),
    (lambda: he.theory.monte_carlo("abc"), TypeError, "estimates"),
    (lambda: he.theory.inner_product_estimates(np.ones(4), np.ones(4), 16, block=2, seeds="a"),
     TypeError, "seeds"),
    (lambda: he.TTCache(2, 4, dtype=np.int32), TypeError, "dtype"),
    (lambda: he.TTCache(2, 4).populate(he.tt_init(100, [10, 10], [2, 2], [2]), "x"),
     TypeError, "num_embeddings"),
    (lambda: he.TTCache(2, 4).populate(he.tt_init(100, [10, 10], [2, 2], [2]), 101),
     ValueError, "num_embeddings"),
    (lambda: he.TTCache(2, 4).populate(he.tt_init(100, [10, 10], [2, 2], [2]), -5),
     ValueError, "num_embeddings"),
])
def test_error_paths(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_read_only_weight_for_optimizer():
    w = M.copy()
    w.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        he.embedding_bag_backward(np.ones((2, 4), np.float32), X, O, scheme=robe, weight=w,
                                  optimizer=he.SGD(0.1))


ARRAYS = st.one_of(
    st.none(),
    st.integers(-2**70, 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.lists(st.integers(-2**64, 2**64), max_size=5),
    st.builds(lambda v, d: np.array(v).astype(d),
              st.lists(st.integers(-2**63, 2**63 - 1), max_size=6),
              st.sampled_from([np.int8, np.int32, np.int64, np.uint64, np.float32,
                               np.float64, np.bool_])),
    st.builds(lambda shape: np.zeros(shape, np.int64),
              st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)),
)


@settings(max_examples=300, deadline=None)
@given(idx=ARRAYS, off=ARRAYS, psw=ARRAYS, grad=ARRAYS, table=ARRAYS, pad=ARRAYS,
       mode=st.sampled_from(["sum", "mean", "max", "x"]), which=st.integers(0, 5))
def test_fuzz_raises_python_errors_or_works(idx, off, psw, grad, table, pad, mode, which):
    # in-process: memory errors would crash the interpreter (and fail the run);
    # the subprocess test below repeats a sample under a fresh process
    schemes = [robe, full, he.HashedNet.reference(50, 4), he.RobeZ.reference(60, 4, 4)]
    s = schemes[which % 4]
    weight = W if s is full else s.init_weight()
    calls = [
        lambda: he.embedding_bag(idx, weight, off, scheme=s, table=table, mode=mode,
                                 per_sample_weights=psw, padding_idx=pad),
        lambda: he.embedding_bags(idx, weight, off, scheme=s, num_tables=2, mode=mode,
                                  per_sample_weights=psw),
        lambda: he.embedding_bag_backward(grad, idx, off, scheme=s, table=table, mode=mode,
                                          per_sample_weights=psw, padding_idx=pad,
                                          weight=weight.copy(), optimizer=he.Adagrad(0.1)),
        lambda: he.embedding_bags_backward(grad, idx, off, scheme=s, num_tables=2, mode=mode,
                                           weight=weight, per_sample_weights=psw),
        lambda: s.slots(idx, table=table),
        lambda: he.UniversalHash(0)(idx, 7, table=table),
    ]
    try:
        calls[which]()
    except (TypeError, ValueError, IndexError):
        pass


def test_fuzz_in_subprocess_never_crashes():
    """Bags of a sized and a hashed scheme, forward and max-mode backward, on
    random tokens and malformed offsets (tests/fuzzing.py), float32,
    float16 and bfloat16 arrays (and fused 16-bit steps, and row-wise
    Adagrad)."""
    fuzzing.run("""
        import numpy as np, hashemb as he, ml_dtypes
        rng = np.random.default_rng(0)
        s = he.FullTable([5, 7], 4); W = s.init_weight()
        r = he.RobeZ(64, 4); M = r.init_weight()
        W16, M16 = W.astype(np.float16), M.astype(np.float16)
        Wb, Mb = W.astype(ml_dtypes.bfloat16), M.astype(ml_dtypes.bfloat16)
        opt, ropt = he.Adagrad(0.1), he.RowwiseAdagrad(0.1)
        for it in range(3000):
            n = int(rng.integers(0, 8))
            idx = rng.integers(-2**62, 2**62, n) if it % 3 else rng.integers(-3, 9, n)
            off = np.sort(rng.integers(-2, n + 3, int(rng.integers(0, 5))))
            if it % 5 == 0:
                off = off[::-1].copy()
            for scheme, w in ((s, W), (r, M), (s, W16), (r, M16), (s, Wb), (r, Mb)):
                attempt(lambda: he.embedding_bags(idx, w, off, scheme=scheme, num_tables=2))
                attempt(lambda: he.embedding_bag_backward(
                    np.ones((max(len(off), 1), 4)), idx, off, scheme=scheme, mode="max",
                    weight=w))
            # 16-bit storage: the two-phase fused step
            for w in (M16, Mb):
                attempt(lambda: he.embedding_bag_backward(
                    np.ones((max(len(off), 1), 4), np.float32), idx, off, scheme=r, weight=w,
                    optimizer=opt))
            # row-wise Adagrad of the full tables (per-row sums), every dtype
            for w in (W, W16, Wb):
                attempt(lambda: he.embedding_bags_backward(
                    np.ones((max(len(off), 1), 8), np.float32), idx, off, scheme=s,
                    num_tables=2, weight=w, optimizer=ropt))
    """)

def test_fuzz_tt_and_lookups_in_subprocess_never_crash():
    """TT bags (forward, fused backward, collections, the LFU cache,
    tt_to_full) and plain / multi-table lookups on random and malformed
    indices, offsets, weights and sizes."""
    fuzzing.run("""
        import numpy as np, hashemb as he
        rng = np.random.default_rng(0)
        cores = he.tt_init(100, [10, 10], [2, 2], [3])
        cores2 = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4])
        Wt = rng.standard_normal((50, 8)).astype(np.float32)
        sizes, dims = [5, 30, 7], [1, 8, 4]
        Wm = rng.standard_normal(sum(s * d for s, d in zip(sizes, dims))).astype(np.float32)

        def keys(n, it):
            k = it % 4
            if k == 0:
                return rng.integers(-3, 120, n)
            if k == 1:
                return rng.integers(-2**62, 2**62, n)
            if k == 2:
                return rng.integers(0, 100, n).astype(np.int32)
            return rng.integers(0, 1000, n).astype(np.uint64)

        for it in range(3000):
            n = int(rng.integers(0, 9))
            idx = keys(n, it)
            off = np.sort(rng.integers(-2, n + 3, int(rng.integers(0, 5))))
            if it % 5 == 0:
                off = off[::-1].copy()
            if it % 7 == 0:
                off = None
            B = max(len(off) if off is not None else n, 1)
            psw = rng.standard_normal(n).astype(np.float32) if it % 3 == 0 else None
            mode = ["sum", "mean", "max"][it % 3]
            ne = [None, 50, 100, 101, -1][it % 5]
            pairs = idx.reshape(-1, 2) if n % 2 == 0 and n else idx
            triples = idx.reshape(-1, 3) if n % 3 == 0 else idx
            attempt(lambda: he.tt_embedding_bag(idx, cores, off, mode=mode,
                                                per_sample_weights=psw, num_embeddings=ne))
            attempt(lambda: he.tt_embedding_bag_backward(
                np.ones((B, 4), np.float32), idx, cores, off, mode=mode,
                per_sample_weights=psw, optimizer=he.Adagrad(0.1)))
            attempt(lambda: he.tt_embedding_bags(pairs, [cores, cores2], off))
            attempt(lambda: he.tt_embedding_bags_backward(
                np.ones((B, 12), np.float32), idx, [cores, cores2], off, optimizer=he.SGD(0.1)))
            attempt(lambda: he.embedding(idx, Wt))
            attempt(lambda: he.embedding_backward(np.ones((n, 8), np.float32), idx, 50))
            attempt(lambda: he.multi_embedding(triples, Wm, sizes, dims))
            attempt(lambda: he.multi_embedding_backward(
                np.ones((max(n // 3, 1), 13), np.float32), triples, sizes, dims))
            attempt(lambda: he.tt_to_full(cores, ne))
            attempt(lambda: he.tt_embedding_bag(idx, cores, off, cache=he.TTCache(cores, 5)))
    """)


def test_one_token_keeps_its_shape():
    # np.ascontiguousarray made a 0-d index 1-d: one row came back as (1, D)
    # and its backward refused the (D,) gradient
    W = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(he.embedding(np.array(2), W), W[2])
    g = he.embedding_backward(np.ones(3, np.float32), np.array(1), 5)
    assert g.shape == (5, 3) and g[1].tolist() == [1, 1, 1] and g.sum() == 3
    r = he.RobeZ(100, 8)
    assert r.slots(np.int64(3)).shape == (8,) and r.signs(3).shape == (8,)
    np.testing.assert_array_equal(r.slots(np.int64(3)), r.slots(np.array([3]))[0])
    h = he.UniversalHash(1)
    assert h(np.array(5), 100).shape == () and h(np.array(5), 100) == h(np.array([5]), 100)[0]


def test_uint64_tokens_are_named_as_given():
    f = he.FullTable([10], 4)
    with pytest.raises(IndexError, match=r"got 9223372036854775809$"):
        he.embedding_bag(np.array([2**63 + 1], np.uint64), f.init_weight(), np.array([0]),
                         scheme=f)
    with pytest.raises(IndexError, match=r"got -3$"):
        he.embedding_bag(np.array([-3]), f.init_weight(), np.array([0]), scheme=f)
    with pytest.raises(ValueError, match="padding_idx: expected -10 <= padding_idx < 10"):
        he.embedding_bag(np.array([3]), f.init_weight(), np.array([0]), scheme=f,
                         padding_idx=2**64 - 1)
    # a hashed scheme's padding token may be any 64-bit value, unsigned too
    r = he.RobeZ(100, 4)
    W = r.init_weight()
    np.testing.assert_array_equal(
        he.embedding_bag(np.array([2**64 - 1, 5], np.uint64), W, np.array([0]), scheme=r,
                         padding_idx=2**64 - 1),
        he.embedding_bag(np.array([5]), W, np.array([0]), scheme=r))


def test_reference_maps_take_every_nonnegative_token():
    # the bound was 2**63 - 1, exclusive: the largest token was refused
    for s in (he.HashedNet.reference(100, 4), he.RobeZ.reference(100, 4)):
        assert s.slots(np.array([2**63 - 1, 0])).shape == (2, 4)
        with pytest.raises(IndexError, match=r"expected 0 <= index < 9223372036854775808 "
                                             r"\(table 0\), got -1"):
            s.slots(np.array([-1]))
        W = s.init_weight()
        he.embedding_bag(np.array([2**63 - 1]), W, np.array([0]), scheme=s)


def test_embedding_backward_names_grad_output_width():
    with pytest.raises(ValueError, match=r"grad_output: expected .* dim >= 1, got \(2, 0\)"):
        he.embedding_backward(np.ones((2, 0), np.float32), np.array([1, 1]), 10)


def test_per_sample_weights_longer_than_indices_is_an_error():
    full = he.FullTable([10], 4)
    W = full.init_weight()
    idx, off = np.array([1, 2, 3]), np.array([0, 2])
    with pytest.raises(ValueError, match="per_sample_weights: expected 3 weights"):
        he.embedding_bag(idx, W, off, scheme=full, per_sample_weights=np.ones(4, np.float32))
