"""Tests killing mutants of hashemb/_backend.py that survived the suite
(mutation round 4)."""
import mmap

import numpy as np
import pytest

import hashemb as he
from hashemb import _backend


def _root(a):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


@pytest.mark.parametrize("shape,dtype", [((100,), np.float32), ((7, 3), np.float64),
                                         ((1000, 16), np.float32), ((5,), np.int64)])
@pytest.mark.parametrize("zero", [False, True])
def test_aligned_arrays_start_on_a_cache_line(shape, dtype, zero):
    for _ in range(8):          # NumPy's own buffers start at varying offsets
        a = _backend.aligned(shape, dtype, zero=zero)
        assert a.ctypes.data % 64 == 0 and a.shape == shape and a.dtype == dtype
        assert a.flags.c_contiguous and a.flags.writeable
        if zero:
            assert not a.any()
    w = he.RobeZ(1000, 16).init_weight()
    assert w.ctypes.data % 64 == 0


def test_aligned_zero_is_zero_in_reused_memory():
    # zero=True: zeros even where the allocator hands back a freed buffer
    # full of other values
    for n in (256, 1000, 4096):
        for _ in range(20):
            junk = np.full(n * 4 + 64, 0xAB, np.uint8)
            del junk
            a = _backend.aligned((n,), np.float32, zero=True)
            assert not a.any()
            a[:] = np.nan       # dirty the buffer the next round may get back
            del a


def test_sparse_scratch_of_exactly_the_threshold_is_mapped():
    # >= _SPARSE_BYTES: mapped (no huge pages); one element less: NumPy's
    if not hasattr(mmap, "MADV_NOHUGEPAGE"):
        pytest.skip("no MADV_NOHUGEPAGE")
    n = _backend._SPARSE_BYTES // 4
    big = _backend.aligned((n,), np.float32, zero=True, sparse=True)
    assert isinstance(_root(big), mmap.mmap) and not big.any() and big.flags.writeable
    small = _backend.aligned((n - 16,), np.float32, zero=True, sparse=True)
    assert not isinstance(_root(small), mmap.mmap) and not small.any()


def test_forked_child_of_a_process_with_the_kernels_runs_one_thread():
    # GCC's OpenMP keeps the parent's thread pool in a forked child, which
    # has none of its threads: the child must start at one thread
    import os
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    from hashemb._cpu import _slots
    he.RobeZ(64, 4).slots(np.arange(8))          # the kernels loaded and run
    old = he.set_num_threads(2)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                              # the child: report and leave
            try:
                os.write(w, str(_slots.max_threads()).encode())
            finally:
                os._exit(0)
        os.close(w)
        got = os.read(r, 64).decode()
        os.close(r)
        os.waitpid(pid, 0)
    finally:
        he.set_num_threads(old)
    assert got == "1"


class _FakeCupyArray:
    """What the dispatcher takes for a CuPy array (its type's module)."""
    __module__ = "cupy._core.core"


class _NotCupyArray:
    __module__ = "cupyish.core"


def test_array_module_of_device_arrays_is_cupy(monkeypatch):
    import sys
    import types
    fake = types.ModuleType("cupy")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert _backend.array_module(_FakeCupyArray()) is fake
    assert _backend.array_module(None, _FakeCupyArray()) is fake
    assert _backend.array_module(np.zeros(2), None) is np


def test_only_the_cupy_package_counts_as_device_arrays():
    assert _backend.is_cupy(_FakeCupyArray())
    assert not _backend.is_cupy(_NotCupyArray()) and not _backend.is_cupy(np.zeros(1))
    assert not _backend.on_gpu(x=_NotCupyArray(), y=np.zeros(1))
