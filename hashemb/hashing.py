"""hashemb's universal hash family over the Mersenne prime P = 2^61 - 1."""
import numpy as np

from . import _validate as V
from ._backend import kernels

P = (1 << 61) - 1
_MASK64 = (1 << 64) - 1


def _splitmix64(state):
    """One step of SplitMix64: (new state, 64-bit output). Pure Python so the
    coefficients of a seed never change with the NumPy version."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def coefficients(seed, count=8):
    """``[A, B, C, D0, ...]`` from ``seed``: multipliers (positions 4k..4k+2)
    uniform on [1, P), constants (4k+3) on [0, P). Rejection sampling of 61-bit
    SplitMix64 words, so exactly uniform."""
    state, out = V.check_seed(seed), []
    while len(out) < count:
        state, z = _splitmix64(state)
        v = z >> 3
        if v < P and (v > 0 or len(out) % 4 == 3):
            out.append(v)
    return out


class UniversalHash:
    r"""A seeded member of the universal family over :math:`P = 2^{61}-1`.

    .. math::

        h(e, u, c) = ((A e + B u + C c + D_0) \bmod P) \bmod m

        g(e, u, c) = 1 - 2\,(((A' e + B' u + C' c + D_0') \bmod P) \bmod 2)

    with :math:`A, B, C, A', B', C'` uniform on :math:`[1, P)` and
    :math:`D_0, D_0'` on :math:`[0, P)`, all drawn from ``seed`` by SplitMix64
    (pure Python, so a seed's hash never changes with the NumPy version). Keys are any 64-bit integers: they are reduced mod P first and
    every product is exact (128-bit), so nothing wraps.

    Parameters
    ----------
    seed : int
        Non-negative integer below 2**64.

    Attributes
    ----------
    P : int
        The prime, 2**61 - 1.
    coef : numpy.ndarray of uint64, shape (8,)
        ``[A, B, C, D0, A', B', C', D0']``.

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> h = he.UniversalHash(seed=0)
    >>> h(np.arange(4), 1000).shape
    (4,)
    >>> bool(((h(np.arange(4), 1000) >= 0) & (h(np.arange(4), 1000) < 1000)).all())
    True
    """

    P = P

    def __init__(self, seed=0):
        self.seed = V.check_seed(seed)
        self.coef = np.array(coefficients(self.seed, 8), dtype=np.uint64)

    def __repr__(self):
        return f"UniversalHash(seed={self.seed})"

    def __call__(self, keys, m, *, table=0, block=0):
        """``h(table, keys, block)``: int64 array of slots in ``[0, m)``."""
        return self._eval(self.coef[:4], keys, m, table, block)

    def sign(self, keys, *, table=0, element=0):
        """``g(table, keys, element)``: float32 array of +1/-1."""
        bits = self._eval(self.coef[4:], keys, 2, table, element)
        return (1 - 2 * bits).astype(np.float32)

    def _eval(self, coef, keys, m, table, block):
        keys = V.as_keys(keys, "keys")
        m = V.check_positive_int(m, "m", upper=1 << 62)
        table = V.check_key(table, "table")
        block = V.check_key(block, "block")
        out = np.empty(keys.shape, dtype=np.int64)
        flat = keys.reshape(-1)
        kernels(keys).universal_hash(np.ascontiguousarray(coef), flat, table, block, m,
                                     out.reshape(-1))
        return out
