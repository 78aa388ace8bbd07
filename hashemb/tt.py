r"""Tensor-train (TT-Rec) embedding tables: shapes, initialisation, the bag
forward, backward to the cores with fused SGD / Adagrad, and an LFU cache.

A table of :math:`n` rows by :math:`D = \prod_k q_k` columns is stored as
:math:`d = 2..4` cores; core :math:`k` has shape :math:`(p_k, R_k, q_k, R_{k+1})`
with :math:`R_0 = R_d = 1` and :math:`n \le \prod_k p_k`. Row :math:`x`, written
in mixed radix :math:`x = ((x_0 p_1 + x_1) p_2 + x_2) \dots` (most significant
digit first), is the chain product

.. math::

    W[x] = \mathrm{vec}\big(G_0[x_0]\, G_1[x_1] \cdots G_{d-1}[x_{d-1}]\big),
    \qquad G_k[v] \in \mathbb{R}^{R_k \times q_k R_{k+1}}

reshaped to :math:`D` with :math:`q_0` the most significant output digit
(element :math:`j = (j_0 q_1 + j_1) q_2 + j_2 \dots`).

The CPU kernels (:mod:`hashemb._cpu._tt`) group the lookups by digit, so each
chain step is a handful of real matrix products (register-tiled, AVX2+FMA
where the CPU has it) rather than one tiny product per lookup; duplicate rows
in a batch are computed once.
"""
import bisect
import math
import numbers
import sys
from collections import namedtuple

import numpy as np

from . import _validate as V
from ._backend import (array_module, device_id, fork_safe_lock, host, is_cupy, on_gpu, place,
                       recycled)
from .optim import SGD, Adagrad, check_optimizer

WEIGHT_DISTS = ("uniform", "normal", "approx-uniform", "approx-normal")

_DET = """
    On the CPU results are deterministic and independent of the thread
    count (every sum has a fixed order); float sums may differ in the last
    bits from torch's."""

_tt = None


def _k():
    global _tt
    if _tt is None:
        from ._cpu import _tt as mod
        _tt = mod
    return _tt


# ---------------------------------------------------------------- shapes

_SMALL_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def _is_prime(n):
    """Miller-Rabin with the first 12 primes as bases: exact below 3.3e24
    (num_embeddings is below 2**61)."""
    if n < 2:
        return False
    for p in _SMALL_PRIMES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _SMALL_PRIMES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _split(n):
    """A factor 1 < f < n of a composite n with no factor below 1000
    (Pollard's rho, Brent's cycle search over x^2 + c)."""
    for c in range(1, n):
        x = y = 2
        f, r = 1, 1
        while f == 1:
            x = y
            for _ in range(r):
                y = (y * y + c) % n
            k = 0
            while k < r and f == 1:
                for _ in range(min(128, r - k)):
                    y = (y * y + c) % n
                    f = math.gcd(abs(x - y), n)
                    if f != 1:
                        break
                k += 128
            r *= 2
        if f != n:
            return f
    raise AssertionError(f"no factor of {n}")      # (unreachable for a composite n)


def _prime_factors(n):
    """The prime factors of n, ascending, with repeats: trial division below
    1000, then Miller-Rabin and Pollard's rho (trial division alone took
    88 s for the prime 2**61 - 1; rho takes about n**(1/4) steps)."""
    out, f = [], 2
    while f < 1000 and f * f <= n:
        while n % f == 0:
            out.append(f)
            n //= f
        f += 1 if f == 2 else 2
    rest = [n] if n > 1 else []
    while rest:
        m = rest.pop()
        if m < 1000 * 1000 or _is_prime(m):     # (no factor below 1000 is left)
            out.append(m)
        else:
            g = _split(m)
            rest += [g, m // g]
    return sorted(out)


def _divisors(n):
    divs = [1]
    for p in sorted(set(_prime_factors(n))):
        e = 0
        m = n
        while m % p == 0:
            m //= p
            e += 1
        divs = [d * p ** i for d in divs for i in range(e + 1)]
    return sorted(divs)


def _factorisations(n, d):
    """Every multiset of d factors >= 1 with product n, as non-increasing tuples."""
    divs = _divisors(n)

    def rec(m, k, cap):
        if k == 1:
            if m <= cap:
                yield (m,)
            return
        for f in reversed(divs):
            if f > cap or m % f:
                continue
            if f ** k < m:         # f must be the largest of the k factors left
                break
            for rest in rec(m // f, k - 1, f):
                yield (f,) + rest
    return list(rec(n, d, n))


def _entropy(factors):
    """Balance of a factorisation: the entropy of log f_i / log prod f
    (log d when all factors are equal, 0 when one factor holds everything)."""
    total = sum(math.log(f) for f in factors)
    if total == 0:
        return math.log(len(factors))
    h = 0.0
    for f in factors:
        w = math.log(f) / total
        if w > 0:
            h -= w * math.log(w)
    return h


def _most_balanced(n, d):
    """The factorisation of n into d factors of the highest entropy (ties: the
    smallest largest factor, then the first in _factorisations' order, i.e.
    the largest next factors). Branch and bound over the largest factor
    first, ascending from n^(1/d): the best entropy a prefix can still reach
    (the rest split equally) falls as its factor grows, so the search stops
    there. Listing every factorisation took 68 s for 963,761,198,400 rows in
    4 cores."""
    divs = _divisors(n)
    total = math.log(n) if n > 1 else 0.0
    best = [None, None]     # (key, factors)

    def reach(logs, rest, k):
        # entropy of these factors' logs and k equal shares of log(rest)
        if total == 0:
            return math.log(d)
        ws = [x / total for x in logs] + [math.log(rest) / k / total] * k
        return -sum(w * math.log(w) for w in ws if w > 0)

    def rec(m, k, cap, prefix, logs):
        if k == 1:
            if m <= cap:
                f = prefix + (m,)
                key = (round(_entropy(f), 12), -f[0], f[1:])
                if best[0] is None or key > best[0]:
                    best[0], best[1] = key, f
            return
        lo = bisect.bisect_left(divs, math.floor(m ** (1.0 / k)))
        for f in divs[lo:]:
            if f > cap:
                break
            if m % f or f ** k < m:
                continue
            with_f = logs + [math.log(f)]
            if best[0] is not None and reach(with_f, m // f, k - 1) < best[0][0] - 1e-11:
                break
            rec(m // f, k - 1, f, prefix + (f,), with_f)

    rec(n, d, n, (), [])
    return best[1]


def tt_shapes(num_embeddings, embedding_dim, num_cores=3, *, round_up=True, max_waste=0.1):
    r"""Automatic TT shapes: ``p`` with :math:`\prod p \ge n`, ``q`` with :math:`\prod q = D`.

    Each is the most balanced factorisation into ``num_cores`` factors: the
    highest entropy of :math:`\log f_k / \log \prod f` (all multisets of
    factors are tried, from the prime factorisation). With ``round_up`` the
    row count may grow to :math:`\lceil n / 10^k \rceil 10^k` for any
    :math:`k \ge 1` that wastes at most ``max_waste`` (10%) more rows, which
    often balances far better (a prime :math:`n` has no factorisation but
    itself); ties go to the fewest rows. Factors are returned largest first.

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    num_cores : int
        2, 3 or 4.
    round_up : bool
    max_waste : float
        Largest relative row excess allowed by rounding up.

    Returns
    -------
    (p, q) : two lists of int

    Examples
    --------
    >>> import hashemb as he
    >>> he.tt_shapes(11_000_000, 64)
    ([250, 220, 200], [4, 4, 4])
    >>> he.tt_shapes(1_000_003, 16)       # prime: rounded up to 1,010,000
    ([101, 100, 100], [4, 2, 2])
    """
    n = V.check_positive_int(num_embeddings, "num_embeddings", upper=1 << 61)
    D = V.check_positive_int(embedding_dim, "embedding_dim", upper=1 << 20)
    d = V.check_int(num_cores, "num_cores", lo=2, hi=5)
    waste = V.check_float(max_waste, "max_waste", nonneg=True)
    cands = [n]
    if round_up:
        k = 1
        while 10 ** k <= n * 10:
            m = -(-n // 10 ** k) * 10 ** k
            if m <= n * (1 + waste) and m not in cands:
                cands.append(m)
            k += 1
    best = None
    for m in cands:
        f = _most_balanced(m, d)
        key = (round(_entropy(f), 12), -m)
        if best is None or key > best[0]:
            best = (key, f)
    return list(best[1]), list(_most_balanced(D, d))


# ---------------------------------------------------------------- cores

TTShape = namedtuple("TTShape", "p q R n D dtype")


def _as_cores(cores, name="cores", *, writable=False, be=None):
    """Validated cores: (list of C-contiguous arrays, TTShape without n).
    ``be``: a GPU backend (hashemb._gpu) whose arrays the cores must be."""
    kind = "numpy arrays" if be is None else f"{be.name} arrays"
    is_array = (lambda c: isinstance(c, np.ndarray)) if be is None else be.is_array
    contiguous = np.ascontiguousarray if be is None else be.xp.ascontiguousarray
    if isinstance(cores, np.ndarray) or is_array(cores) or not isinstance(cores, (list, tuple)):
        raise TypeError(f"{name}: expected a list of 2 to 4 {kind} (the TT cores), "
                        f"got {V._desc(cores)}")
    if not 2 <= len(cores) <= 4:
        raise ValueError(f"{name}: expected 2 to 4 cores, got {len(cores)}")
    out, p, q, R = [], [], [], [1]
    dtype = None
    for k, c in enumerate(cores):
        if not is_array(c):
            want = "numpy.ndarray" if be is None else f"{be.name} array"
            raise TypeError(f"{name}[{k}]: expected a {want}, got {V._desc(c)}")
        if c.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}[{k}]: expected a float32 or float64 array, got dtype {c.dtype}")
        if dtype is None:
            dtype = c.dtype
        elif c.dtype != dtype:
            raise TypeError(f"{name}[{k}]: expected dtype {dtype} (as {name}[0]), got {c.dtype}")
        if c.ndim != 4:
            raise ValueError(f"{name}[{k}]: expected a 4-D array (p_k, R_k, q_k, R_k+1), "
                             f"got shape {c.shape}")
        if c.shape[1] != R[-1]:
            raise ValueError(f"{name}[{k}]: expected R_{k} = {R[-1]} in shape[1] (the rank "
                             f"after the previous core), got shape {c.shape}")
        if min(c.shape) < 1:
            raise ValueError(f"{name}[{k}]: expected every dimension >= 1, got shape {c.shape}")
        if writable:
            # CuPy arrays have no writeable flag: every device array is writeable
            if not c.flags.c_contiguous or not getattr(c.flags, "writeable", True):
                raise ValueError(f"{name}[{k}]: expected a writeable C-contiguous array for "
                                 "an in-place optimizer update, got a non-contiguous or "
                                 "read-only one")
        else:
            c = contiguous(c)
        out.append(c)
        p.append(c.shape[0])
        q.append(c.shape[2])
        R.append(c.shape[3])
    if R[-1] != 1:
        raise ValueError(f"{name}[{len(cores) - 1}]: expected the last rank R_d = 1 in shape[3], "
                         f"got shape {cores[-1].shape}")
    n = int(np.prod(p, dtype=object))
    if n > 1 << 62:     # row ids are int64 (an OverflowError without a name before)
        raise ValueError(f"{name}: expected prod(p) <= 2**62 rows (the first dimensions), "
                         f"got {n} = {' x '.join(map(str, p))}")
    return out, TTShape(p, q, R, n, int(np.prod(q)), dtype)


def _check_ranks(tt_ranks, d):
    if isinstance(tt_ranks, numbers.Integral):
        tt_ranks = [tt_ranks] * (d - 1)
    if not isinstance(tt_ranks, (list, tuple, np.ndarray)):
        raise TypeError(f"tt_ranks: expected a list of {d - 1} ints, got {V._desc(tt_ranks)}")
    if len(tt_ranks) != d - 1:
        raise ValueError(f"tt_ranks: expected {d - 1} ranks (one between each pair of "
                         f"{d} cores), got {len(tt_ranks)}")
    return [V.check_positive_int(r, "tt_ranks", upper=1 << 16) for r in tt_ranks]


def _check_factors(f, name, d=None):
    if not isinstance(f, (list, tuple, np.ndarray)):
        raise TypeError(f"{name}: expected a list of ints, got {V._desc(f)}")
    f = [V.check_positive_int(x, name, upper=1 << 40) for x in f]
    if not 2 <= len(f) <= 4 or (d is not None and len(f) != d):
        want = f"{d}" if d is not None else "2 to 4"
        raise ValueError(f"{name}: expected {want} factors (one per core), got {len(f)}")
    return f


def tt_core_shapes(p, q, tt_ranks):
    """Shapes ``(p_k, R_k, q_k, R_{k+1})`` of the cores (``tt_ranks`` are the
    d - 1 inner ranks).

    Parameters
    ----------
    p, q : list of int
        Row and column factors, one per core (2 to 4 cores, the same count).
    tt_ranks : list of int or int
        The d - 1 inner ranks, or one int for all of them.

    Returns
    -------
    list of tuple
        One ``(p[k], R_k, q[k], R_{k+1})`` per core, with ``R_0 = R_d = 1``.

    Examples
    --------
    >>> import hashemb as he
    >>> he.tt_core_shapes([200, 220, 250], [4, 4, 4], [32, 32])
    [(200, 1, 4, 32), (220, 32, 4, 32), (250, 32, 4, 1)]
    >>> he.tt_core_shapes([10, 10], [4, 4], 8)
    [(10, 1, 4, 8), (10, 8, 4, 1)]
    """
    p = _check_factors(p, "p")
    q = _check_factors(q, "q", len(p))
    R = [1] + _check_ranks(tt_ranks, len(p)) + [1]
    return [(p[k], R[k], q[k], R[k + 1]) for k in range(len(p))]


def tt_init(num_embeddings, p, q, tt_ranks, weight_dist="approx-normal", *, seed=0,
            dtype=np.float32, like=None):
    r"""Random cores for a TT table of ``num_embeddings`` rows.

    Every core entry is drawn i.i.d. from one distribution, chosen so a
    full-table entry :math:`W[x, j]` (a sum over :math:`P = \prod_k R_k` rank
    paths of products of :math:`d` core entries) has known moments:

    ``"approx-normal"`` (default)
        :math:`N(0, s^2)`, :math:`s = (3nP)^{-1/(2d)}`: the full entries have
        mean 0 and variance :math:`1/(3n)`, approximately normal (a sum of
        :math:`P` independent-ish products). FBTT's reference draws
        :math:`N(0,1)\,(3n)^{-1/6}` (3 cores) without the :math:`P` factor,
        so its table's scale grows with the ranks.
    ``"approx-uniform"``
        :math:`U(-\sqrt3 s, \sqrt3 s)`, same :math:`s`: the full entries have
        the mean and variance of DLRM's :math:`U(-1/\sqrt n, 1/\sqrt n)`
        (0 and :math:`1/(3n)`); their shape tends to normal as :math:`P` grows.
    ``"normal"``
        FBTT's: :math:`N(0, \sigma^2)`, :math:`\sigma = 1 / (\sqrt n\, R_1)`:
        mean 0, variance :math:`P \sigma^{2d}`.
    ``"uniform"``
        FBTT's: :math:`U(0, c)`, :math:`c = (2/(n + D))^{1/(2d)} P^{-1/(2d)}`:
        every full entry is positive, mean :math:`P (c/2)^d`.

    Parameters
    ----------
    num_embeddings : int
    p, q : list of int
        Row and column factors, one per core (:func:`tt_shapes`).
    tt_ranks : list of int or int
        The d - 1 inner ranks.
    weight_dist : str
    seed : int
    dtype : float32 or float64
    like : cupy.ndarray or numpy.ndarray, optional
        A CuPy array: the cores are returned on its device. They are drawn
        on the host (NumPy's normal and uniform generators) and copied: a
        train is the compressed table, kilobytes to megabytes.

    Returns
    -------
    list of ndarray
        Core k of shape ``(p[k], R_k, q[k], R_{k+1})`` (CuPy arrays with a
        CuPy ``like``).

    Examples
    --------
    >>> import hashemb as he
    >>> cores = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4])
    >>> [c.shape for c in cores]
    [(10, 1, 2, 4), (10, 4, 2, 4), (10, 4, 2, 1)]
    """
    n = V.check_positive_int(num_embeddings, "num_embeddings", upper=1 << 61)
    shapes = tt_core_shapes(p, q, tt_ranks)
    if int(np.prod(p, dtype=object)) < n:
        raise ValueError(f"p: expected prod(p) >= num_embeddings = {n}, got prod({list(p)}) = "
                         f"{int(np.prod(p, dtype=object))}")
    if weight_dist not in WEIGHT_DISTS:
        raise ValueError(f"weight_dist: expected one of {', '.join(map(repr, WEIGHT_DISTS))}, "
                         f"got {weight_dist!r}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
    on_device = V.check_like(like)
    rng = np.random.default_rng(V.check_seed(seed))
    d = len(shapes)
    P = float(np.prod([s[3] for s in shapes[:-1]]))
    D = int(np.prod(q))
    cores = []
    for shp in shapes:
        if weight_dist == "approx-normal":
            c = rng.standard_normal(shp) * (3.0 * n * P) ** (-1.0 / (2 * d))
        elif weight_dist == "approx-uniform":
            b = math.sqrt(3.0) * (3.0 * n * P) ** (-1.0 / (2 * d))
            c = rng.uniform(-b, b, shp)
        elif weight_dist == "normal":
            c = rng.standard_normal(shp) / (math.sqrt(n) * shapes[0][3])
        else:
            c = rng.uniform(0.0, (2.0 / (n + D)) ** (1.0 / (2 * d)) * P ** (-1.0 / (2 * d)), shp)
        cores.append(np.ascontiguousarray(c, dtype))
    if on_device:
        xp, on = place(like)
        with on:
            return [xp.asarray(c) for c in cores]
    return cores


def tt_to_full(cores, num_embeddings=None):
    r"""The table the cores represent: ``(num_embeddings, D)`` rows
    :math:`W[x] = \mathrm{vec}(G_0[x_0] \cdots G_{d-1}[x_{d-1}])` (for tests,
    export and ``full_weight()``; it costs the full table's memory).

    Parameters
    ----------
    cores : list of ndarray (NumPy or CuPy)
        2 to 4 cores, float32 or float64, core k of shape
        ``(p_k, R_k, q_k, R_{k+1})``.
    num_embeddings : int, optional
        Rows to return, at most ``prod p`` (the default).

    Returns
    -------
    ndarray of shape (num_embeddings, prod q), the cores' dtype

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> cores = he.tt_init(6, [2, 3], [2, 2], [3])
    >>> W = he.tt_to_full(cores)
    >>> W.shape
    (6, 4)
    >>> bool(np.allclose(W[5], (cores[0][1, 0] @ cores[1][2].reshape(3, 2)).reshape(-1)))
    True
    """
    if _on_gpu(cores, True):
        from ._gpu import tt as G
        return G.to_full(cores, num_embeddings)
    return _to_full(cores, num_embeddings, np)


def _to_full(cores, num_embeddings, xp, be=None):
    """tt_to_full's body for array module xp (numpy, or a GPU backend's)."""
    cores, s = _as_cores(cores, be=be)
    n = s.n if num_embeddings is None else V.check_positive_int(num_embeddings,
                                                                "num_embeddings", s.n + 1)
    full = cores[0].reshape(s.p[0], s.q[0], s.R[1])
    for k in range(1, len(cores)):
        full = xp.einsum("aqr,brcs->abqcs", full, cores[k])
        full = full.reshape(full.shape[0] * full.shape[1], -1, s.R[k + 1])
    return xp.ascontiguousarray(full.reshape(s.n, s.D)[:n])


def _on_gpu(tables, single, **arrays):
    """True for CuPy arrays (the cores of every table included), False for
    NumPy; TypeError naming the first host argument of a mix (hashemb never
    copies between host and device). Malformed table lists are left to the
    argument checks."""
    named = dict(arrays)
    if single:
        lists = [("cores", tables)]
    else:
        lists = ([(f"tables[{t}]", c) for t, c in enumerate(tables)]
                 if isinstance(tables, (list, tuple)) else [])
    for name, cores in lists:
        if isinstance(cores, (list, tuple)):
            named.update((f"{name}[{k}]", c) for k, c in enumerate(cores))
    return on_gpu(**named)


# ---------------------------------------------------------------- the LFU cache

class TTCache:
    r"""Uncompressed copies of the most used rows of a TT table (LFU).

    ``count(indices)`` adds every looked-up row to a frequency table (a
    linear-probing hash table of ``hashtbl_size`` slots; once three quarters
    of them hold rows, rows not yet in it are not counted: a fuller table's
    probes grow long). ``populate(cores)`` makes the
    ``capacity`` most frequent rows the cached set (ties: smaller row id) and
    fills them from the cores. A lookup of a cached row reads ``weight``
    instead of the cores, and its gradient trains ``weight`` instead of the
    cores.

    **Slots are stable.** A row that stays cached keeps its slot (its row of
    ``weight``), so per-element optimizer state kept by slot (a torch
    optimizer's on the cache parameter, a fused Adagrad's) stays with it;
    rows coming in take the slots rows left. ``populate`` returns those
    changed slots: pass ``optimizer=`` to zero a fused Adagrad's state there
    (a new row starts afresh, not with an evicted row's sums), and zero a
    torch optimizer's state of those rows yourself.

    **Eviction loses training.** A row that leaves the cache at the next
    ``populate`` goes back to its TT value, which did not change while the
    row was cached (its lookups trained ``weight`` only); the trained copy is
    dropped, not written back into the cores (a least-squares fit would move
    every row sharing those core slices). A row that stays cached keeps its
    trained value; a newly cached row starts from its current TT value.

    Parameters
    ----------
    capacity : int
        Rows kept (``cache_size``).
    dim : int
        Row width D.
    hashtbl_size : int, optional
        Slots of the frequency table; default ``max(4 * capacity, 1024)``.
    dtype : float32 or float64
    like : ndarray, optional
        A CuPy array: the cache lives on its device (every array below is a
        CuPy array there, and ``count``, ``populate`` and ``slots`` run
        there, taking device arrays only), for tables whose cores are on
        that device. Default: NumPy, for tables on the host. A device
        cache's ``keys`` / ``freq`` hold the same (row, count) pairs as the
        CPU's after the same counts, possibly in other slots (its rows are
        inserted in parallel, not one by one); ``rows``, ``weight`` and what
        ``populate`` returns are the CPU's.

    Attributes
    ----------
    rows : ndarray of int64
        The row id each slot holds, -1 for a free slot (empty until
        ``populate``; the first fills slots in ascending row order).
    weight : ndarray, shape (capacity, dim)
        Their values; row ``i`` holds ``rows[i]`` (free slots hold zeros).

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> cores = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4])
    >>> cache = he.TTCache(2, 8)
    >>> cache.count(np.array([7, 7, 7, 3, 3, 9]))
    >>> cache.populate(cores)                # the slots filled
    array([0, 1])
    >>> cache.rows
    array([3, 7])
    >>> bool(np.allclose(cache.weight[1], he.tt_to_full(cores)[7]))
    True
    >>> cache.count(np.full(5, 9))
    >>> cache.populate(cores)                # 9 takes 3's slot; 7 stays in its own
    array([0])
    >>> cache.rows
    array([9, 7])

    On a GPU (CuPy; the tables' cores and the ids on the same device):

    >>> import cupy                                            # doctest: +SKIP
    >>> dcores = [cupy.asarray(c) for c in cores]              # doctest: +SKIP
    >>> dcache = he.TTCache(2, 8, like=dcores[0])              # doctest: +SKIP
    >>> dcache.count(cupy.array([7, 7, 7, 3, 3, 9]))           # doctest: +SKIP
    >>> dcache.populate(dcores).tolist(), dcache.rows.tolist()   # doctest: +SKIP
    ([0, 1], [3, 7])
    """

    def __init__(self, capacity, dim, hashtbl_size=None, dtype=np.float32, *, like=None):
        self.capacity = V.check_int(capacity, "capacity", lo=0, hi=1 << 40)
        self.dim = V.check_positive_int(dim, "dim", upper=1 << 20)
        if hashtbl_size is None or hashtbl_size == 0:
            hashtbl_size = max(4 * self.capacity, 1024)
        size = V.check_positive_int(hashtbl_size, "hashtbl_size", upper=1 << 40)
        if size * 3 // 4 < self.capacity:
            # (FBTT's users may pass cache_size: that table could not hold
            # the cached rows' counts below the load cap)
            raise ValueError(f"hashtbl_size: expected at least 4/3 capacity = "
                             f"{-(-4 * self.capacity // 3)} (the frequency table stops "
                             f"inserting at 3/4 load), got {size}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64 (the cores'), got {np.dtype(dtype)}")
        if like is not None and not is_cupy(like) and not isinstance(like, np.ndarray):
            raise TypeError(f"like: expected None, a numpy.ndarray or a cupy.ndarray (where "
                            f"the cache lives), got {V._desc(like)}")
        xp, on = place(like)
        with on:
            self.keys = xp.full(size, -1, np.int64)
            self.freq = xp.zeros(size, np.int64)
            self._used = 0
            self.rows = xp.zeros(0, np.int64)
            self.weight = xp.zeros((self.capacity, self.dim), dtype)

    def _xp(self):
        """numpy, or cupy for a cache on a device."""
        return array_module(self.keys)

    def _here(self):
        """Context: the cache's device current (its new arrays made there)."""
        return place(self.keys)[1]

    def _same_side(self, x, name):
        """TypeError unless x is an array where the cache is (host or device),
        ValueError for another device."""
        if is_cupy(x) != is_cupy(self.keys):
            where = "a device (like=)" if is_cupy(self.keys) else "the host"
            raise TypeError(f"{name}: expected a {'cupy' if is_cupy(self.keys) else 'numpy'}"
                            f".ndarray (this TTCache is on {where}; hashemb never copies "
                            f"between host and device), got {V._desc(x)}")
        if is_cupy(x) and device_id(x) != device_id(self.keys):
            raise ValueError(f"{name}: expected an array on device {device_id(self.keys)} "
                             f"(the cache's), got one on device {device_id(x)}")

    @property
    def rows(self):
        """The row id each slot holds, -1 for a free slot (int64, at most
        ``capacity`` values; see the class's Attributes). Assigning checks
        it (distinct ids, at most ``capacity``) and rebuilds the lookup index."""
        return self._rows

    @rows.setter
    def rows(self, rows):
        with self._here():
            self._set_rows(rows)

    def _set_rows(self, rows):
        xp = self._xp()
        rows = xp.array(rows, np.int64).reshape(-1)
        if rows.shape[0] > self.capacity:
            raise ValueError(f"rows: expected at most {self.capacity} slots (the capacity), "
                             f"got {rows.shape[0]}")
        held = xp.flatnonzero(rows >= 0)
        order = xp.argsort(rows[held])      # (distinct ids: any sort is the one order)
        ids = rows[held][order]
        if ids.size > 1 and bool((ids[1:] == ids[:-1]).any()):
            raise ValueError("rows: expected distinct row ids (one slot a row), got repeats")
        # which rows the slots hold changed (a populate that moved none
        # keeps it): a TTSaved of a forward before a change no longer names
        # the right slots
        old = getattr(self, "_rows", None)
        if old is None or old.shape != rows.shape or bool((old != rows).any()):
            self._version = getattr(self, "_version", 0) + 1
        # the lookup index: held ids sorted, and the slot of each
        self._rows, self._ids, self._slot_of = rows, ids, held[order]

    def __setstate__(self, state):
        # a cache pickled when rows was a plain attribute (sorted, no holes)
        rows = state.pop("rows", None)
        state.setdefault("_version", 0)     # (a cache pickled before it had one)
        self.__dict__.update(state)
        if rows is not None:
            self.rows = rows

    @property
    def num_cached(self):
        """Rows held."""
        return int(self._ids.size)

    def __repr__(self):
        return (f"TTCache(capacity={self.capacity}, dim={self.dim}, "
                f"hashtbl_size={self.keys.shape[0]}, cached={self.num_cached})")

    def count(self, indices):
        """Add one use of every entry of ``indices`` (non-negative row ids).

        Parameters
        ----------
        indices : array_like of int32, int64 or uint64, any shape
            Row ids, each counted once per occurrence (a negative one is a
            ValueError). Once three quarters of the frequency table's slots
            hold rows, rows not yet in it are not counted. A device cache
            takes a CuPy array on its device (counted there: two sorts, four
            launches and one value read back, plus one for the negative-id
            check unless ``he.set_gpu_options(check_indices=False)``, when
            negative ids count nowhere and take no room).
        """
        if is_cupy(self.keys) or is_cupy(indices):
            self._same_side(indices, "indices")
            from ._gpu import tt as G
            return G.cache_count(self, indices)
        idx = V.as_keys(indices, "indices").reshape(-1).astype(np.int64, copy=False)
        if idx.size and idx.min() < 0:
            raise ValueError(f"indices: expected row ids >= 0, got {int(idx.min())}")
        used = getattr(self, "_used", None)
        if used is None:        # (a cache pickled before this count was kept)
            used = int(np.count_nonzero(self.keys >= 0))
        self._used = _k().count(idx, self.keys, self.freq, used, self._limit())

    def _limit(self):
        """Rows the frequency table holds at most: three quarters of its slots."""
        return max(1, self.keys.shape[0] * 3 // 4)

    def reset(self):
        """Forget every frequency and drop the cached rows (``rows`` becomes
        empty; ``weight`` keeps its values, read by no lookup until the next
        :meth:`populate` refills it). Takes no argument, returns None."""
        self.keys.fill(-1)
        self.freq.fill(0)
        self._used = 0
        with self._here():
            self.rows = self._xp().zeros(0, np.int64)

    def populate(self, cores, num_embeddings=None, optimizer=None):
        """Cache the ``capacity`` most frequent rows: rows already cached keep
        their slots and trained values, rows coming in take free slots (in
        ascending row order) filled from ``cores``, and slots left free hold
        zeros. ``optimizer``: a fused :class:`hashemb.Adagrad` whose state of
        this cache's changed slots is zeroed (SGD has none). Returns the
        changed slots (int64, ascending).

        Parameters
        ----------
        cores : list of ndarray
            The table's TT cores (float32 or float64, the cache's dtype, with
            ``prod q == dim``).
        num_embeddings : int, optional
            Rows of the table (default ``prod p``): counted rows at or above it
            are not cached.
        optimizer : hashemb.SGD or hashemb.Adagrad, optional
            The fused optimizer training ``weight``.

        Returns
        -------
        ndarray of int64
            The slots whose row changed (filled, emptied or replaced).

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> cores = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4])
        >>> cache, opt = he.TTCache(2, 8), he.Adagrad(0.1)
        >>> cache.count(np.array([7, 7, 7, 3, 3]))
        >>> cache.populate(cores, optimizer=opt).tolist(), cache.rows.tolist()
        ([0, 1], [3, 7])
        >>> opt.state_for(cache.weight)[0][:] = 1.0          # as if trained
        >>> cache.count(np.full(5, 9))
        >>> cache.populate(cores, optimizer=opt).tolist()   # 9 replaces 3 in slot 0
        [0]
        >>> opt.state_for(cache.weight)[0].reshape(2, 8).sum(1).tolist()   # slot 0 reset
        [0.0, 8.0]
        >>> bool(np.allclose(cache.weight[0], he.tt_to_full(cores)[9]))
        True
        """
        if is_cupy(self.keys):
            from ._gpu import tt as G
            return G.cache_populate(self, cores, num_embeddings, optimizer)
        cores, s, n = self._populate_args(cores, num_embeddings, optimizer)
        return self._populate(np, n, optimizer, lambda rows: _rows_of(cores, s, rows))

    def _populate_args(self, cores, num_embeddings, optimizer, be=None):
        """populate's checks: (cores, their TTShape, the row count)."""
        if optimizer is not None and not isinstance(optimizer, (SGD, Adagrad)):
            raise TypeError(f"optimizer: expected None, hashemb.SGD or hashemb.Adagrad (the "
                            f"cache's fused rules), got {V._desc(optimizer)}")
        cores, s = _as_cores(cores, be=be)
        self._same_side(cores[0], "cores[0]")
        if s.dtype != self.weight.dtype:
            raise TypeError(f"cores: expected dtype {self.weight.dtype} (the cache's), got {s.dtype}")
        if s.D != self.dim:
            raise ValueError(f"cores: expected D = prod(q) = {self.dim} (the cache's dim), "
                             f"got {s.D}")
        n = s.n if num_embeddings is None else \
            V.check_positive_int(num_embeddings, "num_embeddings", upper=s.n + 1)
        return cores, s, n

    def _populate(self, xp, n, optimizer, rows_of):
        """populate on the cache's arrays (NumPy, or CuPy on its device);
        rows_of(ids) computes the TT rows of sorted distinct ids."""
        used = (self.keys >= 0) & (self.keys < n)
        keys, freq = self.keys[used], self.freq[used]
        # the most frequent first, ties by smaller id (np.lexsort((keys, -freq)))
        by_key = xp.argsort(keys)                   # (distinct: any sort is the one order)
        desc = -freq[by_key]
        by_freq = xp.argsort(desc, kind="stable") if xp is np else xp.argsort(desc)
        new = xp.sort(keys[by_key[by_freq][:self.capacity]])
        old = xp.full(self.capacity, -1, np.int64)
        old[:len(self.rows)] = self.rows
        stay = (old >= 0) & _isin(xp, old, new)
        incoming = new[~_isin(xp, new, xp.sort(old[stay]))]
        free = xp.flatnonzero(~stay)[:len(incoming)]
        rows = xp.where(stay, old, -1)
        rows[free] = incoming
        # in place: views of the cache (torch's parameter) stay valid
        self.weight[~stay] = 0
        if len(incoming):
            self.weight[free] = rows_of(incoming)
        self.rows = rows
        changed = xp.flatnonzero(rows != old)
        if isinstance(optimizer, Adagrad) and changed.size:
            optimizer.state_for(self.weight)[0].reshape(self.weight.shape)[changed] = 0
        return changed

    def slots(self, rows):
        """Cache slot of each row id, -1 where not cached.

        Parameters
        ----------
        rows : array_like of int
            Row ids, any shape (a CuPy array for a device cache).

        Returns
        -------
        ndarray of int64, ``rows``' shape
            The row of ``weight`` holding each id, or -1 (on the cache's side).

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> cache = he.TTCache(2, 8)
        >>> cache.count(np.array([7, 7, 3]))
        >>> cache.populate(he.tt_init(10, [5, 2], [4, 2], [2])).tolist()
        [0, 1]
        >>> cache.slots(np.array([3, 9, 7])).tolist()
        [0, -1, 1]
        """
        self._same_side(rows, "rows")
        xp = self._xp()
        rows = xp.asarray(rows)
        with self._here():
            if not self._ids.size:
                return xp.full(rows.shape, -1, np.int64)
            pos, found = _search(xp, self._ids, rows)
            return xp.where(found, self._slot_of[pos], -1)

    def _move_like(self, w):
        """Make ``w`` (a NumPy or CuPy array of weight's shape) the weight, moving
        the frequency table and the row index to w's side first where they are
        not there: a torch module moved with ``.cuda()`` / ``.cpu()`` carries
        its caches along (its cache rows are its parameters)."""
        if is_cupy(w) != is_cupy(self.keys) or device_id(w) != device_id(self.keys):
            xp, on = place(w)
            with on:
                for name in ("keys", "freq", "_rows", "_ids", "_slot_of"):
                    setattr(self, name, xp.asarray(host(getattr(self, name))))
            self._used = None           # counted again from the keys at the next count
        self.weight = w


def _search(xp, sorted_b, a):
    """(pos, found) of a's values in a non-empty sorted_b (NumPy or CuPy):
    sorted_b[pos] == a where found."""
    pos = xp.minimum(xp.searchsorted(sorted_b, a), sorted_b.size - 1)
    return pos, sorted_b[pos] == a


def _isin(xp, a, sorted_b):
    """a's values found in sorted_b (np.isin by binary search)."""
    if not sorted_b.size:
        return xp.zeros(a.shape, bool)
    return _search(xp, sorted_b, a)[1]


def _rows_of(cores, s, rows):
    """TT rows ``rows`` (unique int64) through the kernels: (len(rows), D)."""
    ctx = _chain(np.ascontiguousarray(rows, np.int64), cores, s, save=False)
    return ctx.Y


# ---------------------------------------------------------------- the chain

_POOL = {}          # (size class, dtype) -> scratch arrays kept between calls
fork_safe_lock(globals(), "_POOL_LOCK")


def _scratch(n, dtype):
    """An uninitialised array of n values, from a small pool of recycled
    buffers. Freeing and reallocating the chain's tens of MB on every call
    hands the pages back to the OS and faults them in again (measured: 40%
    slower on FBTT's benchmark shape). A pooled array is reused only when
    nothing else refers to it (its views included: a TTSaved keeps its own);
    up to four a size class, of at most 256 MB each."""
    dtype = np.dtype(dtype)
    if n < 1 << 15:
        return np.empty(n, dtype)
    size = 1 << (int(n) - 1).bit_length()
    # under a lock: two threads could otherwise both see a buffer free
    # between its refcount check and the view that takes it
    with _POOL_LOCK:
        bufs = _POOL.setdefault((size, dtype.str), [])
        for a in bufs:
            if sys.getrefcount(a) <= 3:     # the list, the loop variable, the call
                return a[:n]
        a = np.empty(size, dtype)
        # (a buffer of more than 256 MB is not kept: one large call held its
        # peak, 1.3 GB, for the life of the process; the faults the pool
        # saves are a small share of a call that size)
        if len(bufs) < 4 and size * dtype.itemsize <= 256 << 20:
            bufs.append(a)
        return a[:n]


_Chain = namedtuple("_Chain", "rows dig perms starts inputs Y")


def _slices_t(core, R, N):
    """A copy of a core's slices transposed, (p, N, R) flat: what the fused
    steps read (a copy even where the transpose is a no-op: backward reads
    it after the core's update)."""
    return core.reshape(-1, R, N).transpose(0, 2, 1).copy().reshape(-1)


def _chain(rows, cores, s, save=True):
    """Forward chain for unique rows: Y (L, D), plus what backward needs.

    With three cores or more, the last step runs fused into the one before
    it (per chunk, in cache) rather than reading that step's output back
    from memory; the results are the same bits."""
    k = _k()
    d, L = len(cores), rows.shape[0]
    dig = np.empty((d, L), np.int64)
    k.digits(rows, np.array(s.p, np.int64), dig)
    perms, starts = [], []
    for c in range(d):
        perm, start = np.empty(L, np.int64), np.empty(s.p[c] + 1, np.int64)
        k.group_by(dig[c], s.p[c], perm, start)
        perms.append(perm)
        starts.append(start)
    A = cores[0].reshape(-1)
    a_off = dig[0] * (s.q[0] * s.R[1])
    Q = s.q[0]
    inputs = []
    empty, none = np.empty(0, s.dtype), np.empty(0, np.int64)
    for c in range(1, d):
        N = s.q[c] * s.R[c + 1]
        fuse = c == d - 2            # fused with the last step
        # the fused step's own products stay in cache unless backward needs them
        out = _scratch(L * Q * N, s.dtype) if save or not fuse else empty
        inputs.append((A, a_off, Q))
        if fuse:
            R2, N2 = s.R[c + 1], s.q[c + 1]
            nxt = cores[c + 1].reshape(-1)
            nxt_t = _slices_t(nxt, R2, N2) if k.wants_bt(N2, R2, s.dtype == np.float32) \
                else empty
            Y = _scratch(L * Q * s.q[c] * N2, s.dtype)
            k.step_forward(A, a_off, cores[c].reshape(-1), s.R[c], N, perms[c], starts[c], Q,
                           out, nxt, nxt_t, dig[c + 1], R2, N2, Y)
            inputs.append((out, np.arange(L, dtype=np.int64) * (Q * N), Q * s.q[c]))
            A = Y
            break
        k.step_forward(A, a_off, cores[c].reshape(-1), s.R[c], N, perms[c], starts[c], Q, out,
                       empty, empty, none, 0, 0, empty)
        A, a_off, Q = out, np.arange(L, dtype=np.int64) * (Q * N), Q * s.q[c]
    return _Chain(rows, dig, perms, starts, inputs if save else None, A.reshape(L, s.D))


def _chain_backward(ctx, dY, cores, s, opt, lr, eps, states):
    """Gradients of the cores from dY (L, D): a list of dense arrays (opt 0),
    or the fused update of the cores in place (opt 1, 2).

    With three cores or more, the last core's gradient is one call, and the
    input gradient of its step is made inside the call for the core before
    it, per chunk, from the last core as it was before its update."""
    k = _k()
    d, L = len(cores), ctx.rows.shape[0]
    grads = [np.zeros(c.size, s.dtype) if opt == 0 else np.empty(0, s.dtype) for c in cores]
    empty, none = np.empty(0, s.dtype), np.empty(0, np.int64)
    dC = dY.reshape(-1)
    nxt_t, top = empty, d - 1
    if d >= 3:
        c = d - 1
        A, a_off, Q = ctx.inputs[c - 1]
        N = s.q[c]
        nxt_t = _slices_t(cores[c], s.R[c], N)        # before the update below
        k.step_backward(A, a_off, dC, cores[c].reshape(-1), s.R[c], N, ctx.perms[c],
                        ctx.starts[c], Q, empty, grads[c], opt, lr, eps,
                        states[c] if opt == 2 else empty, empty, none, 0, 0)
        top = d - 2
    for c in range(top, 0, -1):
        A, a_off, Q = ctx.inputs[c - 1]
        N = s.q[c] * s.R[c + 1]
        dA = _scratch(L * Q * s.R[c], s.dtype)
        fused = c == d - 2
        k.step_backward(A, a_off, dC, cores[c].reshape(-1), s.R[c], N, ctx.perms[c],
                        ctx.starts[c], Q, dA, grads[c], opt, lr, eps,
                        states[c] if opt == 2 else empty, nxt_t if fused else empty,
                        ctx.dig[c + 1] if fused else none, s.R[c + 1] if fused else 0,
                        s.q[c + 1] if fused else 0)
        dC = dA
    k.first_backward(dC, cores[0].reshape(-1), s.q[0] * s.R[1], ctx.perms[0], ctx.starts[0],
                     grads[0], opt, lr, eps, states[0] if opt == 2 else empty)
    return None if opt else [g.reshape(c.shape) for g, c in zip(grads, cores)]


# ---------------------------------------------------------------- bags

class _Sized:
    """What _validate.bags asks of a scheme: the table sizes."""

    def __init__(self, sizes):
        self.table_sizes = list(sizes)

    _bounded = True

    def _bounds(self, table0, T):
        return np.array(self.table_sizes[table0:table0 + T], np.int64)


class TTSaved:
    """What :func:`tt_embedding_bag` computed that its backward reuses
    (``return_saved=True``): the digit groups and partial chain products of
    every table, so backward does not redo the forward products. Valid only
    for the same inputs and unchanged cores: a saved of other sizes (bags,
    entries, tables, TT shapes), other table boundaries, or other caches (or
    the same populated since) is a ValueError, but one of other indices of
    the same sizes is not detected (the torch modules pass each forward's own).

    Not built by users: forward makes it, backward reads it.

    Attributes
    ----------
    parts : list
        Per table, the forward's digit groups and chain products (internal).
    B, nnz : int
        Bags and entries of the forward.
    layout : tuple
        Every table's ``(p, q, ranks, dtype)``, which backward's tables must match.

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> cores = he.tt_init(100, [10, 10], [2, 2], [3])
    >>> idx, off = np.array([1, 2, 99]), np.array([0, 2, 3])
    >>> out, saved = he.tt_embedding_bag(idx, cores, off, return_saved=True)
    >>> g = he.tt_embedding_bag_backward(np.ones_like(out), idx, cores, off, saved=saved)
    >>> [x.shape for x in g] == [c.shape for c in cores]
    True
    """

    def __init__(self, parts, B, nnz, shapes, caches=None):
        self.parts, self.B, self.nnz = parts, B, nnz
        self.layout = _layout(shapes)
        # each table's cache and the version of its slots (its hits name them)
        self.caches = None if caches is None else tuple(
            None if c is None else (c, c._version) for c in caches)


def _layout(shapes):
    """What a saved's buffers were sized by: every table's TT shape and dtype."""
    return tuple((tuple(s.p), tuple(s.q), tuple(s.R), np.dtype(s.dtype).str) for _, s in shapes)


# src: each entry's row of ctx.Y, or -slot-1 for a cached row; with cached
# rows hit: (slots of the distinct cached rows, the entries reading them,
# each one's index into those slots), else None
_Part = namedtuple("_Part", "ctx src hit col0 lo hi")


def _check_mode(mode):
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode: expected 'sum' or 'mean' (TT tables pool by sum or mean), "
                         f"got {mode!r}")
    return mode


def _check_saved(saved, B, nnz, shapes, part_type, bounds=None, caches=None):
    """The parts of a TTSaved made by the forward of these inputs and tables
    on this backend (part_type: the CPU's _Part or the GPU's). ``bounds``:
    the T+1 table boundaries of these offsets, which the saved's must equal
    (its entries of table t are read at those positions: another split went
    past the bags' arrays); None skips that check. ``caches``: the CPU's
    caches of this call (one per table, None for none), which must be the
    forward's, populated as they were then (its hits name their slots)."""
    T = len(shapes)
    if not isinstance(saved, TTSaved):
        raise TypeError(f"saved: expected a TTSaved from return_saved=True, got {V._desc(saved)}")
    if saved.parts and not isinstance(saved.parts[0], part_type):
        where = "the host" if part_type is _Part else "the device"
        raise TypeError(f"saved: expected a TTSaved of a forward on {where} (as the other "
                        f"arguments), got one from the other backend")
    if saved.B != B or saved.nnz != nnz or len(saved.parts) != T:
        raise ValueError(f"saved: expected the forward of these inputs ({B} bags, "
                         f"{nnz} indices, {T} tables), got one of {saved.B} "
                         f"bags, {saved.nnz} indices, {len(saved.parts)} tables")
    layout = _layout(shapes)
    if saved.layout != layout:
        t = next(t for t, (a, b) in enumerate(zip(layout, saved.layout)) if a != b)
        (p, q, R, dt), (p0, q0, R0, dt0) = layout[t], saved.layout[t]
        raise ValueError(f"saved: expected the forward of these tables (table {t}: p {list(p)}, "
                         f"q {list(q)}, ranks {list(R)}, {np.dtype(dt)}), got one of p "
                         f"{list(p0)}, q {list(q0)}, ranks {list(R0)}, {np.dtype(dt0)}")
    for t, c in enumerate(caches or ()):
        kept = saved.caches[t] if saved.caches else None
        if c is None and kept is None:
            continue
        if c is None or kept is None or kept[0] is not c:
            got = "no cache" if kept is None else "a cache" if c is None else "another cache"
            raise ValueError(f"saved: expected the forward of these caches (table {t}: "
                             f"{'no cache' if c is None else 'this cache'}), got one of {got}")
        if kept[1] != c._version:
            raise ValueError(f"saved: expected a forward after table {t}'s cache was last "
                             f"populated (its hits name their slots), got one from before")
    if bounds is not None:
        for t, part in enumerate(saved.parts):
            if (part.lo, part.hi) != (int(bounds[t]), int(bounds[t + 1])):
                raise ValueError(f"saved: expected the forward of these offsets (table {t}: "
                                 f"entries {int(bounds[t])} to {int(bounds[t + 1])}), got one "
                                 f"of entries {part.lo} to {part.hi}")
    return saved.parts


def _check_tables(tables, single, *, writable=False, be=None):
    """[(cores, TTShape)] of one table (single: tables = [cores]) or several;
    with ``writable`` every core must take an in-place update."""
    if single:
        return [_as_cores(tables[0], "cores", writable=writable, be=be)]
    shapes = _tables(tables, be=be)
    if writable:
        shapes = [_as_cores(c, f"tables[{t}]", writable=True, be=be)
                  for t, c in enumerate(tables)]
    return shapes


def _tables(tables, name="tables", be=None):
    if not isinstance(tables, (list, tuple)) or not tables:
        raise TypeError(f"{name}: expected a non-empty list of core lists (one per table), "
                        f"got {V._desc(tables)}")
    out = []
    for t, cores in enumerate(tables):
        out.append(_as_cores(cores, f"{name}[{t}]", be=be))
    dtypes = {s.dtype for _, s in out}
    if len(dtypes) > 1:
        raise TypeError(f"{name}: expected one dtype for every table, got {sorted(map(str, dtypes))}")
    return out


def _sizes(num_embeddings, shapes):
    T = len(shapes)
    if num_embeddings is None:
        return [s.n for _, s in shapes]
    if not isinstance(num_embeddings, (list, tuple, np.ndarray)):
        num_embeddings = [num_embeddings]      # one size (a float fails its check by name)
    if len(num_embeddings) != T:
        raise ValueError(f"num_embeddings: expected {T} sizes (one per table), "
                         f"got {len(num_embeddings)}")
    out = []
    for t, (n, (_, s)) in enumerate(zip(num_embeddings, shapes)):
        out.append(V.check_positive_int(n, "num_embeddings", upper=s.n + 1))
    return out


def _caches(cache, T, shapes, be=None):
    """The per-table caches of a call (None or a TTCache each), checked: on the
    tables' side (host or device), their dim and dtype, and the arrays the
    kernels index (``be``: the GPU backend of device tables, None on the host)."""
    if cache is None:
        return [None] * T
    caches = [cache] if isinstance(cache, TTCache) else cache
    on_device = be is not None
    is_array = be.is_array if on_device else (lambda x: isinstance(x, np.ndarray))
    if not isinstance(caches, (list, tuple)) or len(caches) != T:
        raise TypeError(f"cache: expected None, a TTCache or a list of {T} (one per table), "
                        f"got {V._desc(cache)}")
    for t, (c, (_, s)) in enumerate(zip(caches, shapes)):
        if c is None:
            continue
        if not isinstance(c, TTCache):
            raise TypeError(f"cache[{t}]: expected a hashemb.TTCache or None, got {V._desc(c)}")
        if (not is_array(c.keys)) if on_device else is_cupy(c.keys):
            side = "a device" if on_device else "the host"
            raise TypeError(f"cache[{t}]: expected a TTCache on {side} like the tables "
                            f"(TTCache(..., like={'a device array' if on_device else 'None'})), "
                            f"got one on {'the host' if on_device else 'a device'}")
        if on_device and device_id(c.keys) != device_id(shapes[0][0][0]):
            raise ValueError(f"cache[{t}]: expected a TTCache on device "
                             f"{device_id(shapes[0][0][0])} (the tables'), got one on device "
                             f"{device_id(c.keys)}")
        if c.dim != s.D or c.weight.dtype != s.dtype:
            raise ValueError(f"cache[{t}]: expected dim {s.D} and dtype {s.dtype} (the table's), "
                             f"got dim {c.dim} and dtype {c.weight.dtype}")
        # its arrays are public attributes: the kernels read a slot of every
        # cached row and a count of every frequency-table position
        w = c.weight
        if (not is_array(w) or w.shape != (c.capacity, c.dim)
                or not w.flags.c_contiguous):
            raise ValueError(f"cache[{t}].weight: expected a C-contiguous array of "
                             f"shape {(c.capacity, c.dim)}, got {V._desc(w)}")
        if c.rows.shape[0] > c.capacity:
            raise ValueError(f"cache[{t}].rows: expected at most {c.capacity} slots, "
                             f"got {c.rows.shape[0]}")
        if not (is_array(c.keys) and is_array(c.freq)
                and c.keys.dtype == c.freq.dtype == np.int64
                and c.keys.ndim == c.freq.ndim == 1 and c.keys.shape == c.freq.shape
                and c.keys.shape[0] > 0 and c.keys.flags.c_contiguous
                and c.freq.flags.c_contiguous):
            raise ValueError(f"cache[{t}]: expected keys and freq of one length (int64), "
                             f"got {V._desc(c.keys)} and {V._desc(c.freq)}")
    return list(caches)


def _prepare(indices, offsets, per_sample_weights, shapes, sizes, mode, T,
             include_last_offset):
    dtype = shapes[0][1].dtype
    return V.bags(_backend_kernels(), indices, offsets, per_sample_weights, scheme=_Sized(sizes),
                  mode=_check_mode(mode), dtype=dtype, num_tables=T,
                  include_last_offset=include_last_offset)


def _backend_kernels():
    from ._backend import kernels
    return kernels()


def _forward(b, shapes, caches, out, save):
    """Pool every table's bags into out; returns the parts backward needs."""
    k = _k()
    parts = []
    B = b.B
    col0 = 0
    for t, ((cores, s), cache) in enumerate(zip(shapes, caches)):
        lo, hi = int(b.off[t * B]), int(b.off[(t + 1) * B])
        idx = b.idx[lo:hi].astype(np.int64, copy=False)
        off = b.off[t * B:(t + 1) * B + 1] - lo
        rows, inv = np.unique(idx, return_inverse=True)
        src, hit = inv.astype(np.int64, copy=False), None
        if cache is not None and cache.num_cached:
            # the cache works on the distinct rows (sorted: a cheap search)
            slot = cache.slots(rows)
            held = slot >= 0
            if held.any():
                hit_u = np.cumsum(held) - 1         # index among the cached rows
                src_u = np.where(held, -slot - 1, np.cumsum(~held) - 1)
                src = src_u[inv]
                hit_n = np.flatnonzero(held[inv])
                hit = (slot[held], hit_n, hit_u[inv[hit_n]])
                rows = rows[~held]
        ctx = _chain(rows, cores, s, save=save)
        cw = cache.weight if cache is not None else np.zeros((1, s.D), s.dtype)
        psw = b.psw[lo:hi] if b.psw.shape[0] else b.psw
        k.pool(ctx.Y, cw, src, np.ascontiguousarray(off), psw, int(b.mode == 1), out, col0)
        parts.append(_Part(ctx, src, hit, col0, lo, hi))
        col0 += s.D
    return parts


def _opt_args(optimizer):
    if optimizer is None:
        return 0, 0.0, 0.0
    if isinstance(optimizer, SGD):
        return 1, optimizer.lr, 0.0
    return 2, optimizer.lr, optimizer.eps


def _backward(b, g, shapes, caches, parts, optimizer):
    k = _k()
    opt, lr, eps = _opt_args(optimizer)
    B = b.B
    results = []
    for t, ((cores, s), cache, part) in enumerate(zip(shapes, caches, parts)):
        lo, hi = part.lo, part.hi
        off = b.off[t * B:(t + 1) * B + 1] - lo
        cnt = np.diff(off)
        bag = np.repeat(np.arange(B, dtype=np.int64), cnt)
        psw = b.psw[lo:hi] if b.psw.shape[0] else b.psw
        ctx = part.ctx
        L = ctx.rows.shape[0]
        mode = int(b.mode == 1)

        def unpool(rows, of_entry, entries):
            """dY (rows, D): each row's weighted sum of its entries' gradients."""
            order, ustart = np.empty(of_entry.shape[0], np.int64), np.empty(rows + 1, np.int64)
            k.group_by(np.ascontiguousarray(of_entry), rows, order, ustart)
            if entries is not None:
                order = entries[order]
            dY = _scratch(rows * s.D, s.dtype).reshape(rows, s.D)
            k.unpool(g, part.col0, bag, psw, cnt, mode, order, ustart, dY)
            return dY

        miss_n = np.flatnonzero(part.src >= 0) if part.hit is not None else None
        dY = unpool(L, part.src if miss_n is None else part.src[miss_n], miss_n)
        states = [optimizer.state_for(c)[0] for c in cores] if opt == 2 else None
        grads = _chain_backward(ctx, dY, cores, s, opt, lr, eps, states)
        dcache = None if cache is None or opt else np.zeros_like(cache.weight)
        if part.hit is not None:
            # the cached rows' gradients, summed like the others' (the rows hit
            # only: a whole cache's zeros cost O(capacity D) a step, 12 ms at a
            # million rows for a batch of 64)
            slots, hit_n, hit_u = part.hit
            dH = unpool(slots.shape[0], hit_u, hit_n)
            if opt:
                _update_rows(cache.weight, dH, slots, optimizer)
            else:
                dcache[slots] = dH
        results.append((grads, dcache))
    return results


def _update_rows(w, g, rows, optimizer):
    """The fused rule on rows ``rows`` of a cache (distinct), ``g[i]`` the
    gradient of row ``rows[i]``."""
    if isinstance(optimizer, SGD):
        w[rows] -= optimizer.lr * g
        return
    state = optimizer.state_for(w)[0].reshape(w.shape)
    state[rows] += g ** 2
    w[rows] -= optimizer.lr * g / (array_module(w).sqrt(state[rows]) + optimizer.eps)


def tt_embedding_bag(indices, cores, offsets=None, *, mode="sum", per_sample_weights=None,
                     include_last_offset=True, num_embeddings=None, cache=None,
                     return_saved=False):
    r"""Embedding bag over a TT table: ``out[b] = pool_{x in bag b} W[x]``.

    .. math::

        \mathrm{out}[b] = \sum_{j \in \mathrm{bag}\ b} c_j\,
        \mathrm{vec}\big(G_0[x_{j,0}] G_1[x_{j,1}] \cdots G_{d-1}[x_{j,d-1}]\big)

    with :math:`c_j` = ``per_sample_weights[j]`` (sum), :math:`1/|\mathrm{bag}|`
    (mean) or 1. A row held in ``cache`` is read from it instead.

    Parameters
    ----------
    indices : ndarray of int32, int64 or uint64
        1-D with ``offsets``, or 2-D ``(B, N)`` (N entries per bag). Row ids
        in ``[0, num_embeddings)``; uint64 ids are read as unsigned (a value
        of 2**63 or more is out of range like any other: IndexError naming
        it), other dtypes are a TypeError.
    cores : list of ndarray
        2 to 4 cores, core k of shape ``(p_k, R_k, q_k, R_{k+1})``, float32 or float64.
    offsets : ndarray of int32/int64, optional
        Bag starts. ``include_last_offset=True`` (the default, as FBTT): ``B + 1``
        values ending at ``len(indices)``; ``False`` (as nn.EmbeddingBag): ``B``.
    mode : {"sum", "mean"}
        Empty bags give zeros in both.
    per_sample_weights : ndarray, optional
        One weight per index (mode "sum").
    num_embeddings : int, optional
        Rows of the table (``<= prod p``; default ``prod p``); larger indices
        raise IndexError.
    cache : TTCache, optional
    return_saved : bool
        Also return a :class:`TTSaved` for :func:`tt_embedding_bag_backward`.

    Returns
    -------
    ndarray of shape (B, D), or ``(out, saved)``
    {det}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> cores = he.tt_init(1000, [10, 10, 10], [4, 2, 2], [8, 8])
    >>> out = he.tt_embedding_bag(np.array([1, 2, 999]), cores, np.array([0, 2, 3]))
    >>> out.shape
    (2, 16)
    >>> W = he.tt_to_full(cores)
    >>> bool(np.allclose(out[0], W[1] + W[2], atol=1e-6))
    True
    """
    return tt_embedding_bags(indices, [cores], offsets, mode=mode,
                             per_sample_weights=per_sample_weights,
                             include_last_offset=include_last_offset,
                             num_embeddings=num_embeddings,
                             cache=None if cache is None else [cache],
                             return_saved=return_saved, _single=True)


def tt_embedding_bag_backward(grad_output, indices, cores, offsets=None, *, mode="sum",
                              per_sample_weights=None, include_last_offset=True,
                              num_embeddings=None, cache=None, saved=None, optimizer=None):
    r"""Gradient of :func:`tt_embedding_bag` with respect to the cores (and the
    cache), or the fused optimizer step.

    With :math:`\delta_j = c_j\, \partial L/\partial \mathrm{out}[b(j)]` viewed as
    :math:`(Q_{k+1}, R_{k+1})` products, and :math:`T_k[j] = G_0[x_{j,0}] \cdots
    G_{k-1}[x_{j,k-1}]`, the chain rule gives per core

    .. math::

        \frac{\partial L}{\partial G_k[v]} = \sum_{j:\ x_{j,k} = v}
        T_k[j]^\top\, \delta T_{k+1}[j], \qquad
        \delta T_k[j] = \delta T_{k+1}[j]\, G_k[x_{j,k}]^\top

    ``optimizer=he.SGD(lr)`` applies :math:`G \leftarrow G - \mathrm{lr}\, g`;
    ``he.Adagrad(lr, eps)`` keeps one accumulator per core element (and per
    cache element), :math:`s \leftarrow s + g^2`,
    :math:`G \leftarrow G - \mathrm{lr}\, g / (\sqrt s + \epsilon)`, where
    :math:`g` is that element's whole gradient for the batch (the dense core
    gradient above, so untouched slices keep their values and state). Each
    slice is updated once its own gradient is complete, before any core it
    depends on: the result equals the dense gradient followed by the update.

    Parameters
    ----------
    grad_output : ndarray, shape (B, D)
    indices, cores, offsets, mode, per_sample_weights, include_last_offset, num_embeddings, cache
        As given to :func:`tt_embedding_bag`. With an optimizer the cores (and
        the cache) are updated in place and must be C-contiguous and writeable.
    saved : TTSaved, optional
        From ``tt_embedding_bag(..., return_saved=True)`` on the same inputs:
        skips recomputing the forward products.
    optimizer : hashemb.SGD or hashemb.Adagrad, optional

    Returns
    -------
    list of ndarray (one per core, the cores' shapes), plus the cache's
    ``(capacity, D)`` gradient as a last entry when ``cache`` is given; None
    when an optimizer updated them.
    {det}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> cores = he.tt_init(1000, [10, 10, 10], [4, 2, 2], [8, 8])
    >>> g = he.tt_embedding_bag_backward(np.ones((1, 16), np.float32), np.array([[3, 5]]),
    ...                                  cores)
    >>> [x.shape for x in g]
    [(10, 1, 4, 8), (10, 8, 2, 8), (10, 8, 2, 1)]
    >>> he.tt_embedding_bag_backward(np.ones((1, 16), np.float32), np.array([[3, 5]]),
    ...                              cores, optimizer=he.SGD(0.1)) is None
    True
    """
    res = tt_embedding_bags_backward(grad_output, indices, [cores], offsets, mode=mode,
                                     per_sample_weights=per_sample_weights,
                                     include_last_offset=include_last_offset,
                                     num_embeddings=num_embeddings,
                                     cache=None if cache is None else [cache], saved=saved,
                                     optimizer=optimizer, _single=True)
    return None if res is None else res[0]


def tt_embedding_bags(indices, tables, offsets=None, *, mode="sum", per_sample_weights=None,
                      include_last_offset=True, num_embeddings=None, cache=None,
                      return_saved=False, _single=False):
    r"""Several TT tables in one call (table-batched, FBGEMM's layout):
    ``out[:, cols_t] = tt_embedding_bag(bags of table t, tables[t])``.

    Indices are flat with ``offsets`` of length ``T*B + 1``, feature-major
    (bag b of table t is ``offsets[t*B+b] : offsets[t*B+b+1]``), or 2-D
    ``(B, T)`` with one index per table per sample. Tables may differ in
    shapes, ranks and widths; the output concatenates their columns.

    Parameters
    ----------
    indices, offsets, mode, per_sample_weights
        As above.
    tables : list of list of ndarray
        One core list per table.
    num_embeddings : list of int, optional
        Rows of each table (default ``prod p`` of each).
    cache : list of (TTCache or None), optional
    return_saved : bool

    Returns
    -------
    ndarray of shape (B, sum of the tables' D), or ``(out, saved)``
    {det}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> t0 = he.tt_init(100, [10, 10], [4, 4], [8])
    >>> t1 = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4])
    >>> he.tt_embedding_bags(np.array([[1, 2], [3, 4], [5, 6]]), [t0, t1]).shape
    (3, 24)
    """
    include_last_offset = V.check_flag(include_last_offset, "include_last_offset")
    return_saved = V.check_flag(return_saved, "return_saved")
    if _on_gpu(tables[0] if _single else tables, _single, indices=indices, offsets=offsets,
               per_sample_weights=per_sample_weights):
        from ._gpu import tt as G
        return G.bags(indices, tables, offsets, mode=mode, per_sample_weights=per_sample_weights,
                      include_last_offset=include_last_offset, num_embeddings=num_embeddings,
                      cache=cache, return_saved=return_saved, single=_single)
    shapes = _check_tables(tables, _single)
    T = len(shapes)
    sizes = _sizes(num_embeddings, shapes)
    caches = _caches(cache, T, shapes)
    b = _prepare(indices, offsets, per_sample_weights, shapes, sizes, mode,
                 T, include_last_offset if T == 1 else True)
    out = recycled((b.B, sum(s.D for _, s in shapes)), shapes[0][1].dtype)
    parts = _forward(b, shapes, caches, out, save=return_saved)
    if return_saved:
        return out, TTSaved(parts, b.B, b.idx.shape[0], shapes, caches)
    return out


def tt_embedding_bags_backward(grad_output, indices, tables, offsets=None, *, mode="sum",
                               per_sample_weights=None, include_last_offset=True,
                               num_embeddings=None, cache=None, saved=None, optimizer=None,
                               _single=False):
    r"""Backward of :func:`tt_embedding_bags`: per table, what
    :func:`tt_embedding_bag_backward` returns (a list of lists), or None after
    a fused update of every table.

    For table t, with :math:`\delta_j = c_j\, \partial L/\partial
    \mathrm{out}[b(j), \mathrm{cols}_t]` over its entries j (its D columns of
    the output) and :math:`T_k[j] = G^{(t)}_0[x_{j,0}] \cdots G^{(t)}_{k-1}[x_{j,k-1}]`,

    .. math::

        \frac{\partial L}{\partial G^{(t)}_k[v]} = \sum_{j \in t:\ x_{j,k} = v}
        T_k[j]^\top\, \delta T_{k+1}[j], \qquad
        \delta T_k[j] = \delta T_{k+1}[j]\, G^{(t)}_k[x_{j,k}]^\top

    (:func:`tt_embedding_bag_backward`'s, table by table; a fused
    optimizer applies its rule to each table's cores and cache).

    Parameters
    ----------
    grad_output : ndarray, shape (B, sum of the tables' D)
    indices, tables, offsets, mode, per_sample_weights, include_last_offset, num_embeddings, cache
        As given to :func:`tt_embedding_bags`. With an optimizer every core
        (and cache) is updated in place and must be C-contiguous and writeable.
    saved : TTSaved, optional
        From ``tt_embedding_bags(..., return_saved=True)`` on the same inputs.
    optimizer : hashemb.SGD or hashemb.Adagrad, optional

    Returns
    -------
    list of list of ndarray, or None
        Per table, its cores' gradients (the cores' shapes), then its
        cache's ``(capacity, D)`` gradient when it has a cache; None when an
        optimizer updated them.
    {det}

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> t0 = he.tt_init(100, [10, 10], [4, 4], [8])
    >>> t1 = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4])
    >>> g = he.tt_embedding_bags_backward(np.ones((3, 24), np.float32),
    ...                                   np.array([[1, 2], [3, 4], [5, 6]]), [t0, t1])
    >>> [len(x) for x in g]
    [2, 3]
    >>> g1 = he.tt_embedding_bag_backward(np.ones((3, 8), np.float32), np.array([[2], [4], [6]]),
    ...                                   t1)
    >>> all(np.array_equal(a, b) for a, b in zip(g[1], g1))     # table 1's, on its own
    True
    """
    include_last_offset = V.check_flag(include_last_offset, "include_last_offset")
    if _on_gpu(tables[0] if _single else tables, _single, grad_output=grad_output,
               indices=indices, offsets=offsets, per_sample_weights=per_sample_weights):
        from ._gpu import tt as G
        return G.bags_backward(grad_output, indices, tables, offsets, mode=mode,
                               per_sample_weights=per_sample_weights,
                               include_last_offset=include_last_offset,
                               num_embeddings=num_embeddings, cache=cache, saved=saved,
                               optimizer=optimizer, single=_single)
    optimizer = check_optimizer(optimizer)
    shapes = _check_tables(tables, _single, writable=optimizer is not None)
    T = len(shapes)
    sizes = _sizes(num_embeddings, shapes)
    caches = _caches(cache, T, shapes)
    b = _prepare(indices, offsets, per_sample_weights, shapes, sizes, mode,
                 T, include_last_offset if T == 1 else True)
    D = sum(s.D for _, s in shapes)
    g = V.as_grad(grad_output, (b.B, D), shapes[0][1].dtype)
    if saved is not None:
        parts = _check_saved(saved, b.B, b.idx.shape[0], shapes, _Part,
                             b.off[::b.B] if b.B else None, caches)
    else:
        scratch = np.empty((b.B, D), shapes[0][1].dtype)
        parts = _forward(b, shapes, caches, scratch, save=True)
    res = _backward(b, g, shapes, caches, parts, optimizer)
    if optimizer is not None:
        return None
    out = []
    for (grads, dcache), cache in zip(res, caches):
        out.append(grads + ([dcache] if cache is not None else []))
    return out


tt_embedding_bag.__doc__ = tt_embedding_bag.__doc__.replace("{det}", _DET)
tt_embedding_bag_backward.__doc__ = tt_embedding_bag_backward.__doc__.replace("{det}", _DET)
tt_embedding_bags.__doc__ = tt_embedding_bags.__doc__.replace("{det}", _DET)
tt_embedding_bags_backward.__doc__ = tt_embedding_bags_backward.__doc__.replace("{det}", _DET)
