"""Tests beside tests/test_gpu.py, each killing a mutant that survived the suite
(mutation round 3, of hashemb/_gpu/_args.py and hashemb/_gpu/bag.py). Run on the
host emulator (tests/gpu_emu.py); the launchers are called as test_gpu.Dev calls
them."""
import numpy as np
import pytest

import hashemb as he
from hashemb._gpu import bag as GB

import gpu_emu


@pytest.fixture(scope="module")
def be():
    return gpu_emu.emu_backend()


def _same_error(fn_cpu, fn_dev, exc):
    with pytest.raises(exc) as a:
        fn_cpu()
    with pytest.raises(exc) as b:
        fn_dev()
    assert str(a.value) == str(b.value)


@pytest.mark.parametrize("scheme", [he.RobeZ(96, 4, block=2), he.FullTable([6, 6], 4)],
                         ids=["robez", "full"])
def test_weight_of_the_right_size_but_another_shape_is_refused(be, scheme):
    # (size // 2, 2) holds scheme.size floats but is neither accepted shape
    M = scheme.init_weight().reshape(scheme.size // 2, 2)
    x, off = np.array([1, 2, 3]), np.array([0, 2])
    _same_error(lambda: he.embedding_bag(x, M, off, scheme=scheme),
                lambda: GB.forward(x.copy(), M.copy(), off.copy(), scheme, 0, 1, "sum", None,
                                   False, None, be=be), ValueError)
    G = np.ones((2, 4), np.float32)
    _same_error(lambda: he.embedding_bag_backward(G, x, off, scheme=scheme, weight=M,
                                                  optimizer=he.SGD(0.1)),
                lambda: GB.backward(G.copy(), x.copy(), off.copy(), scheme, 0, 1, "sum", None,
                                    False, None, M.copy(), he.SGD(0.1), None, be=be), ValueError)


@pytest.mark.parametrize("opt", [lambda: he.SGD(0.1), lambda: he.Adagrad(0.1)],
                         ids=["sgd", "adagrad"])
def test_fused_step_refuses_a_strided_weight(be, opt):
    # a step writes through the weight's pointer: a strided one would have
    # other floats of the caller's buffer moved, silently
    robe = he.RobeZ(50, 4, block=2)
    buf = np.zeros(100, np.float32)
    W = buf[::2]
    x, off, G = np.array([1, 2, 3]), np.array([0, 2]), np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="weight: expected a writeable C-contiguous array"):
        GB.backward(G, x, off, robe, 0, 1, "sum", None, False, None, W, opt(), None, be=be)
    assert not buf.any()


def test_out_of_range_token_of_2d_input_is_named_as_the_cpu_names_it(be):
    # the bad token sits at (row 0, table 1): B != T positions in the
    # flattened (B, T) input, so row-major and column-major reads differ
    full = he.FullTable([5, 3, 4], 4)
    W = full.init_weight()
    for x in (np.array([[1, 3, 0], [4, 0, 1]]), np.array([[1, 0, 0], [2, 1, 7]]),
              np.array([[0, 0, 0], [0, 0, 0], [4, 2, 9]])):
        _same_error(lambda: he.embedding_bags(x, W, scheme=full, num_tables=3),
                    lambda: GB.forward(x.copy(), W.copy(), None, full, 0, 3, "sum", None, True,
                                       None, be=be), IndexError)


@pytest.mark.parametrize("det", [False, True])
def test_max_mode_adagrad_of_a_large_full_table_equals_cpu(be, det):
    # a full table large next to its batch: sum / mean Adagrad steps go per
    # row, but max mode's winners are per element and must take the
    # general path (each element's gradient to its winning entry only)
    full = he.FullTable([2000], 4)
    rng = np.random.default_rng(3)
    W = full.init_weight(seed=1)
    x = np.array([3, 7, 3, 11, 7, 5])
    off = np.array([0, 2, 4, 6])
    G = rng.standard_normal((3, 4)).astype(np.float32)
    Wd = W.copy()
    o, od = he.Adagrad(0.1, eps=1e-3), he.Adagrad(0.1, eps=1e-3)
    he.embedding_bag_backward(G, x, off, scheme=full, mode="max", include_last_offset=True,
                              weight=W, optimizer=o)
    GB.backward(G, x, off, full, 0, 1, "max", None, True, None, Wd, od, det, be=be)
    np.testing.assert_allclose(Wd, W, rtol=1e-6, atol=1e-7)
    # rows that won no element in any bag stay where they were
    assert (Wd[[0, 1, 2, 4, 6]] == full.init_weight(seed=1)[[0, 1, 2, 4, 6]]).all()


def test_max_mode_sgd_reads_every_winner_before_the_step(be):
    # two bags over the same rows; the step on bag 0's winner makes it lose
    # in bag 1 if bag 1 read the moved weight: both bags must see the
    # forward's maximum (row 0 wins both, row 1 never moves)
    full = he.FullTable([4], 2)
    W = np.array([[1.0, 1.0], [0.9, 0.9], [0.0, 0.0], [0.0, 0.0]], np.float32)
    x, off = np.array([0, 1, 0, 1]), np.array([0, 2, 4])
    G = np.ones((2, 2), np.float32)
    want = W.copy()
    he.embedding_bag_backward(G, x, off, scheme=full, mode="max", include_last_offset=True,
                              weight=want, optimizer=he.SGD(1.0))
    np.testing.assert_array_equal(want[:2], np.array([[-1.0, -1.0], [0.9, 0.9]], np.float32))
    for det in (False, True):
        Wd = W.copy()
        GB.backward(G, x, off, full, 0, 1, "max", None, True, None, Wd, he.SGD(1.0), det, be=be)
        np.testing.assert_array_equal(Wd, want)


@pytest.mark.parametrize("size,walk", [(64, False), (1 << 16, True)])
def test_adagrad_apply_sweeps_a_small_array_and_walks_a_large_one(be, size, walk):
    # the CPU's rule (m <= 8 D n: sweep the array, else walk the batch's
    # slots): a sweep of a large array per step would cost O(m) for a
    # batch of a few entries
    robe = he.RobeZ(size, 4, block=2)
    x, off, G = np.array([1, 2, 3]), np.array([0, 2]), np.ones((2, 4), np.float32)
    W = robe.init_weight()
    before = len(be.launches)
    GB.backward(G, x, off, robe, 0, 1, "sum", None, False, None, W, he.Adagrad(0.1), False,
                be=be)
    names = be.launches[before:]
    assert any(n.startswith("bag_adagrad_walk") for n in names) == walk, names
    assert any(n.startswith("adagrad_sweep") for n in names) == (not walk), names


@pytest.mark.parametrize("mode", ["mean", "max"])
@pytest.mark.parametrize("two_d", [False, True])
def test_weights_outside_sum_mode_are_named_before_their_dtype(be, mode, two_d):
    # the mode is the problem named, whatever the weights' dtype (the CPU's
    # order of checks): integer weights with mode mean / max
    robe = he.RobeZ(96, 4, block=2)
    M = robe.init_weight()
    if two_d:
        x, off, w = np.array([[1, 2], [3, 4]]), None, np.ones((2, 2), np.int64)
    else:
        x, off, w = np.array([1, 2, 3]), np.array([0, 2]), np.ones(3, np.int64)
    _same_error(lambda: he.embedding_bag(x, M, off, scheme=robe, mode=mode, per_sample_weights=w),
                lambda: GB.forward(x.copy(), M.copy(), None if off is None else off.copy(), robe,
                                   0, 1, mode, w.copy(), False, None, be=be), ValueError)
