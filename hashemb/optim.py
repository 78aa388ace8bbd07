"""Fused optimizers: passed as ``optimizer=`` to a backward, they update the
array in place in the same pass, with no full-size gradient returned."""
import numpy as np

from . import _validate as V
from ._backend import array_module, data_ptr, is_cupy


class SGD:
    r"""Plain SGD fused into backward: :math:`w_j \leftarrow w_j - \mathrm{lr}\, g_j`.

    Each contribution is subtracted as it is scattered (no gradient buffer), in
    entry order per slot, so the result equals backward-then-update up to float
    rounding of the summation order.

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> robe = he.RobeZ(64, 4)
    >>> w = np.zeros(64, np.float32)
    >>> he.embedding_bag_backward(np.ones((1, 4), np.float32), np.array([[3]]),
    ...                           scheme=robe, weight=w, optimizer=he.SGD(0.5))
    >>> float(w.sum())
    -2.0
    """

    def __init__(self, lr):
        self.lr = V.check_float(lr, "lr", nonneg=True)

    def __repr__(self):
        return f"SGD(lr={self.lr})"

    def _apply(self, k, run, w):
        run(w, -self.lr, np.empty(0, w.dtype), np.empty(0, w.dtype), 0.0)


class Adagrad:
    r"""Adagrad fused into backward, one accumulator per slot:

    .. math::

        s_j \leftarrow s_j + g_j^2, \qquad
        w_j \leftarrow w_j - \mathrm{lr}\, g_j / (\sqrt{s_j} + \epsilon)

    where :math:`g_j` is the full gradient of slot j for the batch (summed over
    every entry that hits it first, then applied once). The optimizer keeps a
    state array and a zeroed scratch array per weight array it has updated
    (``state[key]``, keyed by the array's address and size).

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

    def __init__(self, lr, eps=1e-10):
        self.lr = V.check_float(lr, "lr", nonneg=True)
        self.eps = V.check_float(eps, "eps", nonneg=True)
        self.state = {}
        self._scratch = {}

    def __repr__(self):
        return f"Adagrad(lr={self.lr}, eps={self.eps})"

    def state_for(self, weight):
        """The accumulator of ``weight`` (zeros until its first update)."""
        key = self._key(weight)
        if key not in self.state:
            xp = array_module(weight)      # CuPy weights keep their state on the device
            self.state[key] = xp.zeros(weight.size, weight.dtype)
            self._scratch[key] = xp.zeros(weight.size, weight.dtype)
        return self.state[key], self._scratch[key]

    def use_state(self, weight, state):
        """Keep the accumulator of ``weight`` in the caller's array ``state``
        (same size and dtype, C-contiguous; updated in place), e.g. a buffer
        that a torch module saves in its state_dict. Binding the same memory
        again is a no-op (the scratch array is kept)."""
        key = self._key(weight)
        same = is_cupy(state) if is_cupy(weight) else isinstance(state, np.ndarray)
        if (not same or state.size != weight.size
                or state.dtype != weight.dtype or not state.flags.c_contiguous
                or not (is_cupy(state) or state.flags.writeable)):
            raise ValueError(f"state: expected a writeable C-contiguous {weight.dtype} array "
                             f"of {weight.size} values, got {V._desc(state)}")
        bound = self.state.get(key)
        if bound is not None and data_ptr(bound) == data_ptr(state):
            return
        self.state[key] = state.reshape(-1)
        self._scratch[key] = array_module(weight).zeros(weight.size, weight.dtype)

    @staticmethod
    def _key(weight):
        return (("cupy", weight.device.id) if is_cupy(weight) else "numpy", data_ptr(weight),
                weight.size, weight.dtype.str)

    def _apply(self, k, run, w):
        state, scratch = self.state_for(w)
        run(w, self.lr, scratch, state, self.eps)


def check_optimizer(optimizer):
    if optimizer is not None and not isinstance(optimizer, (SGD, Adagrad)):
        raise TypeError(f"optimizer: expected None, hashemb.SGD or hashemb.Adagrad, "
                        f"got {type(optimizer).__name__}")
    return optimizer
