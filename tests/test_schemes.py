import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy import stats

import hashemb as he
from hashemb._backend import kernels
from reference import slots_signs

TOKENS = st.lists(st.integers(-(1 << 63), (1 << 63) - 1), min_size=1, max_size=12)


@st.composite
def robe_schemes(draw):
    dim = draw(st.sampled_from([1, 2, 4, 8, 16, 12]))
    mult = draw(st.booleans())
    divs = [z for z in range(1, dim + 1) if dim % z == 0]
    block = draw(st.sampled_from([dim * k for k in (2, 4)] if mult else divs))
    size = draw(st.integers(block, 5000))
    return he.RobeZ(size, dim, block=block, seed=draw(st.integers(0, 2**64 - 1)),
                    signed=draw(st.booleans()), wrap=draw(st.booleans()))


@given(scheme=robe_schemes(), tokens=TOKENS, table=st.integers(0, 30))
def test_robe_slots_and_signs_match_reference(scheme, tokens, table):
    x = np.array(tokens, np.int64)
    S, G = slots_signs(scheme, x, [table] * len(x))
    assert (scheme.slots(x, table=table) == S).all()
    assert (scheme.signs(x, table=table) == G).all()
    assert ((S >= 0) & (S < scheme.size)).all()


@given(size=st.one_of(st.integers(2, 2**61 - 1), st.integers(2, 2**31 + 4),
                      st.sampled_from([2, 3, 2**30, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32,
                                       2**32 + 1, 2**60 + 3, 2**61 - 2, 2**61 - 1])),
       dim=st.sampled_from([4, 6, 8, 16, 24, 33, 256]), seed=st.integers(0, 2**64 - 1),
       tokens=st.lists(st.integers(-(1 << 31), (1 << 31) - 1), min_size=1, max_size=12),
       wide=st.booleans(), tables=st.lists(st.integers(0, 30), min_size=1, max_size=3))
def test_many_runs_match_reference_at_any_size(size, dim, seed, tokens, wide, tables):
    # rows of several runs (HashedNet: D runs of one float; ROBE-Z with Z = 2
    # or 3) take the batched run starts (he_runs_starts: with AVX2 four rows
    # hashed at once and, below 2^31 floats, eight runs a step in 32-bit lanes,
    # R = 2, 4, 8 packed, R = 16, 24, 256 a row at a time, 256 past the
    # eight-lane limit): the reference's slots up to the largest array (P - 1
    # floats), with scalar tails (n mod 4 rows, D 6, 33), int32 and int64
    # tokens, and a table change inside a batch
    x = np.array(tokens, np.int64 if wide else np.int32)
    tab = [tables[i * len(tables) // len(x)] for i in range(len(x))]
    block = 2 if dim % 2 == 0 else 3
    for scheme in [he.HashedNet(size, dim, seed=seed)] + (
            [he.RobeZ(size, dim, block=b, seed=seed) for b in (block, 4) if dim % b == 0
             and size >= b]):
        S, _ = slots_signs(scheme, x, tab)
        if len(set(tab)) == 1:
            assert (scheme.slots(x, table=tab[0]) == S).all()
        got = np.empty((len(x), dim), np.int64)     # the kernel, tables changing in a batch
        kernels().slots(scheme._view, x, np.array(tab, np.int64), got)
        assert (got == S).all()


@pytest.mark.parametrize("size", [2**30 + 3, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5])
def test_many_runs_at_the_32_bit_limits(size):
    # the eight-lane run starts add two residues below m in 32 bits: exact
    # below 2^31 floats, and the scalar path from there on (sums up to 2^33)
    rng = np.random.default_rng(size)
    x = rng.integers(0, 2**62, 64)
    for scheme in [he.HashedNet(size, 16, seed=1), he.HashedNet(size, 24, seed=2),
                   he.RobeZ(size, 16, block=4, seed=3), he.RobeZ(size, 8, block=4, seed=4),
                   he.RobeZ(size, 16, block=2, seed=5)]:
        S, _ = slots_signs(scheme, x, [3] * len(x))
        assert (scheme.slots(x, table=3) == S).all()


@given(size=st.integers(1, 10**6), dim=st.integers(1, 20),
       tokens=st.lists(st.integers(0, 2**40), min_size=1, max_size=8))
def test_hashednet_reference_map(size, dim, tokens):
    hn = he.HashedNet.reference(size, dim)
    S, _ = slots_signs(hn, tokens, [0] * len(tokens))
    assert (hn.slots(np.array(tokens)) == S).all()
    # the table id is not hashed in the original
    assert (hn.slots(np.array(tokens), table=5) == S).all()


@given(size=st.integers(64, 10**6), block=st.sampled_from([1, 2, 4, 8, 16, 32]),
       sizes=st.one_of(st.none(), st.lists(st.integers(1, 1000), min_size=1, max_size=4)),
       data=st.data())
def test_robe_reference_map(size, block, sizes, data):
    ref = he.RobeZ.reference(size, 16, block=block, table_sizes=sizes)
    table = data.draw(st.integers(0, len(sizes) - 1)) if sizes else 0
    hi = sizes[table] if sizes else 10**9
    tokens = data.draw(st.lists(st.integers(0, hi - 1), min_size=1, max_size=6))
    S, _ = slots_signs(ref, tokens, [table] * len(tokens))
    assert (ref.slots(np.array(tokens), table=table) == S).all()


def test_robe_reference_constants():
    # ALGORITHMS.md: R = RandomState(1024).randint(0, P, 50), R[:3] fixed
    ref = he.RobeZ.reference(1000, 8, block=4)
    assert ref._coef[:3].tolist() == [634329019, 1825252241, 871205356]
    # token 0, block 0: key = R[0] mod P, slot = key mod (m - Z + 1)
    assert ref.slots(np.array([0]))[0, :4].tolist() == [634329019 % 997 + i for i in range(4)]


def test_reference_seed_and_zero_d_scales_are_checked_by_name():
    # (NumPy's "Seed must be between 0 and 2**32 - 1" and "len() of unsized object")
    with pytest.raises(ValueError, match=r"seed: expected 0 <= seed < 4294967296"):
        he.RobeZ.reference(1000, 8, block=4, seed=2**32)
    assert he.RobeZ.reference(1000, 8, block=4, seed=2**32 - 1).seed == 2**32 - 1
    w = he.RobeZ(1000, 8).init_weight(scale=np.array(0.25))
    assert np.abs(w).max() <= 0.25 and np.abs(w).max() > 0.2
    w = he.FullTable([3, 5], 4).init_weight(scale=np.array([0.5, 0.0]))
    assert (w[3:] == 0).all() and np.abs(w[:3]).max() > 0.3
    assert he.SGD(np.array(0.1)).lr == 0.1


def test_full_table_layout():
    full = he.FullTable([3, 5, 2], 4)
    assert full.size == 40 and full.weight_shape == (10, 4)
    s = full.slots(np.array([0, 4]), table=1)
    assert s.tolist() == [[12, 13, 14, 15], [28, 29, 30, 31]]
    with pytest.raises(IndexError, match="table 1"):
        full.slots(np.array([5]), table=1)
    with pytest.raises(IndexError):
        full.slots(np.array([-1]), table=0)
    with pytest.raises(ValueError, match="table"):
        full.slots(np.array([0]), table=3)


@pytest.mark.parametrize("itype", [np.int32, np.int64])
def test_full_table_rows_past_2_32(itype):
    # the kernels take a full table's starts four rows a step with AVX2, as
    # two 32-bit products: rows from 2^32 on need the high one (no weight
    # is made, so a table of 2^33 rows costs nothing)
    full = he.FullTable([3, 2 ** 33], 16)
    x = np.array([0, 5, 2 ** 31 - 1, 7, 2 ** 32 + 5, 2 ** 33 - 1, 2 ** 32, 1, 2 ** 32 - 1],
                 np.int64)
    x = x[x <= np.iinfo(itype).max].astype(itype)
    want = [[(3 + int(v)) * 16 + i for i in range(16)] for v in x]
    assert full.slots(x, table=1).tolist() == want


@given(scheme=robe_schemes(), tokens=TOKENS, table=st.integers(0, 5))
def test_blocks_are_contiguous_and_wrap(scheme, tokens, table):
    S = scheme.slots(np.array(tokens, np.int64), table=table)
    L = min(scheme.block, scheme.dim)
    runs = S.reshape(len(tokens), -1, L)
    step = (runs - runs[..., :1]) % scheme.size
    assert (step == np.arange(L)).all()            # each block reads consecutive slots
    if not scheme.wrap:                            # ... and never wraps when asked
        assert (np.diff(runs, axis=-1) == 1).all()


def test_wrap_around_reads_the_start():
    robe = he.RobeZ(37, 16, block=16, seed=4)
    S = robe.slots(np.arange(5000))
    wrapped = S[(S[:, 0] + 15) >= 37]
    assert len(wrapped) > 0
    assert ((wrapped - wrapped[:, :1]) % 37 == np.arange(16)).all()
    assert (wrapped.min(1) == 0).all()


def test_wide_blocks_share_rows():
    robe = he.RobeZ(1000, 4, block=16, seed=1)          # r = 4 rows per block
    S = robe.slots(np.arange(8))
    # rows 0..3 share a block: one run of 16 consecutive slots
    assert (((S[:4].reshape(-1) - S[0, 0]) % 1000) == np.arange(16)).all()


def test_block_offsets_are_uniform():
    # chi-square at a fixed seed: block starts over 50 equal bins
    robe = he.RobeZ(100_000, 16, block=4, seed=11)
    starts = robe.slots(np.arange(50_000))[:, ::4].reshape(-1)
    counts = np.bincount(starts * 50 // robe.size, minlength=50)
    p = stats.chisquare(counts).pvalue
    assert p > 1e-3, p


def test_tables_hashed_apart():
    robe = he.RobeZ(10**6, 16, block=16)
    a, b = robe.slots(np.arange(100), table=0), robe.slots(np.arange(100), table=1)
    assert (a[:, 0] != b[:, 0]).mean() > 0.95


def test_scheme_errors():
    with pytest.raises(ValueError, match="block"):
        he.RobeZ(100, 16, block=3)
    with pytest.raises(ValueError, match="size"):
        he.RobeZ(8, 16, block=16)
    with pytest.raises(ValueError, match="size"):
        he.RobeZ(0, 16)
    with pytest.raises(TypeError, match="dim"):
        he.RobeZ(100, 1.5)
    with pytest.raises(ValueError, match="num_embeddings"):
        he.FullTable([], 4)
    with pytest.raises(ValueError, match="num_embeddings"):
        he.FullTable([3, 0], 4)
    with pytest.raises(IndexError):
        he.RobeZ.reference(100, 4).slots(np.array([-1]))
    with pytest.raises(ValueError, match="table"):
        he.RobeZ.reference(100, 4).slots(np.array([1]), table=1)
    with pytest.raises(TypeError, match="indices"):
        he.RobeZ(100, 4).slots(np.array([0.5]))


def test_equality_and_repr():
    assert he.RobeZ(100, 4, seed=1) == he.RobeZ(100, 4, seed=1)
    assert he.RobeZ(100, 4, seed=1) != he.RobeZ(100, 4, seed=2)
    assert "block=4" in repr(he.RobeZ(100, 4))
    assert he.HashedNet(100, 4).block == 1


@pytest.mark.parametrize("scheme", [he.FullTable([1000, 77], 16), he.RobeZ(12345, 16, block=4),
                                    he.HashedNet(999, 8)], ids=["full", "robez", "hashednet"])
def test_init_weight_and_optimizer_state_start_on_a_cache_line(scheme):
    # NumPy's large arrays start 16 bytes past a 64-byte line, which puts a
    # full table's 64-byte rows across two lines; hashemb's own arrays (the
    # weight, Adagrad's state, the two-phase scratch) start on one, with
    # the values the generator gives without it
    from storage16 import DTYPES
    for dtype in DTYPES:
        w = scheme.init_weight(seed=7, dtype=dtype)
        assert w.ctypes.data % 64 == 0 and w.shape == scheme.weight_shape and w.dtype == dtype
        assert w.flags.c_contiguous and w.flags.writeable
        if dtype in (np.float32, np.float64):
            # each full table its own 1/sqrt(rows) (DLRM's init), a shared
            # array 1/sqrt(dim)
            want = np.random.default_rng(7).random(scheme.weight_shape, dtype=dtype)
            if isinstance(scheme, he.FullTable):
                first = np.cumsum([0] + scheme.table_sizes)
                parts = [(a, b, 1 / np.sqrt(b - a)) for a, b in zip(first[:-1], first[1:])]
            else:
                parts = [(0, want.shape[0], 1 / np.sqrt(scheme.dim))]
            for a, b, scale in parts:
                scale = np.float64(scale).astype(dtype)
                want[a:b] = want[a:b] * (2 * scale) - scale
            np.testing.assert_array_equal(w, want)
        else:
            # 16-bit: the same ranges, each filled to near its edge
            v = w.astype(np.float32).reshape(scheme.weight_shape)
            if isinstance(scheme, he.FullTable):
                assert 0.95 / np.sqrt(1000) < np.abs(v[:1000]).max() <= 1.001 / np.sqrt(1000)
                assert 0.95 / np.sqrt(77) < np.abs(v[1000:]).max() <= 1.001 / np.sqrt(77)
        opt = he.Adagrad(0.1)
        state = opt._state(w, w.size)
        assert state.ctypes.data % 64 == 0 and not state.any()
        assert opt.scratch_for(w).ctypes.data % 64 == 0 and not opt.scratch_for(w).any()


_X = np.random.default_rng(0).integers(0, 40, (200, 2))


@pytest.mark.parametrize("scheme", [he.RobeZ(1000, 16, block=4, signed=True), he.HashedNet(97, 8),
                                    he.FullTable([10, 20], 4), he.LMA.fit(_X, 500, 8, block=4),
                                    he.LSHTable.fit(_X, 500, 8)],
                         ids=["robe", "hashednet", "full", "lma", "lsh"])
def test_used_scheme_pickles_and_deep_copies(scheme):
    """A scheme that has run a kernel holds its C view; pickle and deepcopy
    drop it (it failed them) and the copy makes its own: same slots, equal."""
    import copy
    import pickle
    x = np.arange(10)
    want = scheme.slots(x)
    for other in (pickle.loads(pickle.dumps(scheme)), copy.deepcopy(scheme)):
        assert other == scheme
        np.testing.assert_array_equal(other.slots(x), want)
    assert scheme._view_cache is not None          # the original keeps its own


@pytest.mark.parametrize("dim,block", [(4, 8), (2, 8), (8, 32)])
def test_wide_robe_start_at_exactly_size_wraps_to_zero(dim, block):
    """Z > D: slot = h(blk) + (x mod r) D; where that is exactly m the start
    is 0 (every start, saved ones too, lies in [0, m)). Random tokens land
    there with probability about 1/m, so the token is solved for."""
    from reference import slot
    P = (1 << 61) - 1
    m = 1000
    robe = he.RobeZ(m, dim, block=block, seed=3)
    A, B, C, D0 = (int(c) for c in robe.hash.coef[:4])
    r = block // dim
    for within in range(1, r):
        blk = (m - within * dim - D0) * pow(B, -1, P) % P     # h(blk) = m - within * D
        x = blk * r + within
        want = np.array([slot(robe, 0, x, i) for i in range(dim)])
        assert want[0] == 0
        np.testing.assert_array_equal(robe.slots(np.array([x]))[0], want)
        M = robe.init_weight(seed=1)
        out, saved = he.embedding_bag(np.array([x]), M, np.array([0]), scheme=robe,
                                      return_saved=True)
        np.testing.assert_array_equal(out[0], M[want])
        assert saved.starts is not None and int(saved.starts.max()) < m
