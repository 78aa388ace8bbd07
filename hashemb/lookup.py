"""Plain lookups (no bags): one table, or many small tables of mixed widths
packed into one array and read in one pass."""
import functools
import numbers

import numpy as np

from . import _validate as V
from ._backend import is_cupy, kernels, on_gpu


def _key(v):
    if isinstance(v, np.ndarray):
        return tuple(v.tolist())
    return v if isinstance(v, numbers.Integral) else tuple(v)


def _layout(sizes, dims):
    """(base, dims, cols, sizes, size, total width) of a packed layout, cached: a training
    loop asks for the same few layouts every step."""
    return _cached_layout(_key(sizes), _key(dims))


@functools.lru_cache(maxsize=256)
def _cached_layout(sizes, dims):
    (base, dims, cols, sizes), size = V.packed_layout(sizes, dims)
    for a in (base, dims, cols, sizes):
        a.setflags(write=False)
    return base, dims, cols, sizes, size, int(dims.sum())


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
    if not on_gpu(indices=indices, weight=weight):
        V.weight_dtype(weight)
    if weight.ndim != 2:
        raise ValueError(f"weight: expected shape (num_embeddings, dim), got {weight.shape}")
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
    base, dims_a, cols, sizes_a, size, total = _layout(sizes, dims)
    w = _flat_weight(weight, size)
    k = kernels(indices, weight)
    idx, flat = _rows(k, indices, sizes_a, single)
    out = np.empty((flat.shape[0], total), w.dtype)
    k.gather(w, flat, base, dims_a, cols, out)
    return out.reshape(idx.shape + (out.shape[1],) if single else (idx.shape[0], out.shape[1]))


def _rows(k, indices, sizes, single):
    idx, flat = V.as_rows(k, indices, sizes)
    if not single and (idx.ndim != 2 or idx.shape[1] != sizes.shape[0]):
        raise ValueError(f"indices: expected shape (B, {sizes.shape[0]}) (one column per table), "
                         f"got {idx.shape}")
    return idx, flat


def embedding_backward(grad_output, indices, num_embeddings, deterministic=False):
    r"""Gradient of :func:`embedding` with respect to the table:

    .. math:: \frac{\partial L}{\partial W_r} = \sum_{n:\ \mathrm{indices}[n] = r}
       \mathrm{grad\_output}[n]

    Threads split the columns in cache-line multiples (rows for tables under 32
    floats wide): every gradient float is summed by one thread in index order,
    so on the CPU the result is bitwise deterministic whatever
    ``deterministic`` says, and all samples on one hot id still use every
    thread. On the GPU (CuPy arrays) backward adds with atomics, or with
    ``deterministic=True`` sorts the rows and sums each float in sample
    order: bitwise the CPU result.

    Parameters
    ----------
    grad_output : numpy.ndarray, shape ``indices.shape + (D,)``
    indices : numpy.ndarray of int32 or int64
    num_embeddings : int
    deterministic : bool

    Returns
    -------
    numpy.ndarray, shape (num_embeddings, D), the dtype of grad_output

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> he.embedding_backward(np.ones((3, 2), np.float32), np.array([1, 1, 0]), 3)
    array([[1., 1.],
           [2., 2.],
           [0., 0.]], dtype=float32)
    """
    if on_gpu(grad_output=grad_output, indices=indices):
        if grad_output.ndim < 1:
            raise ValueError(f"grad_output: expected shape indices.shape + (dim,), "
                             f"got {grad_output.shape}")
        from ._gpu import embed as G
        out = G.scatter(grad_output, indices, _layout(num_embeddings, grad_output.shape[-1]),
                        True, deterministic)
        return out.reshape(-1, grad_output.shape[-1])
    g = V.as_float(grad_output, "grad_output")
    if g.ndim < 1:
        raise ValueError(f"grad_output: expected shape indices.shape + (dim,), got {g.shape}")
    out = _multi_backward(g, indices, num_embeddings, g.shape[-1], single=True)
    return out.reshape(-1, g.shape[-1])


def multi_embedding_backward(grad_output, indices, sizes, dims, deterministic=False):
    r"""Gradient of :func:`multi_embedding` with respect to the packed array:
    a 1-D array of ``sum(sizes[t] * dims[t])`` floats,

    .. math:: \frac{\partial L}{\partial W_t[r, i]} =
       \sum_{b:\ \mathrm{indices}[b, t] = r} \mathrm{grad\_output}[b, c_t + i]

    bitwise deterministic on the CPU (see :func:`embedding_backward`).

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> g = np.ones((2, 3), np.float32)
    >>> he.multi_embedding_backward(g, np.array([[1, 2], [1, 0]]), [2, 3], [1, 2])
    array([0., 2., 1., 1., 0., 0., 1., 1.], dtype=float32)
    """
    if on_gpu(grad_output=grad_output, indices=indices):
        from ._gpu import embed as G
        return G.scatter(grad_output, indices, _layout(sizes, dims), False, deterministic)
    g = V.as_float(grad_output, "grad_output")
    return _multi_backward(g, indices, sizes, dims, single=False)


def _multi_backward(g, indices, sizes, dims, single):
    base, dims_a, cols, sizes_a, size, total = _layout(sizes, dims)
    k = kernels(indices, g)
    idx, flat = _rows(k, indices, sizes_a, single)
    want = idx.shape + (total,) if single else (idx.shape[0], total)
    if g.shape != want:
        raise ValueError(f"grad_output: expected shape {want}, got {g.shape}")
    out = np.empty(size, g.dtype)
    k.zero(out)
    k.scatter_add(g.reshape(flat.shape[0], want[-1]), flat, base, dims_a, cols, out)
    return out


def unpack(weight, sizes, dims):
    """Views of the packed array as one ``(sizes[t], dims[t])`` array per table.

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> [w.shape for w in he.unpack(np.zeros(8), [2, 3], [1, 2])]
    [(2, 1), (3, 2)]
    """
    base, dims_a, _, sizes_a, size, _ = _layout(sizes, dims)
    if is_cupy(weight):
        w = weight.reshape(-1)
        if w.shape[0] != size:
            raise ValueError(f"weight: expected {size} floats, got {w.shape[0]} "
                             f"(shape {weight.shape})")
    else:
        w = _flat_weight(weight, size)
    return [w[b:b + n * d].reshape(n, d) for b, n, d in zip(base, sizes_a, dims_a)]
