"""Tests killing mutants that survived the suite (mutation round 4, of
hashemb/_gpu/tt.py, embed.py, slots.py, lsh.py, _runtime.py). Run on the host
emulator (tests/gpu_emu.py); the launchers are called as tests/test_gpu_tt.py
and tests/test_gpu.py call them."""
import numpy as np
import pytest

import hashemb as he
from hashemb._gpu import tt as GT

import gpu_emu


@pytest.fixture(scope="module")
def be():
    return gpu_emu.emu_backend()


@pytest.fixture
def deterministic():
    old = he.set_gpu_options(deterministic=True)
    yield
    he.set_gpu_options(**old)


# ------------------------------------------------------------------ tt.py

def test_tt_cache_list_with_one_cache_is_kept_on_the_device(be):
    # [None, TTCache]: the second table's cache must be read (its rows
    # trained apart from the cores), not silently dropped
    t = [he.tt_init(100, [10, 10], [2, 2], [3], seed=s) for s in (0, 1)]
    idx, off = np.array([1, 2, 3, 4]), np.array([0, 1, 2, 3, 4])
    cache = he.TTCache(4, 4)
    cache.count(np.array([3, 4]))
    cache.populate(t[1])
    cache.weight += 1.0
    out = GT.bags(idx, t, off, cache=[None, cache], be=be)
    np.testing.assert_array_equal(out[:, 4:], cache.weight[cache.slots(np.array([3, 4]))])
    g = GT.bags_backward(np.ones((2, 8), np.float32), idx, t, off, cache=[None, cache], be=be)
    assert [len(x) for x in g] == [2, 3]        # table 1: its cores, then its cache's
    np.testing.assert_array_equal(g[1][2][cache.slots(np.array([3, 4]))], 1.0)


def test_tt_deterministic_backward_combines_partials_in_order(be, deterministic, monkeypatch):
    # deterministic=True: every core's slice gradients and the unpooling of a
    # row hotter than UNPOOL_CHUNK go through partials summed by tt_combine
    # (bits that do not depend on the order of atomics); the emulator's
    # atomics run in order, so only the launches tell the two paths apart
    monkeypatch.setattr(GT, "CHUNK", 2)
    monkeypatch.setattr(GT, "UNPOOL_CHUNK", 4)
    cores = he.tt_init(100, [10, 10], [2, 2], [3])
    idx = np.array([5] * 10 + [7, 8, 5, 9])     # row 5 in 11 entries: 3 unpool chunks
    off = np.array([0, 6, 14])
    g = np.ones((2, 4), np.float32)
    want = he.tt_embedding_bag_backward(g, idx, cores, off)
    before = len(be.launches)
    got = GT.bags_backward(g, idx, [[c.copy() for c in cores]], off, single=True, be=be)[0]
    names = be.launches[before:]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # two cores' slice gradients + the hot row's unpooling
    assert sum(n.startswith("tt_combine") for n in names) == 3, names


def test_tt_atomic_backward_launches_no_combine(be, monkeypatch):
    old = he.set_gpu_options(deterministic=False)
    try:
        monkeypatch.setattr(GT, "CHUNK", 2)
        monkeypatch.setattr(GT, "UNPOOL_CHUNK", 4)
        cores = he.tt_init(100, [10, 10], [2, 2], [3])
        idx = np.array([5] * 10 + [7, 8, 5, 9])
        off = np.array([0, 6, 14])
        before = len(be.launches)
        GT.bags_backward(np.ones((2, 4), np.float32), idx, [cores], off, single=True, be=be)
        assert not any(n.startswith("tt_combine") for n in be.launches[before:])
    finally:
        he.set_gpu_options(**old)


# --------------------------------------------------------------- embed.py

def test_multi_embedding_layouts_of_equal_sizes_and_other_dims_are_kept_apart(be):
    # the device layout cache: two layouts with the same table sizes but
    # other dims (same total floats) must not share base / dims / cols
    from hashemb import lookup as LK
    from hashemb._gpu import embed as GE
    sizes = [4, 4]
    W = np.arange(4 * 2 + 4 * 6, dtype=np.float32)
    idx = np.array([[1, 2], [3, 0]])
    for dims in ([2, 6], [6, 2], [4, 4]):
        want = he.multi_embedding(idx, W[:4 * sum(dims)], sizes, dims)
        got = GE.gather(idx.copy(), W[:4 * sum(dims)].copy(), LK._layout(sizes, dims), False,
                        be=be)
        np.testing.assert_array_equal(got, want)
        g = np.arange(2 * sum(dims), dtype=np.float32).reshape(2, -1)
        np.testing.assert_array_equal(
            GE.scatter(g, idx.copy(), LK._layout(sizes, dims), False, False, be=be),
            he.multi_embedding_backward(g, idx, sizes, dims))


@pytest.mark.parametrize("extra", [-1, 1, 8])
def test_multi_embedding_weight_of_another_size_is_refused_as_the_cpu(be, extra):
    # a short weight read past its end, a long one was taken silently
    from hashemb import lookup as LK
    from hashemb._gpu import embed as GE
    sizes, dims = [3, 5], [2, 4]
    W = np.zeros(3 * 2 + 5 * 4 + extra, np.float32)
    idx = np.array([[2, 4], [0, 1]])
    with pytest.raises(ValueError) as a:
        he.multi_embedding(idx, W, sizes, dims)
    with pytest.raises(ValueError) as b:
        GE.gather(idx.copy(), W.copy(), LK._layout(sizes, dims), False, be=be)
    assert str(a.value) == str(b.value)
    assert str(b.value).startswith("weight: expected 26 floats")


def test_embedding_scatter_takes_the_deterministic_option_when_given_none(be):
    # deterministic=None: set_gpu_options' default, as the bag and TT
    # backwards take it (the sorted, ordered sums: seg_apply)
    from hashemb import lookup as LK
    from hashemb._gpu import embed as GE
    idx, g = np.array([1, 3, 1]), np.ones((3, 4), np.float32)
    for opt in (True, False):
        old = he.set_gpu_options(deterministic=opt)
        try:
            before = len(be.launches)
            out = GE.scatter(g, idx, LK._layout(5, 4), True, None, be=be)
            names = be.launches[before:]
        finally:
            he.set_gpu_options(**old)
        np.testing.assert_array_equal(out.reshape(5, 4), he.embedding_backward(g, idx, 5))
        assert any(n.startswith("seg_apply") for n in names) == opt, names


def test_deterministic_embedding_scatter_sums_in_sample_order(be):
    # the sort must be stable: each row's gradient summed in sample order,
    # bitwise the CPU's (an unstable sort reorders the float sums)
    from hashemb import lookup as LK
    from hashemb._gpu import embed as GE
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 3, 2000)
    g = (rng.standard_normal((2000, 2)) * 10.0 ** rng.integers(-4, 5, (2000, 1))).astype(
        np.float32)
    want = he.embedding_backward(g, idx, 3, deterministic=True)
    got = GE.scatter(g, idx.copy(), LK._layout(3, 2), True, True, be=be).reshape(3, 2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("det", [False, True])
def test_embedding_scatter_refuses_an_index_outside_its_table(be, det):
    # the backward's indices are checked (after grad_output's shape, the
    # CPU's order) before any gradient is written: an unchecked one wrote
    # past the gradient's end
    from hashemb import lookup as LK
    from hashemb._gpu import embed as GE
    g = np.ones((3, 4), np.float32)
    idx = np.array([1, 7, 2])
    with pytest.raises(IndexError) as a:
        he.embedding_backward(g, idx, 5, deterministic=det)
    before = len(be.launches)
    with pytest.raises(IndexError) as b:
        GE.scatter(g, idx.copy(), LK._layout(5, 4), True, det, be=be)
    assert str(a.value) == str(b.value)
    assert not any("scatter" in n for n in be.launches[before:])
    sizes, dims = [3, 5], [2, 4]
    gm = np.ones((2, 6), np.float32)
    im = np.array([[2, 4], [3, 1]])         # 3 is outside table 0 (3 rows)
    with pytest.raises(IndexError) as a:
        he.multi_embedding_backward(gm, im, sizes, dims, deterministic=det)
    with pytest.raises(IndexError) as b:
        GE.scatter(gm, im.copy(), LK._layout(sizes, dims), False, det, be=be)
    assert str(a.value) == str(b.value)


# --------------------------------------------------------------- slots.py

def test_universal_hash_and_sign_coefficients_are_cached_apart(be):
    # the hash's and the sign's coefficients are kept on the object per part:
    # the sign after the hash (and the hash after the sign) must use its own
    from hashemb._gpu import slots as GS
    keys = np.arange(200, dtype=np.int64) * 7919 + 3
    for first in ("hash", "sign"):
        h = he.UniversalHash(seed=5)
        for part in ((first, "sign") if first == "hash" else (first, "hash")):
            if part == "hash":
                np.testing.assert_array_equal(GS.universal_hash(h, keys, 1000, table=2, be=be),
                                              h(keys, 1000, table=2))
            else:
                np.testing.assert_array_equal(GS.universal_sign(h, keys, table=2, be=be),
                                              h.sign(keys, table=2))


def test_universal_hash_refuses_m_from_2_62_as_the_cpu(be):
    from hashemb._gpu import slots as GS
    h, keys = he.UniversalHash(seed=1), np.arange(5, dtype=np.int64)
    for m in (1 << 62, 1 << 63):
        with pytest.raises(ValueError) as a:
            h(keys, m)
        with pytest.raises(ValueError) as b:
            GS.universal_hash(h, keys.copy(), m, be=be)
        assert str(a.value) == str(b.value)
    np.testing.assert_array_equal(GS.universal_hash(h, keys, (1 << 62) - 1, be=be),
                                  h(keys, (1 << 62) - 1))


@pytest.mark.parametrize("scheme", [he.FullTable([10], 4), he.FullTable([10, 20], 4),
                                    he.RobeZ(97, 4, block=2)], ids=repr)
def test_scheme_slots_of_uint64_tokens_past_2_63_are_read_unsigned(be, scheme):
    # a uint64 token >= 2**63 is a large token (outside a sized table's
    # rows, named as the CPU names it), not a negative one
    from hashemb._gpu import slots as GS
    x = np.array([3, (1 << 63) + 5, 7], np.uint64)
    try:
        want = scheme.slots(x)
    except (IndexError, ValueError) as e:
        with pytest.raises(type(e)) as b:
            GS.scheme_slots(scheme, x.copy(), be=be)
        assert str(b.value) == str(e)
        with pytest.raises(type(e)) as b:
            GS.scheme_signs(scheme, x.copy(), be=be)
        assert str(b.value) == str(e)
    else:
        np.testing.assert_array_equal(GS.scheme_slots(scheme, x.copy(), be=be), want)
        np.testing.assert_array_equal(GS.scheme_signs(scheme, x.copy(), be=be), scheme.signs(x))


# ------------------------------------------------------------- _runtime.py

def test_patch_struct_refuses_a_pointer_count_other_than_the_fields():
    from hashemb._gpu import _runtime as RT
    raw = bytes(32)
    with pytest.raises(ValueError, match="pointers: expected 2, got 1"):
        RT.patch_struct(raw, [(0, None), (8, None)], [1])
    with pytest.raises(ValueError, match="pointers: expected 1, got 2"):
        RT.patch_struct(raw, [(0, None)], [1, 2])
    with pytest.raises(ValueError, match="pointer field at byte 4"):
        RT.patch_struct(raw, [(4, None)], [1])      # inside the struct, not 8-aligned


def test_scheme_bounds_are_kept_per_table_range(be):
    # one scheme, several (table0, T): each its own bounds on the device
    from hashemb._gpu import _runtime as RT
    full = he.FullTable([5, 3, 4, 9], 4)
    for table0, T in [(0, 1), (0, 2), (0, 4), (1, 2), (2, 2), (1, 3), (0, 2)]:
        got = RT.scheme_bounds(be, full, table0, T)
        np.testing.assert_array_equal(got, full._bounds(table0, T))


def test_bounds_of_a_later_call_with_more_tables_check_every_table(be):
    # a 2-table call after a 1-table call of the same scheme: the second
    # table's bound must be checked (IndexError as the CPU's)
    from hashemb._gpu import bag as GB
    full = he.FullTable([5, 3], 4)
    W = full.init_weight()
    GB.forward(np.array([1, 2]), W.copy(), np.array([0]), full, 0, 1, "sum", None, False,
               None, be=be)
    x = np.array([[1, 2], [0, 4]])                 # 4 is outside table 1 (3 rows)
    with pytest.raises(IndexError) as a:
        he.embedding_bags(x, W, scheme=full, num_tables=2)
    with pytest.raises(IndexError) as b:
        GB.forward(x.copy(), W.copy(), None, full, 0, 2, "sum", None, True, None, be=be)
    assert str(a.value) == str(b.value)
