"""Plain lookups (no bags): one table, or many small tables of mixed widths
packed into one array and read in one pass."""
import functools
import numbers
from typing import NamedTuple

import numpy as np

from . import _validate as V
from ._backend import _cpu_kernels, is_cupy, on_gpu, recycled


def _key(v, name):
    """sizes or dims as the layout cache's key: Python ints only, each other
    value checked here (the cache takes 2.0 and True as equal to 2 and 1, so
    a check behind it ran only on a layout's first call)."""
    if isinstance(v, np.ndarray):
        v = v.tolist()          # (a 0-d array: its one value)
    if isinstance(v, numbers.Number):
        return v if type(v) is int else V.check_int(v, name)
    try:
        return tuple(x if type(x) is int else V.check_int(x, name) for x in v)
    except TypeError as e:
        if name in str(e):
            raise
        raise TypeError(f"{name}: expected an integer or a sequence of integers, "
                        f"got {type(v).__name__} {v!r}") from None


class Layout(NamedTuple):
    """A packed layout of T tables: rows of ``dims[t]`` floats from float
    ``base[t]``, filling output columns ``cols[t]:cols[t] + dims[t]``; ``size``
    floats in all, output rows ``total`` wide. ``packed`` holds base, dims,
    cols and sizes as the rows of one (4, T) array (one buffer per kernel call:
    at small batches each argument's buffer costs more than the lookup)."""
    base: np.ndarray
    dims: np.ndarray
    cols: np.ndarray
    sizes: np.ndarray
    size: int
    total: int
    packed: np.ndarray


def _layout(sizes, dims):
    """The :class:`Layout` of these tables, cached: a training loop asks for
    the same few layouts every step."""
    return _cached_layout(_key(sizes, "sizes"), _key(dims, "dims"))


@functools.lru_cache(maxsize=256)
def _cached_layout(sizes, dims):
    (base, dims, cols, sizes), size = V.packed_layout(sizes, dims)
    packed = np.stack([base, dims, cols, sizes])
    packed.setflags(write=False)
    return Layout(*packed, size, int(dims.sum()), packed)


@functools.lru_cache(maxsize=None)
def _kernel(name, wtype, itype):
    """The fused-type specialisation of a plain-lookup kernel, resolved once
    (Cython's per-call dispatch costs about a microsecond)."""
    return getattr(_cpu_kernels(), name)[_CTYPES[wtype], _CTYPES[itype]]


_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
           np.dtype(np.int32): "int32_t", np.dtype(np.int64): "int64_t"}


def _flat_weight(weight, size):
    V.weight_dtype(weight)
    w = np.ascontiguousarray(weight).reshape(-1)
    if w.shape[0] != size:
        raise ValueError(f"weight: expected {size} floats, got {w.shape[0]} (shape {weight.shape})")
    return w


def embedding(indices, weight):
    r"""Rows of ``weight`` for any shape of indices: ``weight[indices]``.

    .. math:: \mathrm{out}[\ldots, i] = W[\mathrm{indices}[\ldots], i]

    Parameters
    ----------
    indices : numpy.ndarray of int32 or int64, any shape
        Every index in ``[0, num_embeddings)`` (IndexError otherwise).
    weight : numpy.ndarray of float32 or float64, shape (num_embeddings, D)

    Returns
    -------
    numpy.ndarray, shape ``indices.shape + (D,)``

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> W = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> he.embedding(np.array([[3, 0]]), W)
    array([[[ 9., 10., 11.],
            [ 0.,  1.,  2.]]], dtype=float32)
    """
    if on_gpu(indices=indices, weight=weight):
        V.storage_dtype(weight.dtype)
    else:
        V.weight_dtype(weight)
    if weight.ndim != 2 or 0 in weight.shape:
        raise ValueError(f"weight: expected shape (num_embeddings, dim), both >= 1, "
                         f"got {weight.shape}")
    return _multi(indices, weight, weight.shape[0], weight.shape[1], single=True)


def multi_embedding(indices, weight, sizes, dims):
    r"""One lookup in each of T tables of mixed widths, packed in one array.

    Table t has ``sizes[t]`` rows of ``dims[t]`` floats, stored one table after
    another without padding (``sum(sizes[t] * dims[t])`` floats). Row b of the
    output concatenates the rows ``indices[b, t]`` of every table:

    .. math:: \mathrm{out}[b, c_t + i] = W_t[\mathrm{indices}[b, t], i],
       \qquad c_t = \textstyle\sum_{t' < t} d_{t'}

    Parameters
    ----------
    indices : numpy.ndarray of int32 or int64, shape (B, T)
    weight : numpy.ndarray of float32 or float64, 1-D
        The packed tables (see :func:`unpack` for per-table views).
    sizes, dims : sequence of int, length T

    Returns
    -------
    numpy.ndarray, shape (B, sum(dims))

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> W = np.arange(2 * 1 + 3 * 2, dtype=np.float32)    # tables 2x1 and 3x2
    >>> he.multi_embedding(np.array([[1, 2], [0, 0]]), W, sizes=[2, 3], dims=[1, 2])
    array([[1., 6., 7.],
           [0., 2., 3.]], dtype=float32)
    """
    return _multi(indices, weight, sizes, dims)


def _multi(indices, weight, sizes, dims, single=False):
    if on_gpu(indices=indices, weight=weight):
        from ._gpu import embed as G
        return G.gather(indices, weight, _layout(sizes, dims), single)
    layout = _layout(sizes, dims)
    w = _flat_weight(weight, layout.size)
    return _gather(layout, w, _indices(indices, layout, single), single)


def _indices(indices, layout, single):
    idx = V.index_array(indices)
    if not single:
        V.check_table_columns(idx, layout.sizes.shape[0])
    return idx


def _gather(layout, w, idx, single):
    """The CPU forward on checked arrays (the torch adapters call it directly:
    at small batches the checks cost more than the lookup): ``w`` flat,
    contiguous, float32/float64 of the layout's size; ``idx`` contiguous
    int32/int64 of shape (..., T). Indices outside their table raise
    IndexError before anything is written."""
    T, total = layout.sizes.shape[0], layout.total
    flat = idx.reshape(-1, T)
    out = recycled(idx.shape + (total,) if single else (idx.shape[0], total), w.dtype)
    bad = _kernel("gather", w.dtype, idx.dtype)(w, flat, layout.packed,
                                                 out.reshape(flat.shape[0], total))
    if bad >= 0:
        raise V.index_error(idx, bad, layout.sizes)
    return out


def _scatter(layout, g, idx):
    """The CPU backward on checked arrays (as :func:`_gather`): ``g``
    contiguous of shape (rows of idx, total width); a new flat gradient of the
    layout's size."""
    T = layout.sizes.shape[0]
    out = _cpu_kernels().grad_buffer(layout.size, g.dtype, idx.size, layout.total // T)
    bad = _kernel("scatter_add", g.dtype, idx.dtype)(g, idx.reshape(-1, T), layout.packed, out)
    if bad >= 0:
        raise V.index_error(idx, bad, layout.sizes)
    return out


def embedding_backward(grad_output, indices, num_embeddings, deterministic=None):
    r"""Gradient of :func:`embedding` with respect to the table:

    .. math:: \frac{\partial L}{\partial W_r} = \sum_{n:\ \mathrm{indices}[n] = r}
       \mathrm{grad\_output}[n]

    Threads split the columns in cache-line multiples (rows for tables under 32
    floats wide): every gradient float is summed by one thread in index order,
    so on the CPU the result is bitwise deterministic whatever
    ``deterministic`` says, and all samples on one hot id still use every
    thread. On the GPU (CuPy arrays) backward adds with atomics, or with
    ``deterministic=True`` sorts the rows and sums each float in sample
    order: bitwise the CPU result (None: ``he.set_gpu_options``' default,
    as the bag functions take it).

    Parameters
    ----------
    grad_output : numpy.ndarray, shape ``indices.shape + (D,)``
        Any floating-point dtype: float32 and float64 are summed as they
        are; float16, bfloat16 and other floats (longdouble) are converted
        to float32 first. Integer and bool arrays are a TypeError.
    indices : numpy.ndarray of int32 or int64
    num_embeddings : int
    deterministic : bool or None

    Returns
    -------
    numpy.ndarray, shape (num_embeddings, D)
        float64 for a float64 ``grad_output``, else float32 (a float16
        ``grad_output`` gives a float32 gradient).

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> he.embedding_backward(np.ones((3, 2), np.float32), np.array([1, 1, 0]), 3)
    array([[1., 1.],
           [2., 2.],
           [0., 0.]], dtype=float32)
    """
    num_embeddings = V.check_positive_int(num_embeddings, "num_embeddings", upper=1 << 61)
    deterministic = V.check_deterministic(deterministic)
    if on_gpu(grad_output=grad_output, indices=indices):
        from ._gpu import embed as G
        g = G.float_grad(grad_output)
        _check_row_grad(g.shape)
        out = G.scatter(g, indices, _layout(num_embeddings, g.shape[-1]), True, deterministic)
        return out.reshape(-1, g.shape[-1])
    g = V.as_float(grad_output, "grad_output")
    _check_row_grad(g.shape)
    out = _multi_backward(g, indices, num_embeddings, g.shape[-1], single=True)
    return out.reshape(-1, g.shape[-1])


def _check_row_grad(shape):
    """grad_output of embedding_backward: rows of a width >= 1 (D is read from
    it; a width of 0 was reported as the `dims` this function does not take)."""
    if len(shape) < 1 or shape[-1] < 1:
        raise ValueError(f"grad_output: expected shape indices.shape + (dim,) with dim >= 1, "
                         f"got {shape}")


def multi_embedding_backward(grad_output, indices, sizes, dims, deterministic=None):
    r"""Gradient of :func:`multi_embedding` with respect to the packed array:
    a 1-D array of ``sum(sizes[t] * dims[t])`` floats,

    .. math:: \frac{\partial L}{\partial W_t[r, i]} =
       \sum_{b:\ \mathrm{indices}[b, t] = r} \mathrm{grad\_output}[b, c_t + i]

    bitwise deterministic on the CPU, on the GPU with ``deterministic``
    (see :func:`embedding_backward`).

    Parameters
    ----------
    grad_output : numpy.ndarray, shape (B, sum(dims))
        Any floating-point dtype, as in :func:`embedding_backward`: float32
        and float64 as they are, other floats (float16, bfloat16, ...)
        converted to float32.
    indices : numpy.ndarray of int32 or int64, shape (B, T)
    sizes, dims : sequence of int, length T
        As given to :func:`multi_embedding`.
    deterministic : bool or None
        GPU only, as in :func:`embedding_backward`.

    Returns
    -------
    numpy.ndarray, 1-D of ``sum(sizes[t] * dims[t])`` values
        The packed gradient (:func:`unpack` gives per-table views); float64
        for a float64 ``grad_output``, else float32.

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> g = np.ones((2, 3), np.float32)
    >>> he.multi_embedding_backward(g, np.array([[1, 2], [1, 0]]), [2, 3], [1, 2])
    array([0., 2., 1., 1., 0., 0., 1., 1.], dtype=float32)
    """
    deterministic = V.check_deterministic(deterministic)
    if on_gpu(grad_output=grad_output, indices=indices):
        from ._gpu import embed as G
        g = G.float_grad(grad_output)
        return G.scatter(g, indices, _layout(sizes, dims), False, deterministic)
    g = V.as_float(grad_output, "grad_output")
    return _multi_backward(g, indices, sizes, dims, single=False)


def _multi_backward(g, indices, sizes, dims, single):
    layout = _layout(sizes, dims)
    idx = _indices(indices, layout, single)
    total = layout.total
    want = idx.shape + (total,) if single else (idx.shape[0], total)
    if g.shape != want:
        raise ValueError(f"grad_output: expected shape {want}, got {g.shape}")
    return _scatter(layout, g.reshape(-1, total), idx)


def unpack(weight, sizes, dims):
    """Views of the packed array as one ``(sizes[t], dims[t])`` array per table.

    Parameters
    ----------
    weight : numpy.ndarray or cupy.ndarray, C-contiguous
        The packed tables of :func:`multi_embedding`: float32 or float64,
        ``sum(sizes[t] * dims[t])`` values in any shape. A strided array is
        a ValueError (views of a copy would not see the caller's writes).
    sizes, dims : sequence of int, length T

    Returns
    -------
    list of T arrays
        Views (no copies) of ``weight``: writes through them change it.

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> W = np.zeros(8)
    >>> [w.shape for w in he.unpack(W, [2, 3], [1, 2])]
    [(2, 1), (3, 2)]
    >>> he.unpack(W, [2, 3], [1, 2])[1][0, 1] = 5.0     # row 0 of table 1: floats 2, 3
    >>> W.tolist()
    [0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]
    """
    base, dims_a, _, sizes_a, size = _layout(sizes, dims)[:5]
    # the same checks for CuPy (an integer array passed, and a strided one's
    # reshape copied: writes to its views were lost)
    if is_cupy(weight):
        V.storage_dtype(weight.dtype)
    else:
        V.weight_dtype(weight)
    if not weight.flags.c_contiguous:
        # views are the promise: those of a copy would not see the caller's writes
        raise ValueError("weight: expected a C-contiguous array (views of it are "
                         "returned), got a strided one")
    w = weight.reshape(-1)
    if w.shape[0] != size:
        raise ValueError(f"weight: expected {size} floats, got {w.shape[0]} "
                         f"(shape {weight.shape})")
    return [w[b:b + n * d].reshape(n, d) for b, n, d in zip(base, sizes_a, dims_a)]
