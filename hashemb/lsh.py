"""SCMA / LMA: memory allocation learned from data by minhash (ALGORITHMS.md s. 4).

Tokens that occur in the same data points share memory. A sample of rows of the
categorical matrix gives every token seen in it the set S of sampled rows it
occurs in; minhash signatures of S decide its slots, so two tokens collide on an
element with a probability that grows with their Jaccard similarity. The slot
math (map lookup, signature combination, absent tokens) is in slots.h; this
module builds the signatures and holds the arrays.
"""
import contextlib
import hashlib
import types

import numpy as np

from . import _validate as V
from ._backend import is_cupy, kernels
from .hashing import P
from .schemes import Scheme

_LSH_TABLE, _LMA = 5, 6                # kinds of slots.h
_GOLD = 0x9E3779B97F4A7C15
_NUM_POINTS = 125_000    # rows fit samples by default (SCMA's)
_MASK64 = (1 << 64) - 1


def _mix64(x):
    """SplitMix64's finaliser on a uint64 array (he_mix64 of slots.h)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _stream(seed, stream, count):
    """``count`` pseudo-random uint64 words of (seed, stream): SplitMix64 outputs
    computed in NumPy, so a seed's coefficients never depend on NumPy's RNGs."""
    start = (seed * 0xD1B54A32D192ED03 + (stream + 1) * _GOLD) & _MASK64
    with np.errstate(over="ignore"):
        i = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLD) + np.uint64(start)
    return _mix64(i)


def _bar(progress, **kw):
    """A tqdm bar, or a silent stand-in without importing tqdm (progress off)."""
    if progress:
        from tqdm.auto import tqdm
        return tqdm(**kw)
    return contextlib.nullcontext(types.SimpleNamespace(update=lambda n: None))


def _check_block(block, dim, size):
    block = dim if block is None else V.check_positive_int(block, "block", upper=dim + 1)
    if dim % block:
        raise ValueError(f"block: expected a divisor of dim={dim}, got {block}")
    if block > size:
        raise ValueError(f"block: expected block <= size = {size}, got {block}")
    return block


def _salt(seed):
    """Key salt of a seed: the first word of its stream 0 (the minhash
    coefficients are the words after it)."""
    return int(_stream(seed, 0, 1)[0])


def _pow2_above(n):
    return 1 << max(int(2 * n - 1).bit_length(), 1)


def _uint32(a, name):
    """Slots or signature values as uint32, checked before the cast (an int64
    2**32 + 7 was slot 7); int32 is taken as a uint32 bit pattern."""
    if a.dtype == np.int32:
        return np.ascontiguousarray(a.view(np.uint32))
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 0xFFFFFFFF):
        raise ValueError(f"{name}: expected values in [0, 2**32), got {a.min()}..{a.max()}")
    return np.ascontiguousarray(a, np.uint32)


def _frozen(a):
    a = a.copy()
    a.flags.writeable = False
    return a


class _MinhashScheme(Scheme):
    """Shared by :class:`LSHTable` and :class:`LMA`: the sampled-token map, the
    minhash functions and the combination of signature values into slots."""

    _type = None
    num_points = None        # rows sampled by fit (None when built from parts)

    def __init__(self, size, dim, num_fields, keys, data, num_hashes=2, seed=0, block=None,
                 signature_size=None):
        size = V.check_positive_int(size, "size", upper=(1 << 32) + 1)
        dim = V.check_positive_int(dim, "dim", upper=1 << 20)
        self.block = _check_block(block, dim, size)
        self.num_tables = V.check_positive_int(num_fields, "num_fields", upper=1 << 31)
        self.seed = V.check_seed(seed)
        self.num_hashes = V.check_positive_int(num_hashes, "num_hashes", upper=64)
        width = self._width(dim, signature_size)
        keys = V.as_keys(keys, "keys").astype(np.int64, copy=False).view(np.uint64)
        data = _uint32(V._as_array(data, "data"), "data")
        n = data.shape[0] if data.ndim == 2 else 0
        if data.shape != (n, width) or n == 0:
            raise ValueError(f"data: expected shape (n >= 1, {width}), got {data.shape}")
        cap = keys.shape[0] if keys.ndim == 1 else 0
        if cap < 2 * n or cap & (cap - 1):
            raise ValueError(f"keys: expected a map of a power-of-two length >= 2 * {n}, "
                             f"got shape {keys.shape}")
        used = keys[keys != 0]
        if used.size > n or (used.size and (used & np.uint64(0xFFFFFFFF)).max() >= n):
            raise ValueError(f"keys: expected at most {n} entries with ids < {n} (the rows "
                             f"of data)")
        if self._kind_id == _LSH_TABLE and data.max() >= size:
            raise ValueError(f"data: expected slots < size = {size}, got {data.max()}")
        self._coefficients(dim, width)
        # private read-only copies: the kernels index with them unchecked, so
        # a caller's later write to its array (or to config()'s) went out of
        # bounds, and the digest of equality would go stale
        self._config = dict(type=self._type, size=size, dim=dim, num_fields=self.num_tables,
                            num_hashes=self.num_hashes, seed=self.seed, block=self.block,
                            signature_size=None if self._kind_id == _LSH_TABLE else width)
        self._bind(_frozen(keys), _frozen(data))
        self._setup(self._kind_id, size, dim, self.block, size, [0] * 12)

    def _bind(self, keys, data):
        """keys and data (read-only) as the scheme's, its kernels' and its
        config's: one array each, the others views of it."""
        self.keys, self.data = keys, data
        self._lsh["keys"], self._lsh["data"] = keys, data.reshape(-1)
        self._config["keys"], self._config["data"] = keys.view(np.int64), data

    def __setstate__(self, state):
        # a copy (pickle, deepcopy, torch.load) brings its arrays back
        # writeable and the views of them as copies: locked and bound again
        self.__dict__.update(state)
        keys, data = self.keys, self.data
        keys.flags.writeable = data.flags.writeable = False
        self._bind(keys, data)

    @classmethod
    def from_tokens(cls, size, dim, num_fields, fields, tokens, data, num_hashes=2, seed=0,
                    block=None, signature_size=None):
        """The scheme whose sampled tokens are ``(fields[n], tokens[n])`` with data
        row ``n`` (distinct pairs), e.g. signatures computed elsewhere.

        Parameters
        ----------
        size, dim, num_fields : int
            As the constructor's.
        fields : array_like of int, shape (n,)
            The field of each pair, in ``[0, num_fields)``.
        tokens : array_like of int32, int64 or uint64, shape (n,)
        data : array_like of uint32 (or int32 bits), shape (n, width)
            Row n: the run starts (LSHTable, ``dim / block`` a row, each below
            ``size``) or the minhash signature (LMA, ``signature_size`` a row)
            of pair n.
        num_hashes, seed, block, signature_size
            As the constructor's; ``seed`` also salts the token map.

        Returns
        -------
        LSHTable or LMA
            The class it is called on.

        Raises
        ------
        ValueError
            Repeated pairs, fields out of range, a ``data`` of another row count.

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> starts = np.array([[3], [4], [5]], np.uint32)    # one run of 8 a token
        >>> t = he.LSHTable.from_tokens(1000, 8, 1, [0, 0, 0], [10, 20, 30], starts)
        >>> t.slots([20])[0].tolist()
        [4, 5, 6, 7, 8, 9, 10, 11]
        >>> t.lookup_ids([30, 40]).tolist()                 # 40 was not sampled
        [2, -1]
        """
        num_fields = V.check_positive_int(num_fields, "num_fields", upper=1 << 31)
        fields = V._as_array(fields, "fields")
        if fields.dtype.kind not in "iu":
            raise TypeError(f"fields: expected integers in [0, {num_fields}), "
                            f"got dtype {fields.dtype}")
        if fields.size and (fields.min() < 0 or fields.max() >= num_fields):
            raise ValueError(f"fields: expected integers in [0, {num_fields}), "
                             f"got {fields.min()}..{fields.max()}")
        fields = np.ascontiguousarray(fields, np.int32)
        tokens = V.as_keys(tokens, "tokens").astype(np.int64, copy=False).view(np.uint64)
        if tokens.ndim != 1:
            raise ValueError(f"tokens: expected a 1-D array, got shape {tokens.shape}")
        n = tokens.shape[0]
        if fields.shape != (n,) or n == 0:
            raise ValueError(f"fields: expected shape ({n},) like tokens, with n >= 1, "
                             f"got fields {fields.shape}, tokens {tokens.shape}")
        if fields.min() < 0 or fields.max() >= num_fields:
            raise ValueError(f"fields: expected values in [0, {num_fields}), "
                             f"got {fields.min()}..{fields.max()}")
        rows = np.shape(data)[0] if np.ndim(data) else None
        if rows != n:
            raise ValueError(f"data: expected one row per token ({n}), got shape "
                             f"{np.shape(data)}")
        salt = _salt(V.check_seed(seed))
        k = kernels()
        exact = np.zeros(2 * _pow2_above(n), np.uint64)
        ids = np.empty(n, np.int64)
        if k.lsh_insert(fields, tokens, salt, exact, ids) != n:
            raise ValueError("tokens: expected distinct (field, token) pairs, got "
                             f"{n - len(np.unique(ids))} repeated")
        del exact
        return cls._from_distinct(size, dim, num_fields, fields, tokens, data, num_hashes,
                                  seed, block, signature_size)

    @classmethod
    def _from_distinct(cls, size, dim, num_fields, fields, tokens, data, num_hashes, seed,
                       block, signature_size):
        """from_tokens for pairs known to be distinct (fit has just numbered them)."""
        keys = np.zeros(_pow2_above(tokens.shape[0]), np.uint64)
        clashes = kernels().lsh_compact(fields, tokens, _salt(seed), keys)
        scheme = cls(size, dim, num_fields, keys, data, num_hashes, seed, block, signature_size)
        scheme.clashes = clashes
        return scheme

    def lookup_ids(self, tokens, table=0):
        """Data row of each token of field ``table`` (-1: not sampled), int64.

        Parameters
        ----------
        tokens : array_like of int32, int64 or uint64, any shape
        table : int
            The field, in ``[0, num_fields)``.

        Returns
        -------
        ndarray of int64, ``tokens``' shape
            The row of :attr:`data` each token reads, -1 for a token absent
            from the sample (its starts are hashed on the fly). A CuPy
            ``tokens`` gives a CuPy array, from the GPU kernel.

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> t = he.LSHTable.fit(np.array([[3, 9], [4, 9]]), size=100, dim=4)
        >>> t.lookup_ids([4, 3, 5]).tolist(), t.lookup_ids([9], table=1).tolist()
        ([2, 0, -1], [1])
        """
        if is_cupy(tokens):
            from ._gpu.lsh import lookup_ids
            return lookup_ids(self, tokens, table)
        idx = V.as_keys(tokens, "tokens")
        table = V.check_table(table, self)
        out = np.empty(idx.size, np.int64)
        kernels().lsh_find(self._view, idx.reshape(-1), table, out)
        return out.reshape(idx.shape)

    # ---- parameters derived from the seed
    def _coefficients(self, dim, width):
        nh, F, runs = self.num_hashes, self._num_functions(dim, width), dim // self.block
        if self._kind_id == _LMA and nh > width:
            raise ValueError(f"num_hashes: expected <= signature_size = {width}, got {nh}")
        self._salt = _salt(self.seed)
        ab = _stream(self.seed, 0, 1 + 2 * F)[1:] >> np.uint64(3)      # 61-bit words
        mh = np.empty(2 * F, np.uint64)
        mh[0::2] = ab[0::2] % np.uint64(P - 1) + np.uint64(1)     # a_f in [1, P)
        mh[1::2] = ab[1::2] % np.uint64(P)                         # b_f in [0, P)
        mix = _stream(self.seed, 1, nh + runs)
        mix[:nh] |= np.uint64(1)                                   # odd multipliers
        self._lsh = dict(salt=self._salt, width=width, num_hashes=nh, mh=mh, mix=mix,
                         pick=self._pick(runs, width).reshape(-1))

    # ---- building from data
    @classmethod
    def fit(cls, X, size, dim, num_hashes=2, num_points=None, seed=0, block=None,
            progress=False, device=None, _backend=None, **kwargs):
        # the device first: not after the CPU's share of the work
        on_device = is_cupy(X)
        if device is None:
            device = "gpu" if on_device else "cpu"
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device: expected 'cpu' or 'gpu', got {device!r}")
        if on_device and device == "cpu":
            raise TypeError("X: expected a numpy.ndarray for device='cpu' (hashemb never "
                            "copies between host and device), got a cupy.ndarray")
        if device == "gpu" and _backend is None and not on_device:
            from ._gpu._runtime import device_count
            if device_count() == 0:
                raise RuntimeError("device: 'gpu' needs CuPy and a CUDA device, and this "
                                   "process has none (he.show_config() says why)")
        if device == "gpu":
            from ._gpu import _args as A, _runtime as RT
            be = _backend or RT.backend()
        if on_device:
            gpu = be.device_of(A.as_array(be, X, "X"))
            with gpu:                       # a contiguous copy on X's device
                X = A.as_keys(be, X, "X")
        else:
            X = V.as_keys(X, "X")
            gpu = contextlib.nullcontext()
        if X.ndim != 2:
            raise ValueError(f"X: expected a 2-D (rows, fields) array, got {X.ndim}-D")
        rows, T = X.shape
        if rows == 0 or T == 0:
            raise ValueError(f"X: expected at least one row and one field, got shape {X.shape}")
        # the original's 125,000 sampled rows, or every row of a smaller X
        num_points = min(_NUM_POINTS, rows) if num_points is None else \
            V.check_positive_int(num_points, "num_points", upper=1 << 62)
        if num_points > rows:
            raise ValueError(f"num_points: expected <= {rows} (the rows of X), got {num_points}")
        if num_points * T >= 1 << 32:
            raise ValueError(f"num_points: expected num_points * fields < 2**32, "
                             f"got {num_points} * {T}")
        seed = V.check_seed(seed)
        size = V.check_positive_int(size, "size", upper=(1 << 32) + 1)
        dim = V.check_positive_int(dim, "dim", upper=1 << 20)
        # a probe scheme: the minhash functions, mixers and picks of this seed
        probe = cls.__new__(cls)
        probe.num_hashes, probe.seed = V.check_positive_int(num_hashes, "num_hashes", 64), seed
        probe.block = _check_block(block, dim, size)
        width = probe._width(dim, kwargs.get("signature_size"))
        probe._coefficients(dim, width)
        if num_points == rows:
            sample = np.arange(rows, dtype=np.int64)
        else:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(rows, num_points, replace=False)).astype(np.int64)
        F = probe._num_functions(dim, width)
        slots = cls._kind_id == _LSH_TABLE
        probe._setup(cls._kind_id, size, dim, probe.block, size, [0] * 12)
        if device == "gpu":
            from ._gpu.lsh import build
            with gpu:
                dsample = be.to_device(sample)
                if on_device:
                    Xs = X if num_points == rows else X[dsample]
                else:                               # the copy device="gpu" asks for
                    Xs = be.to_device(X if num_points == rows else X[sample])
                fields, tokens, data = build(probe, Xs.astype(np.int64, copy=False), dsample,
                                             F, slots, be)
        else:
            fields, tokens, data = cls._build(X, sample, probe, F, slots, progress)
        scheme = cls._from_distinct(size, dim, T, fields, tokens, data, num_hashes, seed,
                                    block, kwargs.get("signature_size"))
        scheme.num_points = num_points
        return scheme

    @classmethod
    def _build(cls, X, sample, probe, F, slots, progress):
        """fit's CPU build: (fields, tokens, data) of the distinct sampled
        pairs, numbered in order of first occurrence by the hash map."""
        k, salt = kernels(), probe._salt
        num_points, T = sample.shape[0], X.shape[1]
        Xs = X[sample] if num_points < X.shape[0] else X
        tokens = np.ascontiguousarray(Xs.astype(np.int64, copy=False).reshape(-1)).view(np.uint64)
        fields = np.tile(np.arange(T, dtype=np.int32), num_points)
        keys = np.zeros(2 * _pow2_above(tokens.shape[0]), np.uint64)
        ids = np.empty(tokens.shape[0], np.int64)
        count = k.lsh_insert(fields, tokens, salt, keys, ids)
        del keys
        running = np.maximum.accumulate(ids)
        first = np.flatnonzero(np.r_[True, running[1:] > running[:-1]])
        sampled_fields, sampled_tokens = fields[first], tokens[first]
        row_keys = np.empty(num_points, np.uint64)
        k.lsh_row_keys(sample, salt, row_keys)
        order = np.argsort(ids, kind="stable")
        occ_keys = np.repeat(row_keys, T)[order]
        del order
        ptr = np.zeros(count + 1, np.int64)
        np.cumsum(np.bincount(ids, minlength=count), out=ptr[1:])
        del ids
        data = np.empty((count, probe._lsh["width"]), np.uint32)
        view = k.SchemeView(probe)
        chunks = np.linspace(0, count, min(count, 64) + 1).astype(np.int64)
        with _bar(progress, total=count, desc=f"{cls._type} minhash", unit="token",
                  unit_scale=True, leave=False) as bar:
            for a, b in zip(chunks[:-1], chunks[1:]):
                k.lsh_signatures(view, ptr, occ_keys, int(a), int(b), F, slots, data[a:b])
                bar.update(int(b - a))
        return sampled_fields, sampled_tokens, data

    # ---- persistence
    def save(self, path):
        """Write the scheme to a ``.npz`` file (:meth:`load` reads it back).

        Parameters
        ----------
        path : str or path-like
            The file; NumPy adds ``.npz`` to a name without it.
        """
        cfg = self.config()
        np.savez(path, **{k: (np.asarray(-1 if v is None else v)) for k, v in cfg.items()})

    @classmethod
    def load(cls, path):
        """Read a scheme written by :meth:`save` (an :class:`LSHTable` or an
        :class:`LMA`, whichever was saved).

        Parameters
        ----------
        path : str or path-like
            A ``.npz`` file written by :meth:`save`.

        Returns
        -------
        LSHTable or LMA
            Equal to the scheme saved (``==``). ``LSHTable.load`` of a saved
            LMA, or ``LMA.load`` of a saved LSHTable, is a ValueError.

        Examples
        --------
        >>> import os, tempfile, numpy as np, hashemb as he
        >>> t = he.LSHTable.fit(np.array([[0, 5], [1, 6]]), size=100, dim=4)
        >>> path = os.path.join(tempfile.mkdtemp(), "t.npz")
        >>> t.save(path)
        >>> he.LSHTable.load(path) == t
        True
        """
        with np.load(path, allow_pickle=False) as z:
            cfg = {k: z[k] for k in z.files}
        kind = str(cfg.pop("type"))
        makers = {"LSHTable": LSHTable, "LMA": LMA}
        if kind not in makers or (cls is not _MinhashScheme and makers[kind] is not cls):
            raise ValueError(f"path: expected a saved {cls._type or 'LSHTable or LMA'}, "
                             f"got {kind!r}")
        scalars = {k: int(v) for k, v in cfg.items() if v.ndim == 0}
        if scalars.get("signature_size") == -1:
            scalars["signature_size"] = None
        return makers[kind](keys=cfg["keys"], data=cfg["data"], **scalars)

    # ---- scheme protocol
    def _bounds(self, table0, T):
        return None                      # any 64-bit token: absent ones are hashed

    clashes = 0              # sampled tokens merged by a fingerprint clash (fit)

    @property
    def num_sampled(self):
        """Distinct (field, token) pairs seen in the sample (rows of ``data``)."""
        return int(self.data.shape[0])

    @property
    def signed(self):
        return False

    def extra_bytes(self):
        """Bytes besides the array: the token map and the slots or signatures."""
        return int(self.keys.nbytes + self.data.nbytes)

    def _state(self):
        if not hasattr(self, "_digest"):
            h = hashlib.sha1()
            for a in (self.keys, self.data):
                h.update(a.tobytes())
            self._digest = h.hexdigest()
        return (self._type, self.size, self.dim, self.num_tables, self.num_hashes, self.seed,
                self.block, self._lsh["width"], self._digest)

    def __repr__(self):
        return (f"{self._type}(size={self.size}, dim={self.dim}, num_fields={self.num_tables}, "
                f"num_hashes={self.num_hashes}, block={self.block}, seed={self.seed}, "
                f"sampled={self.num_sampled}{self._extra_repr()})")

    def _extra_repr(self):
        return ""


class LSHTable(_MinhashScheme):
    r"""SCMA: a slot table learned from data co-occurrence by minhash.

    A sample of rows of the categorical matrix ``X`` gives every (field, token)
    seen in it the set :math:`S` of sampled rows it occurs in. Its embedding is
    cut into runs of :math:`Z` = ``block`` elements (default :math:`Z = D`, one
    run; ``block=1`` is the original's element-wise allocation); run :math:`k`
    is read contiguously (circularly) from

    .. math::

        \mathrm{start}(x, k) = \Big\lfloor m\,\big(c_k + \textstyle\sum_{h < H}
        A_h\, \mu_{hR+k}(S)\big) \bmod 2^{64} \,/\, 2^{64} \Big\rfloor,\qquad
        \mu_f(S) = \min_{r \in S}\, h_f(r) \bmod 2^{32}

    with :math:`R = D/Z` runs, :math:`H` = ``num_hashes``,
    :math:`h_f(r) = (a_f \kappa(r) + b_f) \bmod P` universal hashes
    of the scrambled row key :math:`\kappa(r)`, odd random :math:`A_h` and random
    :math:`c_k`, all drawn from the seed's SplitMix64 sequence (the streams of
    :math:`a_f, b_f` and of :math:`A_h, c_k` are one sequence offset by a word,
    so each :math:`A_h, c_k` comes from the 64-bit word of one :math:`a_f` or
    :math:`b_f`: kept, as saved tables depend on it, and measured harmless:
    disjoint sets meet at 1/m within 1.6 standard deviations over 6 seed and
    H settings) (the original sums :math:`A_h \mu` and reduces mod m; the
    multiply-add over 32-bit values mod :math:`2^{64}` then the high bits of a
    product with m is the same universal combination without a division). Two
    tokens with Jaccard similarity :math:`J` share run :math:`k` with
    probability :math:`J^H + (1 - J^H)/m` (about), the same for every pair of
    fields: the slot does not depend on the field. The run starts of sampled
    tokens are stored (``num_sampled x D/Z`` uint32) with an open-addressing
    map from (field, token) to its row; a token absent from the sample gets the
    starts of a random singleton set (its own seeded key), computed on the fly,
    so memory holds only the tokens seen, not every token of every table.

    Build with :meth:`fit`; :meth:`save` / :meth:`load` keep it as ``.npz``.
    The scheme's table ``t`` is field ``t`` of ``X``; tokens are any 64-bit
    integers. Use it like :class:`RobeZ` (bags, many tables, fused optimizers,
    :class:`hashemb.torch.LSHEmbeddingBagCollection`).

    Parameters
    ----------
    size, dim : int
        Floats in the shared array (``m <= 2**32``) and embedding width.
    num_fields : int
    keys, data : arrays
        The map of the ``n`` sampled (field, token) pairs (uint64, a power of
        two of at least ``2 n`` entries) and their ``(n, dim / block)`` run
        starts, as :meth:`fit`, :meth:`from_tokens` and :meth:`load` make them:
        build with those (:meth:`from_tokens` takes the pairs themselves).
    num_hashes : int
        :math:`H`, minhash values combined a run (1 to 63).
    seed : int
    block : int, optional
        Z, a divisor of ``dim`` (default ``dim``).
    signature_size : None
        LMA's; an LSHTable stores starts, not signatures.

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> X = np.array([[0, 5], [0, 5], [1, 6], [1, 7]])
    >>> t = he.LSHTable.fit(X, size=1000, dim=8, num_hashes=1, num_points=4)
    >>> bool((t.slots([0], table=0) == t.slots([5], table=1)).all())   # same rows, same slots
    True
    """

    _type, _kind_id = "LSHTable", _LSH_TABLE

    def _width(self, dim, signature_size):
        if signature_size is not None:
            raise ValueError("signature_size: LSHTable stores slots; use he.LMA for signatures")
        return dim // self.block

    def _num_functions(self, dim, width):
        return self.num_hashes * width

    def _pick(self, runs, width):
        k, h = np.meshgrid(np.arange(runs), np.arange(self.num_hashes), indexing="ij")
        return (h * runs + k).astype(np.int32)

    @classmethod
    def fit(cls, X, size, dim, num_hashes=2, num_points=None, seed=0, block=None,
            progress=False, device=None, _backend=None):
        """Learn the table from ``X`` (rows x fields, integer tokens): sample
        ``num_points`` rows (seeded, without replacement; default 125,000, or
        every row of a smaller ``X``), take for every token
        seen the minhashes of its row set under ``num_hashes * dim / block``
        universal hashes, and combine them into slots (one pass over the sample; Cython +
        OpenMP, parallel over tokens). A CuPy ``X`` is fitted on its device
        (CUDA kernels: the pairs numbered by sorting, the minima and the
        starts; the table comes back to the host, as every scheme's arrays
        live there), with the CPU build's exact result.

        Parameters
        ----------
        X : array_like of int32, int64 or uint64, shape (rows, fields)
            Training tokens; field t is the scheme's table t.
        size : int
            Floats in the shared array, at most 2**32.
        dim : int
            Embedding width D.
        num_hashes : int
            H, minhash values combined a run (1 to 63).
        num_points : int, optional
            Rows sampled (default ``min(125_000, rows)``); ``num_points *
            fields`` must stay below 2**32.
        seed : int
            Seed of the sample, the hashes and the token map.
        block : int, optional
            Z, a divisor of ``dim`` (default ``dim``: one run a row).
        progress : bool
            A tqdm bar over the tokens (CPU).
        device : {None, "cpu", "gpu"}
            Where the build runs: None follows ``X`` (NumPy: the CPU, CuPy:
            its device); "gpu" with a host ``X`` copies its sampled rows to
            the current device; "cpu" with a CuPy ``X`` is a TypeError.

        Returns
        -------
        LSHTable
            With ``num_points`` set and ``clashes`` the sampled tokens merged
            by a fingerprint clash (almost always 0).

        Raises
        ------
        ValueError
            Empty ``X``, a ``num_points`` given above its rows, ``size`` above 2**32.
        RuntimeError
            ``device="gpu"`` in a process without CuPy and a CUDA device.

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> X = np.array([[0, 5], [0, 5], [1, 6], [1, 7]])
        >>> t = he.LSHTable.fit(X, size=1000, dim=8, num_hashes=1)
        >>> t.num_sampled, t.num_points, t.data.shape    # 5 tokens seen in 4 rows
        (5, 4, (5, 1))
        >>> bool((t.slots([0], table=0) == t.slots([5], table=1)).all())  # same row set
        True
        """
        return super().fit(X, size, dim, num_hashes, num_points, seed, block, progress,
                           device, _backend)


class LMA(_MinhashScheme):
    r"""LMA: minhash memory allocation with slots computed on the fly.

    Like :class:`LSHTable`, but each sampled token keeps only a signature of
    :math:`K` = ``signature_size`` minhash values (uint32; default
    :math:`\max(H, \min(8, H R))`, :math:`R = D/Z` runs, so 2 values for the
    default one run and :math:`H = 2`) and run :math:`k` (of ``block`` elements, default all
    ``dim``) combines :math:`H` of them, at positions ``pick[k]`` (``H``
    distinct positions per run, seeded):

    .. math::

        \mathrm{slot}(x, k) = \Big\lfloor m\,\big(c_k + \textstyle\sum_{h < H}
        A_h\, \sigma_{\pi(k, h)}(x)\big) \bmod 2^{64} \,/\, 2^{64} \Big\rfloor

    so memory is the array plus ``K`` values per sampled token, not a
    ``(tokens x D)`` table. Each run still collides with probability
    :math:`J^H` (about) for Jaccard similarity :math:`J`, but runs that
    pick the same positions collide together. Absent tokens get the signature
    of a random singleton, computed in the kernel.

    Build with :meth:`fit` (or :meth:`from_tokens`, :meth:`load`), as an
    :class:`LSHTable`.

    Parameters
    ----------
    size, dim : int
        Floats in the shared array (``m <= 2**32``) and embedding width.
    num_fields : int
    keys, data : arrays
        The map of the ``n`` sampled (field, token) pairs (uint64, a power of
        two of at least ``2 n`` entries) and their ``(n, K)`` signatures, as
        :meth:`fit`, :meth:`from_tokens` and :meth:`load` make them.
    num_hashes : int
        :math:`H`, signature values combined a run (1 to 63, at most K).
    seed : int
    block : int, optional
        Z, a divisor of ``dim`` (default ``dim``).
    signature_size : int, optional
        K (default :math:`\max(H, \min(8, H R))`).

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> X = np.array([[0, 5], [0, 5], [1, 6], [1, 7]])
    >>> lma = he.LMA.fit(X, size=1000, dim=8, num_points=4)
    >>> lma.data.shape                  # 5 sampled tokens x 2 values (one run, H = 2)
    (5, 2)
    """

    _type, _kind_id = "LMA", _LMA

    def _width(self, dim, signature_size):
        if signature_size is None:
            # the values the runs can use, at most 8, and at least the H each
            # run combines (min(8, H R) refused H = 9..63 with one run)
            return max(self.num_hashes, min(8, self.num_hashes * (dim // self.block)))
        return V.check_positive_int(signature_size, "signature_size", upper=1 << 16)

    def _num_functions(self, dim, width):
        return width

    def _pick(self, runs, width):
        r = _stream(self.seed, 2, runs * width).reshape(runs, width)
        return np.argsort(r, axis=1, kind="stable")[:, :self.num_hashes].astype(np.int32)

    @classmethod
    def fit(cls, X, size, dim, num_hashes=2, num_points=None, seed=0, block=None,
            signature_size=None, progress=False, device=None, _backend=None):
        """Learn the signatures from ``X`` as :meth:`LSHTable.fit` does, keeping
        ``signature_size`` minhash values per sampled token.

        Parameters
        ----------
        X, size, dim, num_hashes, num_points, seed, block, progress, device
            As in :meth:`LSHTable.fit`.
        signature_size : int, optional
            K, minhash values kept per token (default ``max(H, min(8, H D /
            block))``); at least ``num_hashes``.

        Returns
        -------
        LMA
            ``data`` of shape ``(num_sampled, K)``, uint32.

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> X = np.array([[0, 5], [0, 5], [1, 6], [1, 7]])
        >>> lma = he.LMA.fit(X, size=1000, dim=8, num_hashes=1, signature_size=4)
        >>> lma.data.shape
        (5, 4)
        >>> bool((lma.data[lma.lookup_ids([0])[0]] == lma.data[lma.lookup_ids([5], 1)[0]]).all())
        True
        """
        return super().fit(X, size, dim, num_hashes, num_points, seed, block, progress,
                           device, _backend, signature_size=signature_size)

    def _extra_repr(self):
        return f", signature_size={self._lsh['width']}"


def main(argv=None):
    """``python -m hashemb lsh-table``: learn an SCMA table (or LMA signatures)
    from a data file and save it as ``.npz`` (the original's
    ``lsh_pp_pretraining EMBEDDING NUM_HASH NUM_PT``)."""
    import argparse
    import resource
    import time
    p = argparse.ArgumentParser(prog="python -m hashemb lsh-table", description=main.__doc__)
    p.add_argument("--data", required=True,
                   help="a Criteo TSV (label, I1..I13, C1..C26; .gz too) or a .npy "
                        "(rows, fields) integer matrix")
    p.add_argument("--dim", type=V.cli_number(int), required=True, help="embedding width D")
    p.add_argument("--num-hash", type=V.cli_number(int, high=63), default=2,
                   help="minhashes combined per run")
    p.add_argument("--num-points", type=V.cli_number(int), default=125_000, help="rows sampled")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", type=V.cli_number(int), help="floats in the shared array")
    size.add_argument("--compression", type=V.cli_number(float), default=1000.0,
                      help="array = distinct tokens x dim / compression (default 1000)")
    p.add_argument("--lma", action="store_true", help="LMA signatures instead of a slot table")
    p.add_argument("--signature-size", type=V.cli_number(int), default=None,
                   help="LMA: minhash values per token (default max(num-hash, "
                        "min(8, num-hash * runs)))")
    p.add_argument("--block", type=V.cli_number(int), default=None,
                   help="elements per run (divides dim; default dim, 1 = element-wise)")
    p.add_argument("--limit", type=V.cli_number(int), default=None,
                   help="read at most this many rows")
    p.add_argument("--seed", type=V.cli_number(int, closed=True), default=0)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="where the minhash build runs (gpu: CuPy, equal results)")
    p.add_argument("--out", default=None, help="output .npz (default lsh_D_H_N[_lma].npz)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.data.endswith(".npy"):
        X = np.load(args.data, mmap_mode="r")
        X = np.asarray(X[:args.limit] if args.limit else X)
    else:
        from .data import CriteoTSV
        X = CriteoTSV(args.data, on_bad="skip").read(limit=args.limit).cats
    if X.ndim != 2 or X.shape[0] == 0:
        raise SystemExit(f"--data: expected a non-empty (rows, fields) matrix, got {X.shape}")
    distinct = sum(len(np.unique(X[:, t])) for t in range(X.shape[1]))
    size = args.size or max(args.block or args.dim,
                            int(np.ceil(distinct * args.dim / args.compression)))
    num_points = min(args.num_points, X.shape[0])
    print(f"data: {X.shape[0]:,} rows x {X.shape[1]} fields, {distinct:,} distinct tokens; "
          f"sampling {num_points:,} rows; array of {size:,} floats")
    t1 = time.perf_counter()
    kw = dict(num_hashes=args.num_hash, num_points=num_points, seed=args.seed,
              block=args.block, progress=True, device=args.device)
    try:
        scheme = (LMA.fit(X, size, args.dim, signature_size=args.signature_size, **kw)
                  if args.lma else LSHTable.fit(X, size, args.dim, **kw))
    except (ValueError, TypeError, RuntimeError) as e:
        V.cli_refusal(p, e, {"size": "--size", "dim": "--dim", "block": "--block",
                             "device": "--device",
                             "seed": "--seed", "num_hashes": "--num-hash",
                             "signature_size": "--signature-size",
                             "num_points": "--num-points"})
    t2 = time.perf_counter()
    out = args.out or (f"lsh_{args.dim}_{args.num_hash}_{num_points}"
                       f"{'_lma' if args.lma else ''}")
    if not out.endswith(".npz"):
        out += ".npz"       # (NumPy adds it: said here as the file's real name)
    scheme.save(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"{scheme!r}\nbuilt in {t2 - t1:.2f} s (read {t1 - t0:.1f} s), peak memory "
          f"{peak:.2f} GiB, {scheme.extra_bytes() / 2 ** 20:.1f} MiB of map and "
          f"{'signatures' if args.lma else 'slots'}; saved {out}")
    return scheme
