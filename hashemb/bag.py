"""Embedding bags over any scheme: forward (gather-pool) and backward
(scatter-add, optionally with a fused optimizer step)."""
import threading

import numpy as np

from . import _validate as V
from ._backend import kernels, on_gpu, recycled
from .optim import check_optimizer

_DETERMINISM = """
    On the CPU every result is bitwise deterministic and independent of the
    thread count: forward pools each bag in entry order; backward gives each
    thread a disjoint range of slots and sums every slot's contributions in
    entry order. CuPy arrays run the same math on the GPU (forward in the
    same order; backward with atomic adds, or ``deterministic=True``)."""


_NO_HALF = np.empty(0, np.uint16)
_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32),
          np.dtype(np.float64): np.empty(0, np.float64)}


def _split(w, dtype):
    """(the array as the kernels' real type, its 16-bit bits, their format):
    one of the arrays empty, the other the array (a float16 or bfloat16
    array is read through its bits; format 1 for bfloat16, else 0)."""
    bf = V.format16(w.dtype)
    if bf is not None:
        return _EMPTY[dtype], w.view(np.uint16), bf
    return w, _NO_HALF, 0


class BagSaved:
    """What :func:`embedding_bag` / :func:`embedding_bags` computed that their
    backward reuses (``return_saved=True``): every entry's run starts, hashed
    once in forward, so that backward hashes nothing (in a training step the
    hashing is about a quarter of the work). Valid only for the same inputs
    and scheme: a saved of other sizes (bags, entries, tables, scheme, mode)
    or padding token is a ValueError and one of the other backend a
    TypeError, but one of other indices of the same sizes is not detected
    (its gradient is that of the saved's indices; the torch modules pass
    each forward's own). On the CPU ``starts`` is read-only: the kernels
    trust its values, and another start would send a step out of bounds (a
    device array cannot be locked: leave it as forward wrote it).
    ``starts`` is None where backward would not use them (signed schemes,
    many runs per row, max mode); with
    ``padding_idx``, the padding entries have none (the CPU drops them
    before the kernels run; the device keeps their places, unwritten).

    Not built by users: forward makes it, backward reads it.

    Attributes
    ----------
    starts : ndarray of uint64, CuPy array, or None
        The run starts, ``dim / run`` per entry (one per entry for a
        ROBE-D scheme, ``block == dim``), or None (see above).
    scheme : Scheme
        The scheme forward ran.
    table0, T : int
        The first table and the number of tables (0 and ``num_tables`` for
        :func:`embedding_bags`; ``table`` and 1 for :func:`embedding_bag`).
    B, n : int
        Bags, and entries: on the CPU those left after padding entries were
        dropped, on the device all of them.
    padding : int or None
        The padding token forward skipped (``padding_idx`` as a token), or None.
    mode : int
        The pooling mode's code: 0 sum, 1 mean, 2 max.
    device : bool
        True for a forward on the GPU (CuPy arrays), False on the CPU.

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> robe = he.RobeZ(size=1000, dim=16, block=16)
    >>> M = robe.init_weight()
    >>> x = np.arange(8 * 4).reshape(8, 4)
    >>> out, saved = he.embedding_bags(x, M, scheme=robe, num_tables=4, return_saved=True)
    >>> saved.starts.shape, saved.starts.flags.writeable   # one run start per entry
    ((32,), False)
    >>> g = np.ones_like(out)
    >>> reused = he.embedding_bags_backward(g, x, scheme=robe, num_tables=4, saved=saved)
    >>> hashed = he.embedding_bags_backward(g, x, scheme=robe, num_tables=4)
    >>> bool((reused == hashed).all())      # the same gradient, bit for bit
    True
    """

    def __init__(self, starts, scheme, table0, T, B, n, mode, device, padding=None):
        if not device and starts is not None:
            starts.flags.writeable = False
        self.starts, self.scheme, self.table0, self.T = starts, scheme, table0, T
        self.B, self.n, self.mode, self.device = B, n, mode, device
        self.padding = padding          # the padding token, or None
        self._batch = None              # (2-D input's shape, its Bags) for backward

    def __repr__(self):
        return (f"BagSaved({self.B} bags, {self.n} indices, tables {self.table0}.."
                f"{self.table0 + self.T - 1}, starts {'kept' if self.starts is not None else 'none'})")


def _unpadded(k, b):
    """b without its padding entries: the same bags in the same order, so
    the same bits, and the CPU kernels take no padding. Every bag then
    reaches the tight loops, which test no entry for it (when the kernels
    tested padding, padded 2-D bags of 8, a third of them padding, ran
    2.4-4x slower forward and 6x slower per SGD step than the same bags
    given without it)."""
    if not b.has_pad:
        return b
    off = _kept("off", b.off.shape[0], np.int64)
    n = k.live_offsets(b.idx, b.off, b.pad, off)
    if n == b.off[-1]:
        return b._replace(has_pad=False)
    idx = _kept("idx", n, b.idx.dtype)
    psw = _kept("psw", n, b.psw.dtype) if b.psw.size else b.psw
    k.keep_live(b.idx, b.off, b.psw, b.pad, off, idx, psw)
    return b._replace(idx=idx, off=off, psw=psw, has_pad=False)


_KEPT = threading.local()


def _kept(name, n, dtype):
    """n values of a buffer this thread keeps between calls (one per name,
    up to 256 MB): a fresh one would be fresh pages, and at a padded
    batch's sizes their faults cost more than the compaction (measured: a
    padded RobeZ forward keeping its starts 3.0 ms with fresh buffers, 1.0
    ms with kept ones, 0.7-1.1 ms for the same bags given unpadded). Valid
    until this thread's next call."""
    a = getattr(_KEPT, name, None)
    if a is None or a.dtype != dtype or a.shape[0] < n:
        a = np.empty(n, dtype)
        if a.nbytes <= 256 << 20:
            setattr(_KEPT, name, a)
    return a[:n]


def _forward(indices, weight, offsets, scheme, table0, T, mode, per_sample_weights,
             include_last_offset, padding_idx, return_saved=False):
    if on_gpu(indices=indices, weight=weight, offsets=offsets,
              per_sample_weights=per_sample_weights):
        from ._gpu import bag as G
        return G.forward(indices, weight, offsets, scheme, table0, T, mode, per_sample_weights,
                         include_last_offset, padding_idx, return_saved=return_saved)
    k = kernels(indices, weight, offsets, per_sample_weights)
    scheme = V.check_scheme(scheme)
    dtype = V.weight_dtype(weight, storage=True)
    b = V.bags(k, indices, offsets, per_sample_weights, scheme=scheme, mode=mode,
               dtype=dtype, table0=table0, num_tables=T,
               include_last_offset=include_last_offset, padding_idx=padding_idx)
    padding = b.pad if b.has_pad else None
    b = _unpadded(k, b)
    w, hw, bf = _split(V.as_weight(weight, scheme, storage=True), dtype)
    out = recycled((b.B, T * scheme.dim), dtype)
    keep = return_saved and k.wants_starts(scheme._view, b.mode) and b.idx.shape[0] > 0
    # where an entry lies outside every bag (offsets ending before the last),
    # zeros: it keeps a valid start, so a saved of other offsets never sends
    # backward out of bounds; else forward writes every start
    n = b.idx.shape[0] * (scheme.dim // scheme._run) if keep else 0
    starts = (np.empty if n and b.off[-1] == b.idx.shape[0] else np.zeros)(n, np.uint64)
    k.forward(scheme._view, b.idx, b.off, w, b.psw, out, b.B, T, table0, b.mode,
              starts, hw, bf)
    if not return_saved:
        return out
    saved = BagSaved(starts if keep else None, scheme, table0, T, b.B, b.idx.shape[0],
                     b.mode, False, padding)
    if keep and offsets is None and per_sample_weights is None and padding_idx is None and \
            isinstance(indices, np.ndarray):
        # a 2-D batch as the kernels take it (a feature-major copy): backward
        # given this saved reads it instead of transposing the tokens again
        saved._batch = (indices.shape, b)
    return out, saved


def _saved_batch(saved, indices, offsets, per_sample_weights, padding_idx, scheme, table0, T,
                 mode):
    """The batch a CPU forward kept in saved (BagSaved._batch) when backward
    is handed the same 2-D shape, tables and mode with nothing else (its
    gradient is the saved's entries' either way: their run starts are
    saved), else None."""
    kept = saved._batch if isinstance(saved, BagSaved) else None
    if kept is None or offsets is not None or per_sample_weights is not None or \
            padding_idx is not None or getattr(indices, "shape", None) != kept[0]:
        return None
    if saved.scheme is not scheme or (saved.table0, saved.T) != (table0, T) or \
            saved.mode != V.check_mode(mode):
        return None
    return kept[1]


def _backward(grad_output, indices, offsets, scheme, table0, T, mode, per_sample_weights,
              include_last_offset, padding_idx, weight, optimizer, deterministic=None,
              saved=None):
    if on_gpu(grad_output=grad_output, indices=indices, offsets=offsets,
              per_sample_weights=per_sample_weights, weight=weight):
        from ._gpu import bag as G
        return G.backward(grad_output, indices, offsets, scheme, table0, T, mode,
                          per_sample_weights, include_last_offset, padding_idx, weight,
                          optimizer, deterministic, saved=saved)
    k = kernels(grad_output, indices, offsets, per_sample_weights, weight)
    scheme = V.check_scheme(scheme)
    V.check_mode(mode)
    optimizer = check_optimizer(optimizer, scheme, mode)
    V.check_backward_weight(weight, mode, optimizer)
    dtype = V.weight_dtype(weight, storage=True) if weight is not None else \
        V.float_dtype(grad_output, "grad_output")
    b = _saved_batch(saved, indices, offsets, per_sample_weights, padding_idx, scheme, table0,
                     T, mode)
    if b is not None:
        b, padding = b._replace(psw=np.empty(0, dtype)), None
    else:
        b = V.bags(k, indices, offsets, per_sample_weights, scheme=scheme, mode=mode,
                   dtype=dtype, table0=table0, num_tables=T,
                   include_last_offset=include_last_offset, padding_idx=padding_idx)
        padding = b.pad if b.has_pad else None
        b = _unpadded(k, b)
    g = V.as_grad(grad_output, (b.B, T * scheme.dim), dtype, rows=True)
    starts = V.check_bag_saved(saved, BagSaved, scheme, table0, T, b.B, b.idx.shape[0],
                               b.mode, False, padding)
    starts = np.empty(0, np.uint64) if starts is None else starts
    if weight is None:
        w = np.empty(0, dtype)
    else:
        w = V.as_weight(weight, scheme, writable=optimizer is not None, storage=True)
    wr, hw, bf = _split(w, dtype)
    none = _EMPTY[dtype]

    def run(target, alpha, scratch, state, eps, seed=0):
        # a 16-bit target is the weight itself, moved in the apply pass;
        # scratch "slot" / "row": a full table's step summed per row with no
        # scratch, applied per element or row-wise (k.ROWS)
        rows = k.ROWS[scratch] if isinstance(scratch, str) else 0
        k.backward(scheme._view, b.idx, b.off, b.psw, g, b.B, T, table0, b.mode,
                   wr, none if target is w and hw.size else target,
                   alpha, none if scratch is None or rows else scratch,
                   none if state is None else state, eps, starts, hw, seed, rows, bf)

    # the two-phase scratch of optimizer opt: none for a full table large
    # next to its batch, whose step sums per row (k.wants_scratch)
    run.scratch = lambda opt: ("slot" if not k.wants_scratch(
        scheme._view, b.mode, b.idx.shape[0]) else opt.scratch_for(w))
    run.rows = scheme.size // scheme.dim

    if optimizer is not None:
        optimizer._apply(k, run, w)
        return None
    grad = np.zeros(scheme.size, dtype)
    run(grad, 1.0, None, None, 0.0)
    return grad.reshape(weight.shape if weight is not None else scheme.weight_shape)


def embedding_bag(indices, weight, offsets=None, *, scheme, table=0, mode="sum",
                  per_sample_weights=None, include_last_offset=False, padding_idx=None,
                  return_saved=False):
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
    weight : ndarray of float32, float64, float16 or bfloat16
        The array M, shape ``(scheme.size,)`` or ``scheme.weight_shape``.
        float16 and bfloat16 (``ml_dtypes.bfloat16``; on CuPy arrays from
        CuPy 14) are storage: read as float32, pooled in float32.
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
    return_saved : bool
        Also return a :class:`BagSaved` for the backward of the same inputs.

    Returns
    -------
    ndarray, shape (B, scheme.dim), weight's dtype (float32 for a 16-bit
    weight). Empty bags give zeros.
    With ``return_saved``: ``(out, saved)``.

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
                    1, mode, per_sample_weights,
                    V.check_flag(include_last_offset, "include_last_offset"), padding_idx,
                    V.check_flag(return_saved, "return_saved"))


def embedding_bag_backward(grad_output, indices, offsets=None, *, scheme, table=0, mode="sum",
                           per_sample_weights=None, include_last_offset=False,
                           padding_idx=None, weight=None, optimizer=None, deterministic=None,
                           saved=None):
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
        Read in place when its rows are each contiguous, at any stride (a
        column slice of a wider gradient) or at stride 0 (one row
        repeated, ``np.broadcast_to``); any other layout is copied.
    indices, offsets, scheme, table, mode, per_sample_weights, include_last_offset, padding_idx
        As in :func:`embedding_bag`.
    weight : ndarray, optional
        Needed for ``mode="max"`` and for an optimizer (updated in place; must be
        C-contiguous and writeable). A 16-bit weight gets a float32 gradient;
        an optimizer moves it in float32 and rounds each updated slot once
        (see :class:`hashemb.SGD`).
    optimizer : hashemb.SGD, hashemb.Adagrad or hashemb.RowwiseAdagrad (full tables), optional
    deterministic : bool, optional
        GPU only (the CPU is always deterministic): sum each slot's
        contributions in entry order after a stable sort, bitwise the CPU's
        result, instead of atomic adds. Default: ``he.set_gpu_options``.
    saved : BagSaved, optional
        From the forward of the same inputs (``return_saved=True``): its run
        starts are reused instead of hashed again. Same results.

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
                     per_sample_weights, V.check_flag(include_last_offset, "include_last_offset"),
                     padding_idx, weight, optimizer, V.check_deterministic(deterministic), saved)


def embedding_bags(indices, weight, offsets=None, *, scheme, num_tables, mode="sum",
                   per_sample_weights=None, return_saved=False):
    r"""Many tables in one call (table-batched, like FBGEMM's TBE).

    Bag b of table t is ``indices[offsets[t*B+b]:offsets[t*B+b+1]]`` (feature-major,
    ``len(offsets) == num_tables*B + 1``) and fills
    ``out[b, t*dim:(t+1)*dim]``; table t is the scheme's table t (hashed into the
    slot of a shared array, or a FullTable's t-th table). ``indices`` may instead
    be 2-D ``(B, num_tables)``, one index per table per sample, with
    ``offsets=None``.

    .. math:: \mathrm{out}[b, t D + i] = \mathop{\mathrm{pool}}_{j} w_j\, s(t, x_j, i)\, M[\mathrm{slot}(t, x_j, i)]

    Parameters
    ----------
    indices : ndarray of int32, int64 (or uint64 tokens)
        1-D with ``offsets``, or 2-D ``(B, num_tables)`` without.
    weight : ndarray of float32, float64, float16 or bfloat16
        The array M, as in :func:`embedding_bag`.
    offsets : ndarray of int32 or int64, optional
        ``num_tables * B + 1`` bag starts, feature-major, the last one
        ``len(indices)`` (as ``include_last_offset=True``).
    scheme : Scheme
    num_tables : int
        Tables T, at most the scheme's ``num_tables`` where it has one.
    mode : {"sum", "mean", "max"}
    per_sample_weights : ndarray of float, optional
        One weight per index; only with ``mode="sum"``.
    return_saved : bool
        Also return a :class:`BagSaved` for the backward of the same inputs.

    Returns
    -------
    ndarray, shape (B, num_tables * scheme.dim); with ``return_saved``,
    ``(out, saved)`` (see :class:`BagSaved`).
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
                    True, None, V.check_flag(return_saved, "return_saved"))


def embedding_bags_backward(grad_output, indices, offsets=None, *, scheme, num_tables,
                            mode="sum", per_sample_weights=None, weight=None, optimizer=None,
                            deterministic=None, saved=None):
    r"""Backward of :func:`embedding_bags`: the gradient, or a fused optimizer step
    (``optimizer=he.SGD(lr)`` / ``he.Adagrad(lr)`` / ``he.RowwiseAdagrad(lr)`` for full
    tables, returns None). Arguments as in
    :func:`embedding_bags` and :func:`embedding_bag_backward` (``deterministic``
    and ``saved`` included).

    .. math::

        \frac{\partial L}{\partial M[j]} = \sum_{t < T} \sum_{b}
        \sum_{x \in \mathrm{bag}(t, b)} \sum_{i:\ \mathrm{slot}(t,x,i) = j}
        c_{b,x}\, s(t,x,i)\, \frac{\partial L}{\partial \mathrm{out}[b, t D + i]}

    with :math:`c` as in :func:`embedding_bag_backward` (the per-sample weight
    for sum, :math:`1/|\mathrm{bag}|` for mean; max sends each element's
    gradient to the first entry holding the maximum).

    Parameters
    ----------
    grad_output : ndarray, shape (B, num_tables * scheme.dim)
        Read in place when its rows are each contiguous at any stride, as in
        :func:`embedding_bag_backward`.
    indices, offsets, scheme, num_tables, mode, per_sample_weights
        As given to :func:`embedding_bags`.
    weight : ndarray, optional
        Needed for ``mode="max"`` and for an optimizer (updated in place;
        C-contiguous and writeable), as in :func:`embedding_bag_backward`.
    optimizer : hashemb.SGD, hashemb.Adagrad or hashemb.RowwiseAdagrad (full tables), optional
    deterministic : bool, optional
        GPU only: see :func:`embedding_bag_backward`.
    saved : BagSaved, optional
        From ``embedding_bags(..., return_saved=True)`` on the same inputs.

    Returns
    -------
    ndarray of ``weight``'s shape (``scheme.weight_shape`` without weight), or
    None when an optimizer updated ``weight``.
    {det}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> robe = he.RobeZ(size=10_000, dim=16)
    >>> M = robe.init_weight()
    >>> x = np.arange(8 * 26).reshape(8, 26)
    >>> g = np.ones((8, 26 * 16), np.float32)
    >>> grad = he.embedding_bags_backward(g, x, scheme=robe, num_tables=26)
    >>> int(grad.sum())                  # 8 samples x 26 tables x 16 elements, 1 each
    3328
    >>> before = M.copy()
    >>> he.embedding_bags_backward(g, x, scheme=robe, num_tables=26, weight=M,
    ...                            optimizer=he.SGD(0.1))
    >>> np.array_equal(np.flatnonzero(M != before), np.flatnonzero(grad))  # those slots only
    True
    >>> bool(np.allclose(M, before - 0.1 * grad, atol=1e-6))              # by lr * gradient
    True
    """
    T = V.check_positive_int(num_tables, "num_tables", upper=1 << 31)
    scheme = V.check_scheme(scheme)
    if scheme.num_tables is not None and T > scheme.num_tables:
        raise ValueError(f"num_tables: expected <= {scheme.num_tables} (the scheme's tables), got {T}")
    return _backward(grad_output, indices, offsets, scheme, 0, T, mode, per_sample_weights,
                     True, None, weight, optimizer, V.check_deterministic(deterministic), saved)


for _f in (embedding_bag, embedding_bag_backward, embedding_bags, embedding_bags_backward):
    _f.__doc__ = _f.__doc__.replace("{det}", _DETERMINISM)
