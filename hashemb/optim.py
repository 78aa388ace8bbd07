"""Fused optimizers: passed as ``optimizer=`` to a backward, they update the
array in place in the same pass, with no full-size gradient returned."""
import weakref

import numpy as np

from . import _validate as V
from ._backend import aligned, array_module, data_ptr, device_id, fork_safe_lock, is_cupy

_MASK = (1 << 64) - 1

_ROUNDING = """
    stochastic_rounding : bool
        For float16 and bfloat16 weights only (float32 / float64 are updated
        exactly as above): each slot's update is computed in float32 from its
        summed gradient and rounded once to the weight's format,
        stochastically (default: up with probability equal to the remainder
        over the format's spacing, so
        the stored value is unbiased and steps under half a spacing still
        move it on average) or, with False, to nearest even. The random bits
        are a hash of (seed, call, slot): the same on any thread count and
        on CPU and GPU.
    seed : int
        Seed of those bits."""


fork_safe_lock(globals(), "_CALLS_LOCK")


def _zeros(weight, size, sparse=False):
    """A zeroed accumulator or scratch for ``weight``, in the dtype the
    kernels compute in: on the device for a CuPy weight, else starting on a
    64-byte boundary like hashemb's weights (the same slot of both then
    shares its position in a cache line). ``sparse``: see aligned."""
    dtype = V.compute_dtype(weight.dtype)
    if is_cupy(weight):
        return array_module(weight).zeros(size, dtype)
    return aligned(size, dtype, zero=True, sparse=sparse)


def _forget(opt, name, key, value):
    """The finalizer of _Fused._keep: drop the optimizer's table ``name`` at
    ``key`` if it still holds that value (all held weakly: a finalizer keeps
    neither the optimizer nor its arrays alive)."""
    opt = opt()
    if opt is not None:
        table = getattr(opt, name)
        if key in table and table[key] is value():
            del table[key]


class _Fused:
    """What both fused optimizers keep per weight array: a zeroed float
    scratch for the two-phase update (Adagrad; SGD of 16-bit weights) and
    the rounding stream of 16-bit (float16, bfloat16) weights."""

    def __init__(self, stochastic_rounding, seed):
        self.stochastic_rounding = V.check_flag(stochastic_rounding, "stochastic_rounding")
        self.seed = V.check_seed(seed)
        self._calls = 0
        self._scratch = {}
        self._finalizers = []

    def __del__(self):
        # this optimizer's finalizers on weights that outlive it: detached, or
        # a long-lived weight stepped by a new optimizer each step kept one
        # (about 1.3 KB) per optimizer until it was freed
        for f in getattr(self, "_finalizers", ()):
            f.detach()

    def __getstate__(self):
        # a copy (pickle, deepcopy) keeps the settings and the rounding
        # counter, not the arrays kept by address: those are the original's
        # weights' addresses (a copy's weights live elsewhere, so it stepped
        # from zeros anyway, and a later weight at such an address took a
        # stale accumulator). Checkpoint an accumulator with state_for and
        # bind it back with use_state; the torch modules do (state_dict).
        state = self.__dict__.copy()
        state["_finalizers"] = []
        state["_scratch"] = {}
        if "state" in state:
            state["state"] = {}
        return state

    @staticmethod
    def _key(weight):
        return (("cupy", device_id(weight)) if is_cupy(weight) else "numpy", data_ptr(weight),
                weight.size, weight.dtype.str)

    def _keep(self, name, key, weight, value):
        """table[key] = value, forgotten when the NumPy array that owns
        ``weight``'s memory is freed: the next array at that address is
        another weight and starts from zeros (it took the freed one's
        accumulator before). Memory owned elsewhere (a torch tensor, a CuPy
        or mapped buffer, whose Python wrappers come and go between calls)
        is kept by address, as before; the torch modules bind their state
        each step (use_state)."""
        getattr(self, name)[key] = value
        owner = weight
        while isinstance(owner, np.ndarray) and owner.base is not None:
            owner = owner.base
        if isinstance(owner, np.ndarray) and owner.flags.owndata:
            # one finalizer an entry made, not a call; none at exit (nothing to free)
            f = weakref.finalize(owner, _forget, weakref.ref(self), name, key,
                                 weakref.ref(value))
            f.atexit = False
            self._finalizers = [g for g in getattr(self, "_finalizers", ()) if g.alive] + [f]
        return value

    def scratch_for(self, weight):
        """The zeroed scratch of ``weight``: its gradient is summed there,
        applied once per slot, and cleared as it is applied."""
        key = self._key(weight)
        s = self._scratch.get(key)
        if s is None:
            # (cleared as applied: mostly zeros between and during steps)
            s = self._keep("_scratch", key, weight, _zeros(weight, weight.size, sparse=True))
        return s

    def _round_seed(self, weight):
        """The seed of this call's rounding bits: 0 (to nearest) unless a
        16-bit weight is rounded stochastically; a new one per call."""
        if not V.is16(weight.dtype) or not self.stochastic_rounding:
            return 0
        with _CALLS_LOCK:       # threads sharing the optimizer: one number each
            self._calls += 1
            calls = self._calls
        z = (self.seed * 0x9E3779B97F4A7C15 + calls * 0xD1B54A32D192ED03) & _MASK
        z = ((z ^ (z >> 29)) * 0xBF58476D1CE4E5B9) & _MASK
        return (z ^ (z >> 32)) or 1


class SGD(_Fused):
    r"""Plain SGD fused into backward: :math:`w_j \leftarrow w_j - \mathrm{lr}\, g_j`.

    Each contribution is subtracted as it is scattered (no gradient buffer), in
    entry order per slot, so the result equals backward-then-update up to float
    rounding of the summation order. A float16 or bfloat16 weight is updated
    in two phases instead: the gradient is summed in a float32 scratch (kept
    by the optimizer, the array's size; a full table large next to its batch
    sums per row instead), then each touched slot moves once and is rounded
    to the weight's format.

    Parameters
    ----------
    lr : float{rounding}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> robe = he.RobeZ(64, 4)
    >>> w = np.zeros(64, np.float32)
    >>> he.embedding_bag_backward(np.ones((1, 4), np.float32), np.array([[3]]),
    ...                           scheme=robe, weight=w, optimizer=he.SGD(0.5))
    >>> float(w.sum())
    -2.0
    >>> h = np.ones(64, np.float16)      # float16: 1 - 1e-4 lies between two values
    >>> he.embedding_bag_backward(np.full((1, 4), 1e-4, np.float32), np.array([[3]]),
    ...                           scheme=robe, weight=h, optimizer=he.SGD(1.0, seed=1))
    >>> sorted(set(h.tolist()))          # each of 4 slots rounded up or down at random
    [0.99951171875, 1.0]
    """

    def __init__(self, lr, *, stochastic_rounding=True, seed=0):
        super().__init__(stochastic_rounding, seed)
        self.lr = V.check_float(lr, "lr", nonneg=True)

    def __repr__(self):
        return f"SGD(lr={self.lr})"

    def _apply(self, k, run, w):
        if V.is16(w.dtype):     # two phases: the update rounds once per slot
            run(w, self.lr, run.scratch(self), None, 0.0, self._round_seed(w))
        else:
            run(w, -self.lr, None, None, 0.0, 0)


class _Accumulating(_Fused):
    """A fused optimizer with an accumulator per weight array (``state``,
    keyed by the array's address and size), in the dtype the kernels
    compute in (float32 for a 16-bit weight)."""

    def __init__(self, lr, eps, stochastic_rounding, seed):
        super().__init__(stochastic_rounding, seed)
        self.lr = V.check_float(lr, "lr", nonneg=True)
        self.eps = V.check_float(eps, "eps", nonneg=True)
        self.state = {}

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr}, eps={self.eps})"

    def _state(self, weight, size):
        key = self._key(weight)
        s = self.state.get(key)
        if s is None:
            s = self._keep("state", key, weight, _zeros(weight, size))
        elif s.size != size:
            raise ValueError(f"state: expected {size} values for this weight, got {s.size} "
                             f"(bound by use_state or made by an earlier step)")
        return s

    def use_state(self, weight, state):
        """Keep the accumulator of ``weight`` in the caller's array ``state``
        (the dtype the kernels compute in: float32 for a 16-bit weight, else
        the weight's; C-contiguous; updated in place), e.g. a buffer that a
        torch module saves in its state_dict. Binding the same memory again
        is a no-op.

        Parameters
        ----------
        weight : ndarray (NumPy or CuPy)
            The array the optimizer updates.
        state : ndarray of the same kind (and device)
            Writeable and C-contiguous, in the compute dtype; ``weight.size``
            values (Adagrad) or one per row (RowwiseAdagrad: ``weight.shape[0]``
            of a 2-D weight, a divisor of a flat one's size). Anything else
            is a ValueError. It is bound as it is (not zeroed): its values
            are the accumulator's from here on.

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> w, mine = np.zeros(64, np.float32), np.zeros(64, np.float32)
        >>> opt = he.Adagrad(0.1)
        >>> opt.use_state(w, mine)
        >>> he.embedding_bag_backward(np.ones((1, 4), np.float32), np.array([[3]]),
        ...                           scheme=he.RobeZ(64, 4), weight=w, optimizer=opt)
        >>> float(mine.sum())              # four slots, each g**2 = 1
        4.0
        """
        key = self._key(weight)
        dtype = V.compute_dtype(weight.dtype)
        same = is_cupy(state) if is_cupy(weight) else isinstance(state, np.ndarray)
        if (not same or not self._fits(weight, state.size)
                or state.dtype != dtype or not state.flags.c_contiguous
                or not (is_cupy(state) or state.flags.writeable)):
            raise ValueError(f"state: expected a writeable C-contiguous {dtype} array "
                             f"of {self._sizes(weight)}, got {V._desc(state)}")
        if is_cupy(weight) and device_id(state) != device_id(weight):
            raise ValueError(f"state: expected an array on device {device_id(weight)} like "
                             f"weight, got one on device {device_id(state)} (hashemb never "
                             f"copies between devices)")
        bound = self.state.get(key)
        if bound is not None and data_ptr(bound) == data_ptr(state):
            return
        self._keep("state", key, weight, state.reshape(-1))
        # a scratch is made when a step needs one (never for a full table
        # summed per row, nor for row-wise Adagrad): none is kept for it here
        self._scratch.pop(key, None)


class Adagrad(_Accumulating):
    r"""Adagrad fused into backward, one accumulator per slot:

    .. math::

        s_j \leftarrow s_j + g_j^2, \qquad
        w_j \leftarrow w_j - \mathrm{lr}\, g_j / (\sqrt{s_j} + \epsilon)

    where :math:`g_j` is the full gradient of slot j for the batch (summed over
    every entry that hits it first, then applied once). The optimizer keeps a
    state array and a zeroed scratch array per weight array it has updated
    (``state[key]``, keyed by the array's address and size, and dropped
    when the NumPy array owning that memory is freed: a new weight starts
    from zeros wherever the allocator puts it; a CuPy weight's entry stays
    until the optimizer goes, so a new CuPy weight wants a new optimizer),
    float32 for a 16-bit weight. A full table large next to its batch (not max mode)
    sums each touched row's gradient instead (CPU: in a compact buffer; GPU:
    entries sorted by row, deterministic): the same results, memory for the
    rows touched only.

    Parameters
    ----------
    lr, eps : float{rounding}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> robe = he.RobeZ(64, 4)
    >>> w = np.zeros(64, np.float32)
    >>> opt = he.Adagrad(0.1)
    >>> he.embedding_bag_backward(np.ones((1, 4), np.float32), np.array([[3]]),
    ...                           scheme=robe, weight=w, optimizer=opt)
    >>> round(float(w.sum()), 5)       # every touched slot moves by lr
    -0.4
    """

    def __init__(self, lr, eps=1e-10, *, stochastic_rounding=True, seed=0):
        super().__init__(lr, eps, stochastic_rounding, seed)

    def state_for(self, weight):
        """The accumulator of ``weight`` (zeros until its first update) and
        its zeroed scratch (see scratch_for).

        Parameters
        ----------
        weight : ndarray (NumPy or CuPy)

        Returns
        -------
        (state, scratch) : two flat arrays of ``weight.size`` values
            In the compute dtype (float32 for a 16-bit weight). ``state`` is
            the optimizer's own array (made on first use, or the one bound
            by :meth:`use_state`): writes to it change the next step.
        """
        return self._state(weight, weight.size), self.scratch_for(weight)

    @staticmethod
    def _fits(weight, size):
        return size == weight.size

    @staticmethod
    def _sizes(weight):
        return f"{weight.size} values"

    def _apply(self, k, run, w):
        run(w, self.lr, run.scratch(self), self._state(w, w.size), self.eps,
            self._round_seed(w))


class RowwiseAdagrad(_Accumulating):
    r"""Row-wise Adagrad fused into backward (FBGEMM's EXACT_ROWWISE_ADAGRAD):
    one accumulator per row of a full table, not one per element:

    .. math::

        G_r \leftarrow G_r + \frac{1}{D} \sum_i g_{ri}^2, \qquad
        w_{ri} \leftarrow w_{ri} - \mathrm{lr}\, g_{ri} / (\sqrt{G_r} + \epsilon)

    where :math:`g_r` is the row's gradient for the batch (summed over every
    entry that reads it first; rows not read are left alone). The
    accumulator takes 1/D of Adagrad's memory: 135 MB instead of 2.2 GB for
    the 33.76M rows of Criteo Kaggle at D=16, the reason it is the usual
    optimizer of large tables. Squares are summed in double; the
    multiplier and the steps are formed in double (hashemb/optim.h), so the
    CPU and the GPU give the same bits.

    For :class:`~hashemb.FullTable` schemes in ``"sum"`` or ``"mean"`` mode
    (as FBGEMM's table-batched embeddings): a hashed array has no rows
    (each slot serves many rows, and its per-slot :class:`Adagrad` state is
    as small as the array), and max mode sends each element's gradient to
    a different row. Each touched row's gradient is summed first, in entry
    order, with no scratch the size of the table: the CPU in a compact
    buffer per thread, the GPU by sorting the entries by row (so its
    result is deterministic, and the CPU's bits).

    Parameters
    ----------
    lr, eps : float{rounding}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> full = he.FullTable([5, 3], 4)
    >>> w = np.zeros(full.weight_shape, np.float32)
    >>> opt = he.RowwiseAdagrad(0.1)
    >>> g = np.array([[3.0, 4.0, 0.0, 0.0]], np.float32)     # mean square 6.25
    >>> he.embedding_bag_backward(g, np.array([[2]]), scheme=full, weight=w, optimizer=opt)
    >>> w[2].tolist()                  # lr * g / sqrt(6.25)
    [-0.12000000476837158, -0.1599999964237213, 0.0, 0.0]
    >>> next(iter(opt.state.values())).tolist()      # one value per row
    [0.0, 0.0, 6.25, 0.0, 0.0, 0.0, 0.0, 0.0]
    """

    def __init__(self, lr, eps=1e-10, *, stochastic_rounding=True, seed=0):
        super().__init__(lr, eps, stochastic_rounding, seed)

    def state_for(self, weight, rows):
        """The accumulator of ``weight``, one value per row (zeros until the
        row's first update).

        Parameters
        ----------
        weight : ndarray (NumPy or CuPy)
        rows : int
            Rows of the table: ``weight.shape[0]`` of a ``(rows, D)`` weight,
            ``weight.size // D`` of a flat one (a FullTable's
            ``scheme.size // scheme.dim``). The first call for a weight makes
            the accumulator of that many values (it is not checked against
            ``weight`` then: a wrong count is refused at the next step); a
            later call with another count is a ValueError.

        Returns
        -------
        ndarray, 1-D of ``rows`` values
            The optimizer's own array, in the compute dtype.

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> full = he.FullTable([5, 3], 4)
        >>> w = np.zeros(full.weight_shape, np.float32)
        >>> opt = he.RowwiseAdagrad(0.1)
        >>> g = np.array([[3.0, 4.0, 0.0, 0.0]], np.float32)
        >>> he.embedding_bag_backward(g, np.array([[2]]), scheme=full, weight=w, optimizer=opt)
        >>> opt.state_for(w, 8).tolist()      # row 2: the mean square of its gradient
        [0.0, 0.0, 6.25, 0.0, 0.0, 0.0, 0.0, 0.0]
        """
        return self._state(weight, rows)

    @staticmethod
    def _fits(weight, size):
        # a (rows, D) weight says its rows; a flat one only that they divide it
        # (a wrong count bound here failed at the first step, far from the cause)
        if weight.ndim == 2:
            return size == weight.shape[0]
        return 0 < size and weight.size % size == 0

    @staticmethod
    def _sizes(weight):
        if weight.ndim == 2:
            return f"one value per row ({weight.shape[0]})"
        return f"one value per row (a divisor of {weight.size})"

    def _apply(self, k, run, w):
        run(w, self.lr, "row", self._state(w, run.rows), self.eps, self._round_seed(w))


def check_optimizer(optimizer, scheme=None, mode=None):
    """``optimizer`` itself, checked: None, SGD, Adagrad, or (given the
    bag's ``scheme`` and ``mode``) RowwiseAdagrad of a full table."""
    if optimizer is None or isinstance(optimizer, (SGD, Adagrad)):
        return optimizer
    if isinstance(optimizer, RowwiseAdagrad) and scheme is not None:
        if getattr(scheme, "_kind", None) != 0:         # HE_FULL
            raise ValueError(f"optimizer: RowwiseAdagrad keeps one accumulator per row "
                             f"of a table; expected a FullTable scheme (hashed arrays: "
                             f"hashemb.Adagrad), got {type(scheme).__name__}")
        if mode == "max":
            raise ValueError("optimizer: RowwiseAdagrad expected mode 'sum' or 'mean' "
                             "(as FBGEMM), got 'max'")
        return optimizer
    names = ("hashemb.SGD, hashemb.Adagrad or hashemb.RowwiseAdagrad" if scheme is not None
             else "hashemb.SGD or hashemb.Adagrad")
    raise TypeError(f"optimizer: expected None, {names}, got {type(optimizer).__name__}")


SGD.__doc__ = SGD.__doc__.replace("{rounding}", _ROUNDING)
Adagrad.__doc__ = Adagrad.__doc__.replace("{rounding}", _ROUNDING)
RowwiseAdagrad.__doc__ = RowwiseAdagrad.__doc__.replace("{rounding}", _ROUNDING)
