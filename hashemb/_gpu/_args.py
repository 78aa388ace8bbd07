"""Argument checks of the GPU backend: hashemb/_validate.py's rules and
messages for device arrays. Scalars go through _validate itself; arrays stay
on the device (no host copy of user data). Offsets and sized-table tokens
are checked by one kernel and one small device-to-host read (opt out with
``he.set_gpu_options(check_indices=False)``)."""
from collections import namedtuple

import numpy as np

from .. import _validate as V
from .._backend import kernels
from . import _runtime as RT

_INDEX = (np.dtype(np.int32), np.dtype(np.int64))
_FLOAT = (np.dtype(np.float32), np.dtype(np.float64))
_NONE = np.iinfo(np.uint64).max

# idx: the contiguous device indices, as given (1-D, or 2-D read in place:
# kernels take a pointer, so no reshaped view is made per call); n: their
# count; off: int64 offsets (T*B+1) or None; rowlen, nper: the in-place 2-D
# layout (see he_bag_range in common.cuh); psw: flat weights or None;
# single: every bag holds one entry (2-D input of one per bag, or offsets
# the pre-launch check found so; False where it did not run)
Bags = namedtuple("Bags", "idx n off rowlen nper psw B T mode has_pad pad shape single")


def desc(be, x):
    if be.is_array(x) or isinstance(x, np.ndarray):
        return f"{type(x).__module__}.{type(x).__name__} of dtype {x.dtype} and shape {x.shape}"
    return V._desc(x)


def as_array(be, x, name):
    if not be.is_array(x):
        raise TypeError(f"{name}: expected a {be.name} array (the other arguments are on the "
                        f"device; hashemb never copies between host and device), got {desc(be, x)}")
    return x


def contiguous(be, x):
    """x, C-contiguous, of its own shape (ascontiguousarray makes a 0-d array
    1-d, CuPy's as NumPy's: one token's output had an extra axis)."""
    return x if x.flags.c_contiguous else be.xp.array(x, order="C")


def as_keys(be, x, name, index=False):
    """Tokens as the kernels take them: int32 or int64 (uint64 viewed as its
    int64 bits, unless ``index``: row indices), contiguous; an empty float64
    array (what ``asarray([])`` gives) reads as int64, as on the CPU."""
    x = as_array(be, x, name)
    if x.dtype == np.uint64 and not index:
        x = x.view(np.int64)
    if x.dtype not in _INDEX:
        if x.size == 0 and x.dtype == np.float64:
            return x.astype(np.int64)
        want = "an int32 or int64" if index else "an int32, int64 or uint64"
        raise TypeError(f"{name}: expected {want} array, got dtype {x.dtype}")
    return contiguous(be, x)


def as_float(be, x, name, dtype=None):
    x = as_array(be, x, name)
    if x.dtype.kind != "f" and V.format16(x.dtype) != 1:      # (bfloat16 is kind "V")
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    return be.xp.ascontiguousarray(x, dtype=dtype or (x.dtype if x.dtype in _FLOAT
                                                      else np.float32))


def weight_dtype(be, weight, storage=False):
    """V.storage_dtype of a device weight."""
    return V.storage_dtype(as_array(be, weight, "weight").dtype, storage)


def as_weight(be, weight, scheme, *, writable=False, storage=False):
    """The weight as the kernels take it: C-contiguous, in its own shape (a
    kernel sees a pointer; no flat view is made per call)."""
    weight_dtype(be, weight, storage)
    if weight.shape not in ((scheme.size,), scheme.weight_shape):
        want = " or ".join(sorted({str((scheme.size,)), str(scheme.weight_shape)}))
        raise ValueError(f"weight: expected shape {want}, got {weight.shape}")
    if writable:
        if not weight.flags.c_contiguous:
            raise ValueError("weight: expected a writeable C-contiguous array for an in-place "
                             "optimizer update, got a non-contiguous or read-only one")
        return weight
    return be.xp.ascontiguousarray(weight)


def as_grad(be, grad_output, shape, dtype):
    g = as_float(be, grad_output, "grad_output", dtype)
    if g.shape != shape:
        raise ValueError(f"grad_output: expected shape {shape}, got {g.shape}")
    return g


def bags(be, indices, offsets, per_sample_weights, *, scheme, mode, dtype, table0=0,
         num_tables=1, include_last_offset=False, padding_idx=None):
    """The GPU twin of _validate.bags: 2-D input is read in place (no
    transposed copy); offsets become int64 of length T*B+1."""
    xp = be.xp
    mode = V.check_mode(mode)
    T = num_tables
    idx = as_keys(be, indices, "indices")
    off = None
    if idx.ndim == 2:
        psw = (None if per_sample_weights is None
               else as_array(be, per_sample_weights, "per_sample_weights"))
        V.check_2d(idx.shape, offsets, T, None if psw is None else psw.shape,
                   lambda x: desc(be, x))
        if T == 1:
            B, N = idx.shape
            rowlen = nper = N
        else:
            B, rowlen, nper = idx.shape[0], T, 1
        shape = idx.shape
    elif idx.ndim == 1:
        if offsets is None:
            raise ValueError("offsets: expected a 1-D int32/int64 array when indices is 1-D, got None")
        off = as_array(be, offsets, "offsets")
        V.check_offsets_array(off, T, include_last_offset)
        off = user_off = xp.ascontiguousarray(off, dtype=np.int64)
        appended = T == 1 and not include_last_offset
        B = V.check_offsets_length(off.shape[0] + appended, T)
        if appended:
            full = xp.empty(off.shape[0] + 1, np.int64)
            full[:-1] = off
            full[-1] = idx.shape[0]
            off = full
        rowlen = nper = 0
        shape = idx.shape
    else:
        raise ValueError(f"indices: expected a 1-D or 2-D array, got shape {idx.shape}")

    if per_sample_weights is None:
        psw = None
    else:
        V.check_psw(mode, idx.size)
        psw = as_float(be, per_sample_weights, "per_sample_weights", dtype).reshape(-1)
        V.check_psw(mode, idx.size, psw)

    try:
        has_pad, pad = V.padding(padding_idx, scheme, T, table0)
    except (TypeError, ValueError):
        if off is not None:
            # the CPU checks the offsets' values first (an error path: the
            # caller's offsets read back here, once)
            V.check_offsets_values(kernels(), np.ascontiguousarray(be.to_host(user_off),
                                                                   np.int64), idx.shape[0])
        raise
    b = Bags(idx, idx.size, off, rowlen, nper, psw, B, T, mode, has_pad, pad, shape,
             off is None and nper == 1)
    if check_bags(be, scheme, b, table0, None if off is None else user_off,
                  V.is_uint64(indices)):
        b = b._replace(single=True)
    return b


def check_bags(be, scheme, b, table0, user_off=None, unsigned=False):
    """Offsets well formed, tokens inside their sized tables: one kernel, one
    read of 5 numbers. ValueError / IndexError with the CPU's messages (a
    problem found is named by the CPU's check of the caller's offsets,
    ``user_off``: before an appended len(indices); ``unsigned``: the tokens
    were uint64). True when the offsets give every bag one entry (then bag
    q's entry is q)."""
    if not RT.OPTIONS["check_indices"]:
        return False
    use_off = b.off is not None
    n = b.n
    if not (use_off or (n and scheme._bounded)):
        return False
    dbounds = RT.scheme_bounds(be, scheme, table0, b.T)
    has_bounds = dbounds is not None
    xp = be.xp
    res = xp.full(5, np.uint64(_NONE), np.uint64)
    dbounds = dbounds if has_bounds else res
    noff = b.off.shape[0] if use_off else 0
    be.launch("bag", f"bag_check<{RT.ctype(b.idx.dtype)}>", max(n, noff),
              [b.idx, RT.i64(n), b.off if use_off else res, RT.i64(noff), RT.i64(use_off),
               dbounds, RT.i64(has_bounds), RT.i64(b.B), RT.i64(b.T), RT.i64(b.rowlen),
               RT.i64(b.has_pad), RT.i64(b.pad), res])
    dec, bad, first, last, uneven = (int(v) for v in be.to_host(res))
    if use_off:
        first = first if first < 1 << 63 else first - (1 << 64)
        last = last if last < 1 << 63 else last - (1 << 64)
        if first != 0 or dec != _NONE or last > n:
            # the CPU's check of the caller's values names it (it passes
            # where only an appended len(indices) was flagged: no bags)
            host = np.ascontiguousarray(be.to_host(b.off if user_off is None else user_off),
                                        np.int64)
            V.check_offsets_values(kernels(), host, n)
    if bad != _NONE:
        if use_off:
            o = be.to_host(b.off)
            t = int(np.searchsorted(o, bad, side="right") - 1) // max(b.B, 1)
            value = int(b.idx[bad])
        elif b.T > 1:
            t, row = divmod(bad, b.B)
            value = int(b.idx.reshape(-1)[row * b.rowlen + t])
        else:
            t, value = 0, int(b.idx.reshape(-1)[bad])
        raise IndexError(V.index_message(bad, scheme._bounds(table0, b.T)[t], table0 + t,
                                         value, unsigned))
    return use_off and uneven == _NONE and noff > 1
