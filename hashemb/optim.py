"""Fused optimizers: passed as ``optimizer=`` to a backward, they update the
array in place in the same pass, with no full-size gradient returned."""
import numpy as np

from . import _validate as V
from ._backend import array_module, data_ptr, is_cupy

_MASK = (1 << 64) - 1

_ROUNDING = """
    stochastic_rounding : bool
        For float16 weights only (float32 / float64 are updated exactly as
        above): each slot's update is computed in float32 from its summed
        gradient and rounded once to float16, stochastically (default: up
        with probability equal to the remainder over the float16 spacing, so
        the stored value is unbiased and steps under half a spacing still
        move it on average) or, with False, to nearest even. The random bits
        are a hash of (seed, call, slot): the same on any thread count and
        on CPU and GPU.
    seed : int
        Seed of those bits."""


class _Fused:
    """What both fused optimizers keep per weight array: a zeroed float
    scratch for the two-phase update (Adagrad; SGD of float16 weights) and
    the rounding stream of float16 weights."""

    def __init__(self, stochastic_rounding, seed):
        self.stochastic_rounding = bool(stochastic_rounding)
        self.seed = V.check_seed(seed)
        self._calls = 0
        self._scratch = {}

    @staticmethod
    def _key(weight):
        return (("cupy", weight.device.id) if is_cupy(weight) else "numpy", data_ptr(weight),
                weight.size, weight.dtype.str)

    def scratch_for(self, weight):
        """The zeroed scratch of ``weight``: its gradient is summed there,
        applied once per slot, and cleared as it is applied."""
        key = self._key(weight)
        s = self._scratch.get(key)
        if s is None:
            s = self._scratch[key] = array_module(weight).zeros(
                weight.size, V.compute_dtype(weight.dtype))
        return s

    def _round_seed(self, weight):
        """The seed of this call's rounding bits: 0 (to nearest) unless a
        float16 weight is rounded stochastically; a new one per call."""
        if weight.dtype != V._HALF or not self.stochastic_rounding:
            return 0
        self._calls += 1
        z = (self.seed * 0x9E3779B97F4A7C15 + self._calls * 0xD1B54A32D192ED03) & _MASK
        z = ((z ^ (z >> 29)) * 0xBF58476D1CE4E5B9) & _MASK
        return (z ^ (z >> 32)) or 1


class SGD(_Fused):
    r"""Plain SGD fused into backward: :math:`w_j \leftarrow w_j - \mathrm{lr}\, g_j`.

    Each contribution is subtracted as it is scattered (no gradient buffer), in
    entry order per slot, so the result equals backward-then-update up to float
    rounding of the summation order. A float16 weight is updated in two
    phases instead: the gradient is summed in a float32 scratch (kept by the
    optimizer, the array's size), then each touched slot moves once and is
    rounded to float16.

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
        if w.dtype == V._HALF:      # two phases: the update rounds once per slot
            run(w, self.lr, run.scratch(self), None, 0.0, self._round_seed(w))
        else:
            run(w, -self.lr, None, None, 0.0, 0)


class Adagrad(_Fused):
    r"""Adagrad fused into backward, one accumulator per slot:

    .. math::

        s_j \leftarrow s_j + g_j^2, \qquad
        w_j \leftarrow w_j - \mathrm{lr}\, g_j / (\sqrt{s_j} + \epsilon)

    where :math:`g_j` is the full gradient of slot j for the batch (summed over
    every entry that hits it first, then applied once). The optimizer keeps a
    state array and a zeroed scratch array per weight array it has updated
    (``state[key]``, keyed by the array's address and size), float32 for a
    float16 weight.

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
        super().__init__(stochastic_rounding, seed)
        self.lr = V.check_float(lr, "lr", nonneg=True)
        self.eps = V.check_float(eps, "eps", nonneg=True)
        self.state = {}

    def __repr__(self):
        return f"Adagrad(lr={self.lr}, eps={self.eps})"

    def state_for(self, weight):
        """The accumulator of ``weight`` (zeros until its first update) and
        its zeroed scratch (see scratch_for)."""
        return self._state(weight), self.scratch_for(weight)

    def _state(self, weight):
        key = self._key(weight)
        if key not in self.state:
            xp = array_module(weight)      # CuPy weights keep their state on the device
            self.state[key] = xp.zeros(weight.size, V.compute_dtype(weight.dtype))
        return self.state[key]

    def use_state(self, weight, state):
        """Keep the accumulator of ``weight`` in the caller's array ``state``
        (same size, the dtype the kernels compute in: float32 for a float16
        weight, else the weight's; C-contiguous; updated in place), e.g. a
        buffer that a torch module saves in its state_dict. Binding the same
        memory again is a no-op (the scratch array is kept)."""
        key = self._key(weight)
        dtype = V.compute_dtype(weight.dtype)
        same = is_cupy(state) if is_cupy(weight) else isinstance(state, np.ndarray)
        if (not same or state.size != weight.size
                or state.dtype != dtype or not state.flags.c_contiguous
                or not (is_cupy(state) or state.flags.writeable)):
            raise ValueError(f"state: expected a writeable C-contiguous {dtype} array "
                             f"of {weight.size} values, got {V._desc(state)}")
        bound = self.state.get(key)
        if bound is not None and data_ptr(bound) == data_ptr(state):
            return
        self.state[key] = state.reshape(-1)
        self._scratch[key] = array_module(weight).zeros(weight.size, dtype)

    def _apply(self, k, run, w):
        run(w, self.lr, run.scratch(self), self._state(w), self.eps, self._round_seed(w))


def check_optimizer(optimizer):
    if optimizer is not None and not isinstance(optimizer, (SGD, Adagrad)):
        raise TypeError(f"optimizer: expected None, hashemb.SGD or hashemb.Adagrad, "
                        f"got {type(optimizer).__name__}")
    return optimizer


SGD.__doc__ = SGD.__doc__.replace("{rounding}", _ROUNDING)
Adagrad.__doc__ = Adagrad.__doc__.replace("{rounding}", _ROUNDING)
