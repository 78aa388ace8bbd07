"""Embedding bags over any scheme: forward (gather-pool) and backward
(scatter-add, optionally with a fused optimizer step)."""
import numpy as np

from . import _validate as V
from ._backend import kernels, on_gpu
from .optim import check_optimizer

_DETERMINISM = """
    On the CPU every result is bitwise deterministic and independent of the
    thread count: forward pools each bag in entry order; backward gives each
    thread a disjoint range of slots and sums every slot's contributions in
    entry order. CuPy arrays run the same math on the GPU (forward in the
    same order; backward with atomic adds, or ``deterministic=True``)."""


def _forward(indices, weight, offsets, scheme, table0, T, mode, per_sample_weights,
             include_last_offset, padding_idx):
    if on_gpu(indices=indices, weight=weight, offsets=offsets,
              per_sample_weights=per_sample_weights):
        from ._gpu import bag as G
        return G.forward(indices, weight, offsets, scheme, table0, T, mode, per_sample_weights,
                         include_last_offset, padding_idx)
    k = kernels(indices, weight, offsets, per_sample_weights)
    scheme = V.check_scheme(scheme)
    dtype = V.weight_dtype(weight)
    b = V.bags(k, indices, offsets, per_sample_weights, scheme=scheme, mode=mode,
               dtype=dtype, table0=table0, num_tables=T,
               include_last_offset=include_last_offset, padding_idx=padding_idx)
    w = V.as_weight(weight, scheme)
    out = np.empty((b.B, T * scheme.dim), dtype)
    k.forward(scheme._view, b.idx, b.off, w, b.psw, out, b.B, T, table0, b.mode,
              b.has_pad, b.pad)
    return out


def _backward(grad_output, indices, offsets, scheme, table0, T, mode, per_sample_weights,
              include_last_offset, padding_idx, weight, optimizer, deterministic=None):
    if on_gpu(grad_output=grad_output, indices=indices, offsets=offsets,
              per_sample_weights=per_sample_weights, weight=weight):
        from ._gpu import bag as G
        return G.backward(grad_output, indices, offsets, scheme, table0, T, mode,
                          per_sample_weights, include_last_offset, padding_idx, weight,
                          optimizer, deterministic)
    k = kernels(grad_output, indices, offsets, per_sample_weights, weight)
    scheme = V.check_scheme(scheme)
    optimizer = check_optimizer(optimizer)
    V.check_mode(mode)
    V.check_backward_weight(weight, mode, optimizer)
    dtype = V.weight_dtype(weight) if weight is not None else \
        V.as_float(grad_output, "grad_output").dtype
    b = V.bags(k, indices, offsets, per_sample_weights, scheme=scheme, mode=mode,
               dtype=dtype, table0=table0, num_tables=T,
               include_last_offset=include_last_offset, padding_idx=padding_idx)
    g = V.as_grad(grad_output, (b.B, T * scheme.dim), dtype)
    if weight is None:
        w = np.empty(0, dtype)
    else:
        w = V.as_weight(weight, scheme, writable=optimizer is not None)

    def run(target, alpha, scratch, state, eps):
        k.backward(scheme._view, b.idx, b.off, b.psw, g, b.B, T, table0, b.mode,
                   b.has_pad, b.pad, w, target, alpha, scratch, state, eps)

    if optimizer is not None:
        optimizer._apply(k, run, w)
        return None
    grad = np.zeros(scheme.size, dtype)
    run(grad, 1.0, np.empty(0, dtype), np.empty(0, dtype), 0.0)
    return grad.reshape(weight.shape if weight is not None else scheme.weight_shape)


def embedding_bag(indices, weight, offsets=None, *, scheme, table=0, mode="sum",
                  per_sample_weights=None, include_last_offset=False, padding_idx=None):
    r"""Pool the embeddings of each bag of ``indices`` from the array ``weight``.

    .. math::

        E(x)[i] = s(t, x, i)\, M[\mathrm{slot}(t, x, i)], \qquad
        \mathrm{out}[b] = \mathop{\mathrm{pool}}_{j \in \mathrm{bag}\ b} w_j\, E(x_j)

    with pool = sum, mean (over non-padding entries) or element-wise max, as
    ``torch.nn.functional.embedding_bag``. Slots are computed on the fly.

    Parameters
    ----------
    indices : ndarray of int32, int64 (or uint64 tokens)
        1-D with ``offsets``, or 2-D ``(B, N)``: B bags of N.
    weight : ndarray of float32 or float64
        The array M, shape ``(scheme.size,)`` or ``scheme.weight_shape``.
    offsets : ndarray of int32 or int64, optional
        Start of each bag (B values), or B+1 with ``include_last_offset``.
    scheme : Scheme
        RobeZ, HashedNet, FullTable, ...
    table : int
        Table id t (hashed into the slot; a FullTable's table number).
    mode : {"sum", "mean", "max"}
    per_sample_weights : ndarray of float, optional
        One weight per index; only with ``mode="sum"``.
    include_last_offset : bool
    padding_idx : int, optional
        Token skipped in every bag (not counted by mean). A FullTable takes
        ``-n <= padding_idx < n`` like torch.

    Returns
    -------
    ndarray, shape (B, scheme.dim), weight's dtype. Empty bags give zeros.

    Raises
    ------
    TypeError, ValueError, IndexError
        Wrong types, bad shapes or offsets, out-of-range tokens of a sized table.
    {det}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> robe = he.RobeZ(size=1000, dim=16, block=16, seed=0)
    >>> M = robe.init_weight(seed=0)
    >>> he.embedding_bag(np.array([1, 2, 3, 4]), M, np.array([0, 2]), scheme=robe).shape
    (2, 16)
    """
    return _forward(indices, weight, offsets, scheme, V.check_table(table, V.check_scheme(scheme)),
                    1, mode, per_sample_weights, include_last_offset, padding_idx)


def embedding_bag_backward(grad_output, indices, offsets=None, *, scheme, table=0, mode="sum",
                           per_sample_weights=None, include_last_offset=False,
                           padding_idx=None, weight=None, optimizer=None, deterministic=None):
    r"""Gradient of :func:`embedding_bag` with respect to the array, or a fused update.

    .. math::

        \frac{\partial L}{\partial M[j]} = \sum_{b}\sum_{x \in \mathrm{bag}\ b}
        \sum_{i:\ \mathrm{slot}(t,x,i) = j} c_{b,x}\, s(t,x,i)\,
        \frac{\partial L}{\partial \mathrm{out}[b, i]}

    with :math:`c = w_j` (sum), :math:`1/|\mathrm{bag}|` (mean); max sends each
    element's gradient to the first entry holding the maximum (needs ``weight``).

    Parameters
    ----------
    grad_output : ndarray, shape (B, scheme.dim)
    indices, offsets, scheme, table, mode, per_sample_weights, include_last_offset, padding_idx
        As in :func:`embedding_bag`.
    weight : ndarray, optional
        Needed for ``mode="max"`` and for an optimizer (updated in place; must be
        C-contiguous and writeable).
    optimizer : hashemb.SGD or hashemb.Adagrad, optional
    deterministic : bool, optional
        GPU only (the CPU is always deterministic): sum each slot's
        contributions in entry order after a stable sort, bitwise the CPU's
        result, instead of atomic adds. Default: ``he.set_gpu_options``.

    Returns
    -------
    ndarray of ``weight``'s shape (``scheme.weight_shape`` without weight), or
    None when an optimizer updated ``weight``.
    {det}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> robe = he.RobeZ(size=100, dim=4, block=4)
    >>> g = he.embedding_bag_backward(np.ones((1, 4), np.float32), np.array([[5, 5]]),
    ...                               scheme=robe)
    >>> float(g.sum())    # two entries, four elements each
    8.0
    """
    return _backward(grad_output, indices, offsets, scheme,
                     V.check_table(table, V.check_scheme(scheme)), 1, mode,
                     per_sample_weights, include_last_offset, padding_idx, weight, optimizer,
                     deterministic)


def embedding_bags(indices, weight, offsets=None, *, scheme, num_tables, mode="sum",
                   per_sample_weights=None):
    r"""Many tables in one call (table-batched, like FBGEMM's TBE).

    Bag b of table t is ``indices[offsets[t*B+b]:offsets[t*B+b+1]]`` (feature-major,
    ``len(offsets) == num_tables*B + 1``) and fills
    ``out[b, t*dim:(t+1)*dim]``; table t is the scheme's table t (hashed into the
    slot of a shared array, or a FullTable's t-th table). ``indices`` may instead
    be 2-D ``(B, num_tables)``, one index per table per sample, with
    ``offsets=None``.

    .. math:: \mathrm{out}[b, t D + i] = \mathop{\mathrm{pool}}_{j} w_j\, s(t, x_j, i)\, M[\mathrm{slot}(t, x_j, i)]

    Returns
    -------
    ndarray, shape (B, num_tables * scheme.dim)
    {det}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> robe = he.RobeZ(size=540_202, dim=16, block=16)
    >>> M = robe.init_weight()
    >>> x = np.random.default_rng(0).integers(0, 1000, size=(8, 26))
    >>> he.embedding_bags(x, M, scheme=robe, num_tables=26).shape
    (8, 416)
    """
    T = V.check_positive_int(num_tables, "num_tables", upper=1 << 31)
    scheme = V.check_scheme(scheme)
    if scheme.num_tables is not None and T > scheme.num_tables:
        raise ValueError(f"num_tables: expected <= {scheme.num_tables} (the scheme's tables), got {T}")
    return _forward(indices, weight, offsets, scheme, 0, T, mode, per_sample_weights,
                    True, None)


def embedding_bags_backward(grad_output, indices, offsets=None, *, scheme, num_tables,
                            mode="sum", per_sample_weights=None, weight=None, optimizer=None,
                            deterministic=None):
    """Backward of :func:`embedding_bags`: the gradient, or a fused optimizer step
    (``optimizer=he.SGD(lr)`` / ``he.Adagrad(lr)``, returns None). Arguments as in
    :func:`embedding_bags` and :func:`embedding_bag_backward` (``deterministic``
    included).
    {det}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> robe = he.RobeZ(size=10_000, dim=16)
    >>> M = robe.init_weight()
    >>> x = np.arange(8 * 26).reshape(8, 26)
    >>> he.embedding_bags_backward(np.ones((8, 26 * 16), np.float32), x, scheme=robe,
    ...                            num_tables=26, weight=M, optimizer=he.SGD(0.1))
    """
    T = V.check_positive_int(num_tables, "num_tables", upper=1 << 31)
    scheme = V.check_scheme(scheme)
    if scheme.num_tables is not None and T > scheme.num_tables:
        raise ValueError(f"num_tables: expected <= {scheme.num_tables} (the scheme's tables), got {T}")
    return _backward(grad_output, indices, offsets, scheme, 0, T, mode, per_sample_weights,
                     True, None, weight, optimizer, deterministic)


for _f in (embedding_bag, embedding_bag_backward, embedding_bags, embedding_bags_backward):
    _f.__doc__ = _f.__doc__.replace("{det}", _DETERMINISM)
