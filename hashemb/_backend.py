"""Pick the kernels by array type: NumPy -> hashemb._cpu, CuPy -> hashemb._gpu.
Never copies between host and device behind the caller's back: a mix of host
and device arrays is a TypeError naming the argument. CuPy is imported only
when a CuPy array arrives (it is recognised by its type's module name)."""
import contextlib
import math
import mmap
import os
import sys
import threading
import types

import numpy as np

_cpu = None


def _cpu_kernels():
    global _cpu
    if _cpu is None:
        from ._cpu import _bag, _embed, _slots
        _cpu = types.SimpleNamespace(**{k: getattr(m, k) for m in (_slots, _bag, _embed)
                                        for k in dir(m) if not k.startswith("__")})
    return _cpu


def _one_thread_after_fork():
    """In a forked child (a DataLoader worker, a multiprocessing pool) of a
    parent that has hashemb's CPU kernels loaded: one OpenMP thread. GCC's
    OpenMP keeps the parent's thread pool, whose threads the child does
    not have, and the child's first parallel region waited for them
    forever; a team of one starts none (torch sets its DataLoader workers
    to one thread for the same reason). ``he.set_num_threads`` raises it
    where the parent never ran a kernel on several threads."""
    if any(m.startswith("hashemb._cpu.") for m in list(sys.modules)) \
            or "hashemb_native" in sys.modules:
        from ._cpu import _slots
        _slots.set_max_threads(1)


_LOCKS = []      # (namespace, name, factory) of fork_safe_lock


def fork_safe_lock(namespace, name, factory=threading.Lock):
    """``namespace[name] = factory()`` (a module's globals()), made anew,
    unlocked, in a forked child: a child forked while another thread held
    the lock inherited it held, with no thread left to release it, and hung
    at its first use (a DataLoader worker started while the native op was
    being built)."""
    _LOCKS.append((namespace, name, factory))
    namespace[name] = factory()
    return namespace[name]


def _after_fork_in_child():
    for namespace, name, factory in _LOCKS:
        namespace[name] = factory()
    _one_thread_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def is_cupy(x):
    if type(x) is np.ndarray:       # the common case, without the string split
        return False
    return type(x).__module__.split(".")[0] == "cupy"


def _tname(x):
    return f"{type(x).__module__}.{type(x).__name__}"


def device_id(x):
    """The CUDA device a CuPy array lives on (None for an object without one)."""
    return getattr(getattr(x, "data", None), "device_id", None)


def on_gpu(**named):
    """True when the array arguments are CuPy arrays, False when none is.
    TypeError for a mix, naming the first argument on the host; ValueError
    for CuPy arrays on different devices, naming the first one off the
    device of the first (a kernel launched on one device would read the
    other's pointers as its own: an illegal address, or another array)."""
    gpu = host = dev = None
    for name, x in named.items():
        if x is None:
            continue
        if is_cupy(x):
            if gpu is None:
                gpu, dev = name, device_id(x)
            elif device_id(x) != dev:
                raise ValueError(f"{name}: expected an array on device {dev} like {gpu}, "
                                 f"got one on device {device_id(x)} (hashemb never copies "
                                 f"between devices)")
        else:
            host = host or name
    if gpu and host:
        raise TypeError(f"{host}: expected a cupy.ndarray like {gpu} (hashemb never copies "
                        f"between host and device), got {_tname(named[host])}")
    return gpu is not None


def array_module(*arrays):
    """numpy, or cupy for CuPy arrays; TypeError for a mix."""
    on = on_gpu(**{f"argument {i}": x for i, x in enumerate(arrays)})
    if on:
        import cupy
        return cupy
    return np


def kernels(*arrays):
    """The CPU kernel namespace for these arrays. Functions with GPU kernels
    dispatch before calling this; for the others a CuPy array is a TypeError."""
    for x in arrays:
        if x is not None and is_cupy(x):
            raise TypeError(
                f"expected numpy.ndarray inputs, got {_tname(x)}: this function has no GPU "
                "kernels yet (bags, plain lookups, slots, UniversalHash and TT tables have; "
                "hashemb.show_config())")
    return _cpu_kernels()


def place(like):
    """(numpy, a null context), or (cupy, a context making ``like``'s device
    current) for a CuPy ``like``: where arrays made like it go."""
    if like is not None and is_cupy(like):
        import cupy
        return cupy, cupy.cuda.Device(device_id(like))
    return np, contextlib.nullcontext()


def host(a, copy=False):
    """A NumPy array of ``a``: a CuPy array's copy on the host, else ``a``
    itself (a copy of it with ``copy``)."""
    if is_cupy(a):
        return a.get()
    return a.copy() if copy else a


def data_ptr(a):
    """Address of an array's first element, NumPy or CuPy."""
    if is_cupy(a):
        return a.data.ptr
    return a.__array_interface__["data"][0]


_SPARSE_BYTES = 8 << 20


def aligned(shape, dtype, zero=False, sparse=False):
    """A new NumPy array whose data starts on a 64-byte boundary (a cache
    line, as torch aligns its tensors). NumPy's large arrays start 16 bytes
    past one, so a full table's 64-byte rows (D = 16 float32) would each
    span two lines. ``zero``: zeroed (calloc'd, so its pages are zeroed as
    they are first touched). ``sparse`` (with zero): mostly zeros for its
    whole life, written a few slots at a time; a large one is mapped without
    huge pages, which NumPy asks for and which make each scattered write
    fault in 2 MB (a 1 GB scratch was all resident after one step of 1024
    rows: +1 GB against +4 MB)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape if isinstance(shape, tuple) else (shape,)) * dtype.itemsize
    if zero and sparse and nbytes >= _SPARSE_BYTES and hasattr(mmap, "MADV_NOHUGEPAGE"):
        m = mmap.mmap(-1, nbytes)       # anonymous: zero pages, page-aligned
        m.madvise(mmap.MADV_NOHUGEPAGE)
        return np.frombuffer(m, np.uint8, nbytes).view(dtype).reshape(shape)
    return _on_a_line((np.zeros if zero else np.empty)(nbytes + 64, np.uint8), nbytes, dtype,
                      shape)


def _on_a_line(buf, nbytes, dtype, shape):
    """An array of ``shape`` over nbytes of the uint8 block buf (64 bytes
    longer), from its first 64-byte boundary."""
    k = -buf.ctypes.data % 64
    return buf[k:k + nbytes].view(dtype).reshape(shape)


# Outputs from this size on come from recycled blocks: glibc maps such an
# allocation anew (its adaptive threshold stops at 32 MB on 64-bit) and
# unmaps it when freed, so every large output was fresh pages, each zeroed
# by the kernel at its first touch.
RECYCLE_BYTES = 32 << 20
ALIGN_BYTES = 64 << 10      # smaller outputs: NumPy's own (a call at a batch of one
                            # is about 10 us; aligning costs 1-2 of them)
RECYCLE_KEEP = 2            # blocks held at most (an output and the next)
_RECYCLED = []              # uint8 blocks, the most recent last


def _unused(i):
    """Whether _RECYCLED holds the only reference to its block i (every
    array over a block, a view of a view too, has the block as its base)."""
    return sys.getrefcount(_RECYCLED[i]) <= 2      # the list's and the argument's


def recycled(shape, dtype):
    """A new array as :func:`aligned` makes it (contents undefined; below
    ALIGN_BYTES NumPy's own, on no particular boundary): from
    RECYCLE_BYTES on, over a block an earlier output left once nothing
    refers to it any more (a block with a live view, a slice or a torch
    tensor over an output, is never handed out again). Measured: a bag
    forward's 54 MB output (batch 16384 x 26 tables x 32 floats) took 12
    ms a call in fresh pages, 3.7 ms in reused ones. At most RECYCLE_KEEP
    blocks stay held; a block serves outputs of half to all of its size."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < ALIGN_BYTES:
        return np.empty(shape, dtype)
    if nbytes < RECYCLE_BYTES:
        return aligned(shape, dtype)
    with _RECYCLE_LOCK:
        fits = [i for i in range(len(_RECYCLED))
                if nbytes + 64 <= _RECYCLED[i].nbytes <= 2 * nbytes + 64 and _unused(i)]
        # (the most recent fit: its pages the likeliest to be in cache and TLB)
        buf = _RECYCLED.pop(fits[-1]) if fits else np.empty(nbytes + 64, np.uint8)
        _RECYCLED.append(buf)
        while len(_RECYCLED) > RECYCLE_KEEP:    # a free block first, else the oldest
            free = [i for i in range(len(_RECYCLED) - 1) if _unused(i)]
            _RECYCLED.pop(free[0] if free else 0)
    return _on_a_line(buf, nbytes, dtype, shape)


fork_safe_lock(globals(), "_RECYCLE_LOCK")
