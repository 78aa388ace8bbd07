r"""The ROBE paper's theory (section 4, appendix B), computed for hashemb's own maps.

Flatten every parameter of a model into :math:`\theta \in \mathbb{R}^n` and store
it in :math:`m` floats with the signed ROBE-Z map: element :math:`i` sits in
block :math:`b(i) = \lfloor i/Z \rfloor` at position :math:`a(i) = i \bmod Z`,
the block starts at a hashed offset :math:`h(b)` of the circular array, and

.. math:: \hat\theta_j = \sum_{i:\ \mathrm{slot}(i) = j} g(i)\,\theta_i,
   \qquad \mathrm{slot}(i) = (h(b(i)) + a(i)) \bmod m.

The sketch is made by :class:`hashemb.RobeZ` itself (same hash, same signs), so
what this module computes is what the library does. Closed forms assume ideal
randomness: uniform offsets and 4-wise independent signs, which hashemb's sign
hash provides (see :class:`hashemb.UniversalHash`); the tests check them against
exact enumeration of every hash outcome and against Monte Carlo over seeds.

What the math and the simulations show (README "Theory"):

* Theorem 1 holds as stated: :math:`\langle\hat x,\hat y\rangle` is unbiased and
  :math:`V_Z = \frac1m\sum_{b(i)\ne b(k)} (x_i^2 y_k^2 + x_i y_i x_k y_k)`.
  It needs 4-wise independent signs: with the pairwise (linear) sign hash of
  the spec, an all-ones vector has about 400x this variance.
* :math:`V_Z \le V_1` always, and :math:`V_Z` never increases when Z grows *by
  divisibility* (nested blocks). It is not monotone in Z in general: blocks of
  3 can split a pair that blocks of 2 keep together.
* Without wrap-around (the authors' layout, offsets uniform on
  :math:`[0, m-Z]`) collisions are likelier; the variance grows by about
  :math:`1 + 2Z/(3m)` (measured 1.331 at Z = 128, m = 256, where that gives
  1.333) and the exact figure is :func:`inner_product_variance` with
  ``wrap=False``.
* Theorem 2: for rows a, b of an embedding table, :math:`E\langle\hat a,\hat b\rangle
  = \sum_k a_k b_k (1 + p_k)` with :math:`p_k` the chance that elements
  :math:`a_k, b_k` collide: 0 in the same block, :math:`1/m` otherwise (wrap).
  With Z < D two rows never share a block, so the estimate is always biased by
  :math:`\langle a,b\rangle/m`; only Z >= D rows of one block are unbiased.
* The unsigned map (what the paper's experiments run) is biased:
  :math:`E = \langle x,y\rangle + \sum_{i\ne k} p_{ik} x_i y_k`.
"""
import statistics
from dataclasses import dataclass

import numpy as np

from . import _validate as V
from ._backend import array_module
from .hashing import UniversalHash
from .schemes import RobeZ

__all__ = ["sketch", "inner_product_estimates", "inner_product_expectation",
           "inner_product_variance", "embedding_inner_product_expectation",
           "embedding_inner_product_estimates", "monte_carlo", "MonteCarlo",
           "vector_families"]


def _vector(x, name):
    xp = array_module(x)
    try:
        x = xp.asarray(x)
    except (ValueError, TypeError) as e:     # ragged lists and the like
        raise TypeError(f"{name}: expected a real array, got {V._desc(x)} ({e})") from None
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected a real array, got dtype {x.dtype}")
    x = x.astype(xp.float64).reshape(-1)
    if x.size == 0:
        raise ValueError(f"{name}: expected at least one element, got an empty array")
    if not bool(xp.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return x


def _pair(x, y):
    x, y = _vector(x, "x"), _vector(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"y: expected {x.shape[0]} elements like x, got {y.shape[0]}")
    return x, y


def _map_args(m, block, dim):
    m = V.check_positive_int(m, "m", upper=1 << 61)
    block = V.check_positive_int(block, "block", upper=1 << 20)
    if block > m:
        raise ValueError(f"block: expected block <= m = {m}, got {block}")
    if dim is not None:
        dim = V.check_positive_int(dim, "dim", upper=1 << 20)
    return m, block, dim


def _blocks(v, Z):
    """v as (blocks, Z), zero-padded: row b holds the elements of block b."""
    xp = array_module(v)
    pad = (-v.shape[0]) % Z
    if pad:
        v = xp.concatenate([v, xp.zeros(pad, v.dtype)])
    return v.reshape(-1, Z)


def _collision_matrix(m, Z, wrap, xp):
    """P[a, a'] = Pr(slot of position a in one block == slot of a' in another)."""
    if wrap:
        return xp.full((Z, Z), 1.0 / m)
    mm = m - Z + 1                       # offsets uniform on [0, m - Z]
    d = xp.abs(xp.arange(Z)[:, None] - xp.arange(Z)[None, :])
    return xp.where(d < mm, (mm - d) / float(mm) ** 2, 0.0)


def _pair_sum(u, v, m, Z, wrap):
    r"""\sum_{b(i) != b(k)} Pr(slot_i = slot_k) u_i v_k, in O(n) (wrap) or O(nZ)."""
    xp = array_module(u)
    U, W = _blocks(u, Z), _blocks(v, Z)
    # each block against the sum of the OTHER blocks, made of prefix and
    # suffix sums: "all pairs minus same-block pairs" cancelled to 0 (or a
    # negative variance) when one block held nearly all the mass
    if wrap:
        return float((U.sum(1) * _others(W.sum(1), xp)).sum()) / m
    P = _collision_matrix(m, Z, False, xp)
    return float(xp.einsum("ba,ac,bc->", U, P, _others(W, xp)))


def _others(W, xp):
    """Row b: the sum of every row of W but b (no subtraction)."""
    zero = xp.zeros((1,) + W.shape[1:], W.dtype)
    before = xp.concatenate([zero, xp.cumsum(W, axis=0)[:-1]])
    after = xp.concatenate([xp.cumsum(W[::-1], axis=0)[::-1][1:], zero])
    return before + after


def inner_product_variance(x, y, m, *, block, wrap=True):
    r"""Exact variance of the signed ROBE-Z estimate :math:`\langle\hat x, \hat y\rangle`
    (Theorem 1).

    .. math::

        V_Z = \sum_{b(i) \ne b(k)} p_{ik}\,(x_i^2 y_k^2 + x_i y_i x_k y_k),
        \qquad p_{ik} = \Pr(\mathrm{slot}_i = \mathrm{slot}_k)

    with :math:`p_{ik} = 1/m` when blocks wrap around the circular array, and
    :math:`(m' - |a_i - a_k|)/m'^2`, :math:`m' = m - Z + 1`, when they do not
    (``wrap=False``, the ROBE authors' layout). Elements of one block never
    collide (:math:`Z \le m`). With wrap-around this is

    .. math::

        V_Z = \frac1m\Big(\|x\|^2\|y\|^2 + \langle x,y\rangle^2
              - \sum_b \big(X_b Y_b + W_b^2\big)\Big),

    :math:`X_b = \sum_{i\in b} x_i^2`, :math:`Y_b = \sum_{i\in b} y_i^2`,
    :math:`W_b = \sum_{i\in b} x_i y_i`: O(n) time (O(nZ) without wrap).
    ``block=1`` is feature hashing's variance (Weinberger et al. 2009).

    Parameters
    ----------
    x, y : array_like
        Real vectors of the same length n (flattened).
    m : int
        Floats in the array.
    block : int
        Z, at most m. Any positive Z: blocks are consecutive runs of Z elements
        of the flattened vector, exactly as :class:`hashemb.RobeZ` lays out a
        table whose width D divides Z or is divided by it.
    wrap : bool

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from hashemb import theory
    >>> x = np.ones(8)
    >>> theory.inner_product_variance(x, x, 16, block=1)   # (64 + 64 - 16) / 16
    7.0
    >>> theory.inner_product_variance(x, x, 16, block=8)   # one block: no collisions
    0.0
    """
    x, y = _pair(x, y)
    m, Z, _ = _map_args(m, block, None)
    wrap = V.check_flag(wrap, "wrap")       # a string 'False' read as True
    return _pair_sum(x * x, y * y, m, Z, wrap) + _pair_sum(x * y, x * y, m, Z, wrap)


def inner_product_expectation(x, y, m, *, block, signed=True, wrap=True):
    r"""Exact expectation of :math:`\langle\hat x, \hat y\rangle` over the hash.

    Signed: :math:`\langle x, y\rangle` (unbiased). Unsigned (what the ROBE
    experiments run): every collision adds its product,

    .. math:: \langle x, y\rangle + \sum_{b(i) \ne b(k)} p_{ik}\, x_i y_k,

    which is :math:`\langle x,y\rangle + ((\sum x)(\sum y) - \sum_b x_b y_b)/m`
    with wrap-around, :math:`x_b, y_b` the block sums.

    Parameters
    ----------
    x, y : array_like
        Real vectors of the same length n (flattened).
    m : int
        Floats in the array.
    block : int
        Z, at most m.
    signed : bool
        The signed map (unbiased) or the unsigned one.
    wrap : bool
        Blocks wrap around the circular array (else :math:`p_{ik}` as in
        :func:`inner_product_variance` with ``wrap=False``).

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from hashemb import theory
    >>> x = np.ones(8)
    >>> theory.inner_product_expectation(x, x, 16, block=1, signed=False)  # 8 + 56/16
    11.5
    """
    x, y = _pair(x, y)
    m, Z, _ = _map_args(m, block, None)
    signed, wrap = V.check_flag(signed, "signed"), V.check_flag(wrap, "wrap")
    exact = float(x @ y)
    return exact if signed else exact + _pair_sum(x, y, m, Z, wrap)


def _linear_signs(seed, rows, Z, xp=np):
    """The spec's original sign: parity of a linear hash of (token, element),
    pairwise but not 4-wise independent. Kept to show why hashemb does not use it."""
    h = UniversalHash(V.check_seed(seed) ^ 0x5EED5EED5EED5EED)
    tokens = xp.arange(rows, dtype=np.int64)
    return xp.stack([1.0 - 2.0 * h(tokens, 2, block=i) for i in range(Z)], axis=1)


def _robe(m, Z, dim, seed, signed, wrap):
    return RobeZ(m, Z if dim is None else dim, block=Z, seed=seed, signed=signed, wrap=wrap)


def _table(theta, Z, dim):
    """theta as the (rows, D) table the scheme stores (D = Z without ``dim``)."""
    if dim is None:
        return _blocks(theta, Z)
    if theta.shape[0] % dim:
        raise ValueError(f"theta: expected a multiple of dim = {dim} elements, got {theta.shape[0]}")
    return theta.reshape(-1, dim)


def _sketch_table(table, scheme, signs):
    """(slots, signs) of every element of the (rows, D) table, on its side
    (the scheme's GPU kernels for a CuPy table)."""
    xp = array_module(table)
    rows = xp.arange(table.shape[0], dtype=np.int64)
    slots = scheme.slots(rows)
    g = scheme.signs(rows) if signs == "cubic" else _linear_signs(scheme.seed, *table.shape, xp)
    return slots, g


def _summed(slots, g, table, m):
    """The sketch: sum of g * table into m slots (a CuPy table's by
    cupy.bincount: its atomic adds sum in no fixed order)."""
    return array_module(table).bincount(slots.reshape(-1), weights=(g * table).reshape(-1), minlength=m)


def _check_signs(signs, signed):
    if signs not in ("cubic", "linear"):
        raise ValueError(f"signs: expected 'cubic' or 'linear', got {signs!r}")
    if signs == "linear" and not signed:
        raise ValueError("signs: 'linear' applies to a signed sketch, got signed=False")


def sketch(theta, m, *, block, seed=0, signed=True, wrap=True, dim=None, signs="cubic"):
    r"""Compress :math:`\theta \in \mathbb{R}^n` into :math:`\mathbb{R}^m` with the
    (signed) ROBE-Z map of :class:`hashemb.RobeZ`.

    .. math:: \hat\theta_j = \sum_{i:\ \mathrm{slot}(i)=j} g(i)\,\theta_i

    This is the array a ROBE-Z model would hold if its parameters were summed
    into it; reading element i back is :math:`g(i)\hat\theta_{\mathrm{slot}(i)}`.

    Parameters
    ----------
    theta : array_like
        Flattened; zero-padded to a multiple of ``block`` when ``dim`` is None.
    m : int
    block : int
        Z.
    seed : int
        Seed of the scheme's hash.
    signed, wrap : bool
        As :class:`hashemb.RobeZ`.
    dim : int, optional
        Read theta as a (rows, dim) embedding table stored by
        ``RobeZ(m, dim, block)`` (Z divides dim or dim divides Z). Default: rows
        of one block, ``RobeZ(m, block, block)``. Both give block ``i // Z`` and
        position ``i % Z`` to flat element i; only the hash keys differ.
    signs : {"cubic", "linear"}
        "cubic" is the library's 4-wise independent sign. "linear" is the parity
        of a linear hash, only pairwise independent, kept for experiments that
        show what it breaks (see :func:`inner_product_variance`).

    Returns
    -------
    ndarray of float64, shape (m,)
        NumPy, or CuPy for a CuPy ``theta`` (the slots and signs from the
        scheme's GPU kernels, equal to the CPU's; the sums by atomic adds,
        equal to rounding).

    Examples
    --------
    >>> import numpy as np
    >>> from hashemb import theory
    >>> s = theory.sketch(np.arange(6.0), 4, block=2, seed=1)
    >>> s.shape
    (4,)
    >>> float(theory.sketch(np.arange(6.0), 4, block=2, signed=False).sum())  # mass kept
    15.0
    """
    theta = _vector(theta, "theta")
    m, Z, dim = _map_args(m, block, dim)
    _check_signs(signs, signed)
    table = _table(theta, Z, dim)
    slots, g = _sketch_table(table, _robe(m, Z, dim, seed, signed, wrap), signs)
    return _summed(slots, g, table, m)


def _seed_list(seeds):
    if isinstance(seeds, (int, np.integer)):
        seeds = range(V.check_positive_int(seeds, "seeds"))
    try:
        seeds = [V.check_int(s, "seeds", lo=0, hi=1 << 64) for s in seeds]
    except TypeError as e:
        raise TypeError(f"seeds: expected an int or an iterable of ints, got {V._desc(seeds)}"
                        f" ({e})") from None
    if not seeds:
        raise ValueError("seeds: expected at least one seed, got none")
    return seeds


def _progress(seeds, progress, what):
    if not progress:
        return seeds
    from tqdm.auto import tqdm
    return tqdm(seeds, desc=what, unit="seed")


def inner_product_estimates(x, y, m, *, block, seeds=2000, signed=True, wrap=True,
                            signs="cubic", progress=False):
    r"""One estimate :math:`\langle\hat x, \hat y\rangle` per seed: both vectors
    sketched with the same map (:func:`sketch`), then the inner product of the
    sketches.

    Parameters
    ----------
    x, y : array_like
    m, block, signed, wrap, signs
        As :func:`sketch`.
    seeds : int or iterable of int
        An int n means seeds 0..n-1.
    progress : bool
        A tqdm bar over the seeds.

    Returns
    -------
    ndarray of float64, one estimate per seed (CuPy for CuPy input).

    Examples
    --------
    >>> import numpy as np
    >>> from hashemb import theory
    >>> x = np.random.default_rng(0).standard_normal(256)
    >>> est = theory.inner_product_estimates(x, x, 64, block=4, seeds=500)
    >>> bool(abs(est.mean() - x @ x) < 4 * est.std() / np.sqrt(500))   # unbiased
    True
    """
    x, y = _pair(x, y)
    m, Z, _ = _map_args(m, block, None)
    _check_signs(signs, signed)
    X, Y = _blocks(x, Z), _blocks(y, Z)
    out = []
    for seed in _progress(_seed_list(seeds), progress, "sketches"):
        slots, g = _sketch_table(X, _robe(m, Z, None, seed, signed, wrap), signs)
        out.append(_summed(slots, g, X, m) @ _summed(slots, g, Y, m))
    return array_module(X).stack(out) if out else array_module(X).zeros(0)


def _rows_args(theta, a, b, dim, block):
    n_rows = theta.shape[0] // dim
    a = V.check_int(a, "a", lo=0, hi=n_rows)
    b = V.check_int(b, "b", lo=0, hi=n_rows)
    if a == b:
        raise ValueError(f"b: expected a row other than a = {a}, got {b}")
    if block % dim and dim % block:
        raise ValueError(f"block: expected a divisor or a multiple of dim = {dim}, got {block}")
    return a, b


def embedding_inner_product_expectation(theta, a, b, m, *, dim, block, wrap=True):
    r"""Exact :math:`E\langle\hat a, \hat b\rangle` for rows a and b of an embedding
    table stored by the signed ``RobeZ(m, dim, block)`` (Theorem 2).

    .. math:: E\langle\hat a,\hat b\rangle = \sum_k a_k b_k\,(1 + p_k)

    :math:`p_k` is the chance that element k of row a and element k of row b
    share a slot: 0 when they lie in one block (Z >= D and
    :math:`\lfloor a/r \rfloor = \lfloor b/r \rfloor`, r = Z/D), :math:`1/m`
    otherwise with wrap-around, :math:`(m'-|\Delta|)/m'^2` without
    (:math:`\Delta` their positions' difference, :math:`m' = m-Z+1`). So
    different blocks give the paper's :math:`\langle a,b\rangle(1 + 1/m)`; the
    rest of theta only adds variance.

    Parameters
    ----------
    theta : array_like
        The table, read as ``(rows, dim)`` (flattened first; its length a
        multiple of ``dim``).
    a, b : int
        Two different rows.
    m : int
        Floats in the array.
    dim : int
        D, the table's width.
    block : int
        Z, a divisor or a multiple of ``dim``, at most m.
    wrap : bool

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from hashemb import theory
    >>> theta = np.ones((4, 2))
    >>> theory.embedding_inner_product_expectation(theta, 0, 1, 10, dim=2, block=1)
    2.2
    >>> theory.embedding_inner_product_expectation(theta, 0, 1, 10, dim=2, block=4)
    2.0
    """
    theta = _vector(theta, "theta")
    m, Z, dim = _map_args(m, block, dim)
    wrap = V.check_flag(wrap, "wrap")
    table = _table(theta, Z, dim)
    a, b = _rows_args(theta, a, b, dim, Z)
    ra, rb = table[a], table[b]
    r = max(Z // dim, 1)
    if Z >= dim and a // r == b // r:
        return float(ra @ rb)
    if wrap:
        return float(ra @ rb) * (1 + 1 / m)
    pa, pb = (a % r) * dim if Z > dim else 0, (b % r) * dim if Z > dim else 0
    pos = np.arange(dim) % Z
    P = _collision_matrix(m, Z, False, np)
    return float((ra * rb * (1 + P[pos + pa, pos + pb])).sum())


def embedding_inner_product_estimates(theta, a, b, m, *, dim, block, seeds=2000,
                                      wrap=True, progress=False):
    r"""One :math:`\langle\hat a, \hat b\rangle` per seed: theta (a table of width
    ``dim``) is sketched by the signed ``RobeZ(m, dim, block, seed)`` and rows a,
    b are read back as the model reads them, :math:`\hat a_k = g(a,k)\,
    \hat\theta_{\mathrm{slot}(a,k)}`.

    Parameters
    ----------
    theta, a, b, m, dim, block, wrap
        As :func:`embedding_inner_product_expectation`.
    seeds : int or iterable of int
        An int n means seeds 0..n-1.
    progress : bool
        A tqdm bar over the seeds.

    Returns
    -------
    ndarray of float64, one estimate per seed (CuPy for CuPy input).

    Examples
    --------
    >>> import numpy as np
    >>> from hashemb import theory
    >>> theta = np.random.default_rng(0).standard_normal((32, 4))
    >>> theory.embedding_inner_product_estimates(theta, 0, 1, 64, dim=4, block=2, seeds=3).shape
    (3,)
    >>> import hashemb as he                 # seed 5's estimate, read back by hand:
    >>> est = theory.embedding_inner_product_estimates(theta, 0, 1, 64, dim=4, block=2,
    ...                                                seeds=[5])
    >>> s = theory.sketch(theta, 64, block=2, dim=4, seed=5)
    >>> robe = he.RobeZ(64, 4, block=2, seed=5, signed=True)
    >>> a, b = (robe.signs(np.array([r]))[0] * s[robe.slots(np.array([r]))[0]] for r in (0, 1))
    >>> bool(np.isclose(est[0], a @ b))
    True
    """
    theta = _vector(theta, "theta")
    m, Z, dim = _map_args(m, block, dim)
    table = _table(theta, Z, dim)
    a, b = _rows_args(theta, a, b, dim, Z)
    out = []
    for seed in _progress(_seed_list(seeds), progress, "sketches"):
        scheme = _robe(m, Z, dim, seed, True, wrap)
        slots, g = _sketch_table(table, scheme, "cubic")
        s = _summed(slots, g, table, m)
        out.append((g[a] * s[slots[a]]) @ (g[b] * s[slots[b]]))
    return array_module(table).stack(out) if out else array_module(table).zeros(0)


def vector_families(n, seed=2026):
    """Pairs (x, y) of length n on which the tests and the README check the theory.

    * ``gaussian``: x iid N(0, 1), y = x + N(0, 1).
    * ``pareto``: heavy tailed iid, x = Pareto(1.5) with random signs,
      y = x/2 + Pareto(1.5) (no finite variance as a distribution).
    * ``zipf``: magnitudes decaying as 1/(i+1) along the vector with random signs
      (parameters sorted by token frequency), y = x plus 10% noise of the same
      profile: the mass sits in the first blocks, so Z matters most here.
    * ``all-ones``: x = y = 1, the structured case a weak sign hash gets wrong.

    Parameters
    ----------
    n : int
        Length of every vector.
    seed : int
        Seed of NumPy's ``default_rng``: the same pairs each call.

    Returns
    -------
    dict
        Family name to a pair ``(x, y)`` of float64 arrays of length n.

    Examples
    --------
    >>> from hashemb import theory
    >>> fam = theory.vector_families(8)
    >>> sorted(fam)
    ['all-ones', 'gaussian', 'pareto', 'zipf']
    >>> fam["gaussian"][0].shape, fam["all-ones"][1].tolist() == [1.0] * 8
    ((8,), True)
    """
    n = V.check_positive_int(n, "n")
    rng = np.random.default_rng(V.check_seed(seed))
    g = rng.standard_normal(n)
    p = rng.pareto(1.5, n) * rng.choice([-1.0, 1.0], n)
    decay = 1.0 / np.arange(1, n + 1)
    z = decay * rng.choice([-1.0, 1.0], n)
    return {"gaussian": (g, g + rng.standard_normal(n)),
            "pareto": (p, 0.5 * p + rng.pareto(1.5, n)),
            "zipf": (z, z + 0.1 * decay * rng.standard_normal(n)),
            "all-ones": (np.ones(n), np.ones(n))}


@dataclass
class MonteCarlo:
    """Empirical mean and variance of estimates, with confidence intervals.

    ``mean_ci`` is the normal interval :math:`\\bar v \\pm z\\,s/\\sqrt N`;
    ``variance_ci`` the asymptotic interval of the sample variance,
    :math:`s^2 \\pm z\\sqrt{(\\hat\\mu_4 - s^4)/N}` with the sample fourth
    central moment (valid for any distribution with a fourth moment, unlike the
    chi-square interval, which assumes normal estimates).

    Made by :func:`monte_carlo`, which computes every field from the estimates.

    Parameters
    ----------
    estimates : numpy.ndarray of float64
        The estimates summarised (one per seed).
    confidence : float
        Of both intervals, in (0, 1).
    mean, variance : float
        Sample mean :math:`\bar v` and unbiased sample variance :math:`s^2`.
    mean_ci, variance_ci : tuple of float
        The ``(low, high)`` intervals above.

    Examples
    --------
    >>> import numpy as np
    >>> from hashemb import theory
    >>> mc = theory.monte_carlo(np.array([1.0, 2.0, 3.0, 4.0]), confidence=0.95)
    >>> mc.mean, round(mc.variance, 4)
    (2.5, 1.6667)
    >>> mc.covers(mean=2.5), mc.covers(mean=10.0)
    (True, False)
    """
    estimates: np.ndarray
    confidence: float
    mean: float
    variance: float
    mean_ci: tuple
    variance_ci: tuple

    def covers(self, mean=None, variance=None):
        """Whether the intervals hold the given (theoretical) mean and variance.

        Parameters
        ----------
        mean, variance : float, optional
            Values to test (None: not tested).

        Returns
        -------
        bool
            True when every value given lies in its closed interval.
        """
        ok = True
        if mean is not None:
            ok &= self.mean_ci[0] <= mean <= self.mean_ci[1]
        if variance is not None:
            ok &= self.variance_ci[0] <= variance <= self.variance_ci[1]
        return bool(ok)


def monte_carlo(estimates, confidence=0.99):
    r"""Summarise estimates (one per seed) as a :class:`MonteCarlo`.

    Parameters
    ----------
    estimates : array_like
        At least 2 finite real values (flattened).
    confidence : float
        Of the intervals, in (0, 1).

    Returns
    -------
    MonteCarlo

    Examples
    --------
    >>> import numpy as np
    >>> from hashemb import theory
    >>> x = np.random.default_rng(1).standard_normal(128)
    >>> mc = theory.monte_carlo(theory.inner_product_estimates(x, x, 32, block=8, seeds=2000))
    >>> mc.covers(mean=x @ x, variance=theory.inner_product_variance(x, x, 32, block=8))
    True
    """
    v = _vector(estimates, "estimates")
    if v.shape[0] < 2:
        raise ValueError(f"estimates: expected at least 2, got {v.shape[0]}")
    confidence = V.check_float(confidence, "confidence", positive=True)
    if confidence >= 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    n = v.shape[0]
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    mean, var = float(v.mean()), float(v.var(ddof=1))
    mu4 = float(((v - mean) ** 4).mean())
    half_m = z * np.sqrt(var / n)
    half_v = z * np.sqrt(max(mu4 - var * var, 0.0) / n)
    return MonteCarlo(v, confidence, mean, var, (mean - half_m, mean + half_m),
                      (var - half_v, var + half_v))
