"""hashemb's universal hash family over the Mersenne prime P = 2^61 - 1."""
import numpy as np

from . import _validate as V
from ._backend import is_cupy, kernels

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
    SplitMix64 words, so exactly uniform.

    Parameters
    ----------
    seed : int
        Non-negative, below 2**64: SplitMix64's starting state.
    count : int
        Coefficients wanted; a longer list of the same seed starts with the
        shorter one.

    Returns
    -------
    list of int
        ``count`` Python ints below :math:`P = 2^{61} - 1` (what
        :class:`UniversalHash` holds: ``coefficients(seed, 12)``).

    Examples
    --------
    >>> import numpy as np
    >>> c = coefficients(5, 12)
    >>> all(0 < v < P for v in c[:3]) and c[:8] == coefficients(5, 8)
    True
    >>> np.array_equal(UniversalHash(5).coef, np.array(c, np.uint64))
    True
    """
    state, out = V.check_seed(seed), []
    while len(out) < count:
        state, z = _splitmix64(state)
        v = z >> 3
        if v < P and (v > 0 or len(out) % 4 == 3):
            out.append(v)
    return out


def sign_terms(sign_coef, coef):
    r"""``sign_coef`` (``c_i = C' i mod P``, one per element) followed by the
    terms of the sign cubic expanded around each ``c_i``, then the cubic's
    forward differences in ``i``: for a row whose sign key base is ``s``,
    :math:`q(s + c) = Q_3 s^3 + s^2 B_2 + s B_1 + B_0` with

    .. math::

        B_0 = q(c),\quad B_1 = 3 Q_3 c^2 + 2 Q_2 c + Q_1,\quad B_2 = 3 Q_3 c + Q_2

    (mod P), so a row's signs take two multiply-adds an element (slots.h,
    ``he_signs``) where Horner takes three; the residues, and so the signs,
    are the same. ``coef`` is the 12 coefficients of :class:`UniversalHash`.

    As ``c_i`` is linear in ``i``, :math:`f(i) = q(s + c_i)` is a cubic in
    ``i`` over GF(P), and rows of many elements step through it by forward
    differences (slots.h, ``he_signs_of``): three additions mod P an element,

    .. math::

        f(0) = Q_3 s^3 + s^2 B_2(0) + s B_1(0) + B_0(0),\quad
        \Delta f(0) = s^2 \Delta B_2 + s \Delta B_1 + \Delta B_0,\quad
        \Delta^2 f(0) = s \Delta^2 B_1 + \Delta^2 B_0,\quad \Delta^3 f = \Delta^3 B_0

    (:math:`\Delta B(0) = B(1) - B(0)`, and so on; :math:`B_2` is linear and
    :math:`B_1` quadratic in ``i``, so their higher differences are 0).

    Returns
    -------
    numpy.ndarray
        uint64 of length ``4 D + 9``: ``c``, ``B_0``, ``B_1``, ``B_2``, then
        :math:`B_0(0), B_1(0), B_2(0), \Delta B_0, \Delta B_1, \Delta B_2,
        \Delta^2 B_0, \Delta^2 B_1, \Delta^3 B_0`.

    Examples
    --------
    >>> h = UniversalHash(3)
    >>> c = np.array([h.coef[6] * i % P for i in range(2)], np.uint64)
    >>> t = [int(v) for v in sign_terms(c, h.coef)]
    >>> q1, q2, q3, q0 = (int(v) for v in h.coef[8:])
    >>> s, k = 12345, (12345 + t[1]) % P
    >>> (q3 * s**3 + s * s * t[7] + s * t[5] + t[3]) % P == (q0 + q1*k + q2*k*k + q3*k**3) % P
    True
    >>> f0, d1 = (q3 * s**3 + s * s * t[10] + s * t[9] + t[8]) % P, \
    ...     (s * s * t[13] + s * t[12] + t[11]) % P
    >>> (f0 + d1) % P == (q0 + q1*k + q2*k*k + q3*k**3) % P
    True
    """
    q1, q2, q3, q0 = (int(v) for v in coef[8:12])

    def terms(x):
        return ((((q3 * x + q2) * x + q1) * x + q0) % P, ((3 * q3 * x + 2 * q2) * x + q1) % P,
                (3 * q3 * x + q2) % P)

    c = [int(v) for v in sign_coef]
    b0, b1, b2 = zip(*(terms(x) for x in c)) if c else ((), (), ())
    # the differences at i = 0 from c_0 .. c_3, whatever D is
    e = [terms(int(coef[6]) * i % P) for i in range(4)]
    diffs = [e[0][0], e[0][1], e[0][2],
             (e[1][0] - e[0][0]) % P, (e[1][1] - e[0][1]) % P, (e[1][2] - e[0][2]) % P,
             (e[2][0] - 2 * e[1][0] + e[0][0]) % P, (e[2][1] - 2 * e[1][1] + e[0][1]) % P,
             (e[3][0] - 3 * e[2][0] + 3 * e[1][0] - e[0][0]) % P]
    return np.array(c + list(b0) + list(b1) + list(b2) + diffs, np.uint64)


class UniversalHash:
    r"""A seeded member of the universal family over :math:`P = 2^{61}-1`.

    .. math::

        h(e, u, c) = ((A e + B u + C c + D_0) \bmod P) \bmod m

        g(e, u, c) = 1 - 2\,(q(k) \bmod 2),\quad
        k = (A' e + B' u + C' c + D_0') \bmod P,\quad
        q(k) = (Q_0 + Q_1 k + Q_2 k^2 + Q_3 k^3) \bmod P

    with :math:`A, B, C, A', B', C', Q_1, Q_2, Q_3` uniform on :math:`[1, P)` and
    :math:`D_0, D_0', Q_0` on :math:`[0, P)`, all drawn from ``seed`` by SplitMix64
    (pure Python, so a seed's hash never changes with the NumPy version). Keys
    are any 64-bit integers: they are reduced mod P first (as ALGORITHMS.md
    specifies) and every product is exact (128-bit), so nothing wraps. Keys
    equal mod P are one key: as :math:`2^{64} \equiv 8 \pmod P`, a negative
    int64 token :math:`-j` (:math:`1 \le j \le 8`) hashes as :math:`8 - j`
    under every seed (a missing-value -1 shares token 7's slots and signs),
    and :math:`u` as :math:`u - P` above :math:`P`. Keep sentinels
    non-negative (or give them an id of their own); ids from a 64-bit hash
    meet this way with chance about 8 / 2**61 a pair.

    ``h`` is pairwise independent over keys distinct mod P, which is all a
    slot needs. The sign goes
    through the cubic ``q`` because the parity of the linear key alone is
    correlated in fours (keys with :math:`k_1 + k_4 = k_2 + k_3`, such as any
    grid of (token, element) pairs, give :math:`E[g_1 g_2 g_3 g_4] \approx 1/3`),
    and the variance of a signed sketch (ROBE Theorem 1, :mod:`hashemb.theory`)
    needs 4-wise independent signs: with the linear sign an all-ones vector's
    inner-product estimate has about 400x the variance the theorem gives.

    Parameters
    ----------
    seed : int
        Non-negative integer below 2**64.

    Attributes
    ----------
    P : int
        The prime, 2**61 - 1.
    coef : numpy.ndarray of uint64, shape (12,)
        ``[A, B, C, D0, A', B', C', D0', Q1, Q2, Q3, Q0]``.

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> h = he.UniversalHash(seed=0)
    >>> h(np.arange(4), 1000).shape
    (4,)
    >>> bool(((h(np.arange(4), 1000) >= 0) & (h(np.arange(4), 1000) < 1000)).all())
    True
    >>> A, B, C, D0 = (int(c) for c in h.coef[:4])
    >>> int(h(np.array([10**12]), 1000, table=2, block=1)[0]) == \
    ...     (A * 2 + B * 10**12 + C * 1 + D0) % h.P % 1000
    True
    """

    P = P

    def __init__(self, seed=0):
        self.seed = V.check_seed(seed)
        self.coef = np.array(coefficients(self.seed, 12), dtype=np.uint64)

    def __repr__(self):
        return f"UniversalHash(seed={self.seed})"

    def __getstate__(self):
        # without the device copies of coef a GPU call keeps on the object:
        # unpickling them needs CuPy and the device they were on
        state = self.__dict__.copy()
        state.pop("_gpu_coef", None)
        return state

    def __call__(self, keys, m, *, table=0, block=0):
        r"""``h(table, keys, block)``: int64 array of slots in ``[0, m)`` (a CuPy
        array for CuPy keys, computed on their device).

        Parameters
        ----------
        keys : array_like of int32, int64 or uint64, any shape
            The u of the formula, one hash each.
        m : int
            Range of the slots, 1 <= m < 2**62.
        table, block : int
            The e and c of the formula (any 64-bit integer).

        Returns
        -------
        ndarray of int64, ``keys``' shape
            :math:`((A e + B u + C c + D_0) \bmod P) \bmod m` for each key.
        """
        if is_cupy(keys):
            from ._gpu import slots as G
            return G.universal_hash(self, keys, m, table, block)
        return self._eval(self.coef[:4], keys, m, table, block)

    def sign(self, keys, *, table=0, element=0):
        r"""``g(table, keys, element)``: float32 array of +1/-1 (a CuPy array for
        CuPy keys, computed on their device).

        Parameters
        ----------
        keys : array_like of int32, int64 or uint64, any shape
        table, element : int
            The e and c of the sign formula.

        Returns
        -------
        ndarray of float32, ``keys``' shape
            :math:`1 - 2\,(q(k) \bmod 2)` for each key.
        """
        if is_cupy(keys):
            from ._gpu import slots as G
            return G.universal_sign(self, keys, table, element)
        keys, flat, table, element = self._args(keys, table, element, "element")
        out = np.empty(keys.shape, dtype=np.float32)
        kernels(keys).universal_sign(self.coef[4:], flat, table, element, out.reshape(-1))
        return out

    def _eval(self, coef, keys, m, table, block):
        keys, flat, table, block = self._args(keys, table, block, "block")
        m = V.check_positive_int(m, "m", upper=1 << 62)
        out = np.empty(keys.shape, dtype=np.int64)
        kernels(keys).universal_hash(np.ascontiguousarray(coef), flat, table, block, m,
                                     out.reshape(-1))
        return out

    @staticmethod
    def _args(keys, table, third, name):
        keys = V.as_keys(keys, "keys")
        return keys, keys.reshape(-1), V.check_key(table, "table"), V.check_key(third, name)
