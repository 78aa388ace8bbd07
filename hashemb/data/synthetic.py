"""A deterministic synthetic click log with the Criteo Kaggle shape.

Every random quantity of sample i is a counter-based hash of (seed, i, stream),
so any slice of the data set is reproducible on its own, in any chunking, with
no stored tables. Nothing here knows about any compression method.
"""
import math
from collections import namedtuple

import numpy as np

# Criteo Kaggle (Display Advertising Challenge) cardinalities of C1..C26.
CRITEO_KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
                 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105,
                 142572]
NUM_DENSE = 13

Batch = namedtuple("Batch", "dense cats labels prob")
Batch.__doc__ = """A block of samples: ``dense`` float32 (n, 13) of log1p counts,
``cats`` int64 (n, 26) tokens (field t in [0, cardinalities[t])), ``labels``
float32 (n,) of 0/1, ``prob`` float64 (n,), the planted click probability
(None where there is none: :class:`CriteoTSV`, MovieLens).

Examples
--------
>>> from hashemb.data import Batch, SyntheticCriteo
>>> b = SyntheticCriteo(scale=0.001, seed=0).sample(0, 4)
>>> b._fields
('dense', 'cats', 'labels', 'prob')
>>> dense, cats, labels, prob = b                  # a tuple: unpacks in field order
>>> cats.dtype, labels.dtype, bool(((prob > 0) & (prob < 1)).all())
(dtype('int64'), dtype('float32'), True)
>>> Batch(dense[:2], cats[:2], labels[:2], None).cats.shape
(2, 26)
"""

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_TEST_BASE = 1 << 40        # test samples live far from train samples


def _mix(x):
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _uniform(seed, ids, stream):
    """Uniform [0, 1) for every id of ``ids`` (uint64 array), independent per stream."""
    with np.errstate(over="ignore"):
        key = ids * _GOLD + np.uint64((seed * 0x632BE59BD9B4E019 + stream * 0x85EBCA77C2B2AE63)
                                      % (1 << 64))
        return (_mix(_mix(key)) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _normal(seed, ids, stream):
    """Standard normal per id (Box-Muller on two independent streams)."""
    u1 = _uniform(seed, ids, 2 * stream)
    u2 = _uniform(seed, ids, 2 * stream + 1)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)


def _zipf_rank(u, n, a):
    """Rank in [0, n) with P(r) ~ (r+1)^-a (inverse CDF of the continuous
    bounded power law; a != 1)."""
    top = (n + 1.0) ** (1.0 - a) - 1.0
    x = (1.0 + u * top) ** (1.0 / (1.0 - a))
    return np.minimum(np.floor(x).astype(np.int64) - 1, n - 1)


class SyntheticCriteo:
    r"""Synthetic Criteo-shaped clicks: 13 dense + 26 categorical fields.

    Generative model of sample i (all draws are hashes of ``(seed, i)``):

    1. a latent context :math:`c_i` uniform over ``num_clusters`` clusters;
    2. field t (``n_t = cardinalities[t]`` tokens, :math:`K_t = \min(K, n_t)`
       clusters, token x belongs to cluster ``x mod K_t``): with probability
       ``in_cluster`` a Zipf(``zipf``)-ranked token of cluster
       :math:`c_i \bmod K_t`, otherwise a Zipf-ranked token of the whole field.
       Small ids are popular; tokens of one cluster co-occur;
    3. dense :math:`d_{ij} = 0.6\,\mu_{c_i j} + 0.8\,\epsilon_{ij}`, reported as
       ``log1p(floor(exp(1 + 1.5 d)))`` (Criteo-like counts, DLRM's transform);
    4. every token has a latent vector
       :math:`v_{t,x} = \sqrt{\rho}\, m_{t, x \bmod K_t} + \sqrt{1-\rho}\, e_{t,x}`
       in :math:`R^k` and a bias :math:`b_{t,x}` (all N(0,1) hashes);
    5. click logit
       :math:`z = z_0 + w^\top d + \beta \sum_t b_{t,x_t} / \sqrt{T}
       + \gamma \sum_{(s,t) \in \mathrm{crosses}} \langle v_{s,x_s}, v_{t,x_t}\rangle / \sqrt{k |\mathrm{crosses}|}`,
       label ~ Bernoulli(sigmoid(z)); ``prob`` is sigmoid(z), so the oracle AUC
       of a split is ``auc(labels, prob)``.

    Parameters
    ----------
    scale : float
        Cardinalities are ``min(c, max(ceil(c * scale), 10))`` of Criteo Kaggle's.
    seed : int
    num_clusters, zipf, in_cluster, latent_dim, num_crosses, rho, beta, gamma, bias
        The knobs of the model above (defaults give CTR about 0.25 and an oracle
        AUC about 0.8, like Criteo).

    Examples
    --------
    >>> from hashemb.data import SyntheticCriteo
    >>> gen = SyntheticCriteo(scale=0.001, seed=0)
    >>> b = gen.sample(0, 1000)
    >>> b.dense.shape, b.cats.shape, b.labels.shape
    ((1000, 13), (1000, 26), (1000,))
    >>> bool((b.cats < gen.cardinalities).all())
    True
    """

    def __init__(self, scale=0.01, seed=0, num_clusters=64, zipf=1.1, in_cluster=0.7,
                 latent_dim=8, num_crosses=30, rho=0.6, beta=0.6, gamma=1.2, bias=-2.0):
        if not (isinstance(scale, (int, float)) and 0 < scale <= 1):
            raise ValueError(f"scale: expected a float in (0, 1], got {scale!r}")
        if not (isinstance(zipf, (int, float)) and zipf > 0 and zipf != 1):
            raise ValueError(f"zipf: expected a positive float other than 1, got {zipf!r}")
        if not 0 <= in_cluster <= 1:
            raise ValueError(f"in_cluster: expected a probability, got {in_cluster!r}")
        self.scale, self.seed = scale, int(seed)
        self.cardinalities = [min(c, max(math.ceil(c * scale), 10)) for c in CRITEO_KAGGLE]
        self.num_clusters, self.zipf, self.in_cluster = num_clusters, zipf, in_cluster
        self.k, self.rho, self.beta, self.gamma, self.bias = latent_dim, rho, beta, gamma, bias
        rng = np.random.default_rng([self.seed, 0xC817])
        T = len(self.cardinalities)
        pairs = [(s, t) for s in range(T) for t in range(s + 1, T)]
        pick = rng.choice(len(pairs), size=min(num_crosses, len(pairs)), replace=False)
        self.crosses = sorted(pairs[p] for p in pick)
        self.dense_weight = rng.normal(0, 0.3, NUM_DENSE)
        self.dense_centres = rng.normal(0, 1, (num_clusters, NUM_DENSE))
        self._vec_cache = {}

    @property
    def num_tables(self):
        return len(self.cardinalities)

    # -- per-token latent quantities (hash of seed, field, token, element) --
    def _token_ids(self, t, x, j):
        return (np.asarray(x, np.uint64) * np.uint64(1 << 12) + np.uint64(t * 64 + j))

    def _vectors(self, t, x):
        """v_{t,x} for tokens x of field t: float64 (len(x), k)."""
        n = self.cardinalities[t]
        if n * self.k <= 1 << 22:         # small field: one table, then index it
            if t not in self._vec_cache:
                self._vec_cache[t] = self._vectors_of(t, np.arange(n))
            return self._vec_cache[t][x]
        return self._vectors_of(t, x)

    def _vectors_of(self, t, x):
        Kt = min(self.num_clusters, self.cardinalities[t])
        cl = np.asarray(x, np.int64) % Kt
        out = np.empty((len(x), self.k))
        for j in range(self.k):
            m = _normal(self.seed, self._token_ids(t, cl, j), 1)
            e = _normal(self.seed, self._token_ids(t, x, j), 2)
            out[:, j] = math.sqrt(self.rho) * m + math.sqrt(1 - self.rho) * e
        return out

    def _token_bias(self, t, x):
        return _normal(self.seed, self._token_ids(t, x, 63), 3)

    def sample(self, start, count, split="train"):
        """Samples ``start .. start+count-1`` of ``split`` ("train" or "test",
        disjoint streams) as a :data:`Batch`.

        Parameters
        ----------
        start, count : int
            The first sample and how many, ``start + count <= 2**40``.
        split : {"train", "test"}

        Returns
        -------
        Batch
            ``dense`` float32 (count, 13), ``cats`` int64 (count, 26),
            ``labels`` float32 (count,), ``prob`` float64 (count,). Sample i
            depends only on (seed, split, i): any chunking gives the same rows.

        Examples
        --------
        >>> import numpy as np
        >>> from hashemb.data import SyntheticCriteo
        >>> gen = SyntheticCriteo(scale=0.001, seed=0)
        >>> whole, part = gen.sample(0, 100), gen.sample(40, 10)
        >>> bool((whole.cats[40:50] == part.cats).all() and (whole.prob[40:50] == part.prob).all())
        True
        >>> bool((gen.sample(0, 100, "test").cats != whole.cats).any())   # another stream
        True
        """
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        if start < 0 or count < 0 or start + count > _TEST_BASE:
            raise ValueError(f"start, count: expected 0 <= start, 0 <= count, "
                             f"start + count <= 2**40, got {start}, {count}")
        base = start + (_TEST_BASE if split == "test" else 0)
        ids = np.arange(base, base + count, dtype=np.uint64)
        s, T, K = self.seed, self.num_tables, self.num_clusters
        ctx = np.minimum((_uniform(s, ids, 0) * K).astype(np.int64), K - 1)
        cats = np.empty((count, T), np.int64)
        for t, n in enumerate(self.cardinalities):
            Kt = min(K, n)
            k = ctx % Kt
            size_k = (n - k + Kt - 1) // Kt
            inside = _uniform(s, ids, 10 + 3 * t) < self.in_cluster
            u = _uniform(s, ids, 11 + 3 * t)
            local = k + _zipf_rank(u, size_k, self.zipf) * Kt
            cats[:, t] = np.where(inside, local, _zipf_rank(u, n, self.zipf))
        latent = np.empty((count, NUM_DENSE))
        for j in range(NUM_DENSE):
            latent[:, j] = 0.6 * self.dense_centres[ctx, j] + 0.8 * _normal(s, ids, 100 + j)
        dense = np.log1p(np.floor(np.exp(1.0 + 1.5 * latent))).astype(np.float32)
        z = self.bias + latent @ self.dense_weight
        z += self.beta / math.sqrt(T) * sum(self._token_bias(t, cats[:, t]) for t in range(T))
        vec = {}
        cross = np.zeros(count)
        for a, b in self.crosses:
            for t in (a, b):
                if t not in vec:
                    vec[t] = self._vectors(t, cats[:, t])
            cross += np.einsum("nk,nk->n", vec[a], vec[b])
        z += self.gamma * cross / math.sqrt(self.k * max(len(self.crosses), 1))
        prob = 1.0 / (1.0 + np.exp(-z))
        labels = (_uniform(s, ids, 200) < prob).astype(np.float32)
        return Batch(dense, cats, labels, prob)
