"""Slot schemes: how (table e, token x, element i) maps into the array M.

Each scheme is a few integers and small coefficient arrays that the C header
hashemb/slots.h turns into run starts; the bag kernels are shared by all.
"""
import inspect
import math

import numpy as np

from . import _validate as V
from ._backend import aligned, is_cupy, kernels
from .hashing import P, UniversalHash

# kinds of hashemb/_include/hashemb/slots.h
_FULL, _ROBE, _ROBE_WIDE, _ROBE_REF, _HNET_REF = range(5)

ROBE_REF_P = 2038074743
HNET_REF = (9824516537, 57857966300227, 104729, 117130198221199)


_INIT_CHUNK = 1 << 20      # 16-bit init_weight: floats drawn at a time

class Scheme:
    """Base of every slot scheme (see :class:`RobeZ`, :class:`HashedNet`,
    :class:`FullTable`).

    Attributes
    ----------
    size : int
        Floats in the array M.
    dim : int
        Embedding width D.
    weight_shape : tuple
        Shape of the array that :meth:`init_weight` makes and backward returns.
    num_tables : int or None
        Tables with a size (tokens range-checked), or None: any table id.

    Examples
    --------
    Every scheme answers the same questions, which is all the bag kernels ask:

    >>> import numpy as np, hashemb as he
    >>> for s in (he.RobeZ(1000, 8, block=4), he.HashedNet(1000, 8), he.FullTable([50], 8)):
    ...     print(type(s).__name__, s.size, s.weight_shape, s.slots(np.array([3]), table=0).shape)
    RobeZ 1000 (1000,) (1, 8)
    HashedNet 1000 (1000,) (1, 8)
    FullTable 400 (50, 8) (1, 8)
    >>> he.Scheme.from_config(he.RobeZ(1000, 8, seed=3).config()) == he.RobeZ(1000, 8, seed=3)
    True
    """

    _signed = False
    _rows = 1
    _ref_p = 0
    _nonneg = False      # tokens must be >= 0 (reference maps)
    _lsh = None          # SCMA / LMA arrays (hashemb.lsh)
    num_tables = None
    table_sizes = None

    def _setup(self, kind, size, dim, run, mod, coef):
        self._kind, self.size, self.dim, self._run, self._mod = kind, size, dim, run, mod
        self._coef = np.asarray(coef, dtype=np.uint64)
        assert self._coef.shape == (12,), "slots.h reads HE_NCOEF = 12 coefficients"
        if not hasattr(self, "_sign_coef"):
            self._sign_coef = np.zeros(1, np.uint64)
        if not hasattr(self, "_run_coef"):
            self._run_coef = np.zeros(1, np.uint64)
        if not hasattr(self, "_table_base"):
            self._table_base = np.zeros(1, np.int64)
        self._sized = self.table_sizes is not None
        self._view_cache = None

    @property
    def weight_shape(self):
        """Shape of the array: ``(size,)``, one flat shared array."""
        return (self.size,)

    @property
    def _bounded(self):
        """Are some tokens out of range (sized tables, or reference maps' >= 0)?"""
        return self.table_sizes is not None or self._nonneg

    def _bounds(self, table0, T):
        """Per-table token bounds [0, n) for tables table0.., or None (any token);
        the kernels compare unsigned, so reference maps' bound 2**63 (every
        token >= 0) is held as its int64 bits, -2**63."""
        if self.table_sizes is not None:
            return np.array(self.table_sizes[table0:table0 + T], np.int64)
        return np.full(T, -(1 << 63), np.int64) if self._nonneg else None

    def __getstate__(self):
        # the kernels' view (a C struct over these arrays) is remade on first
        # use: copy.deepcopy, pickle and torch.save of a used scheme, or of a
        # module holding one, failed on it
        state = self.__dict__.copy()
        state["_view_cache"] = None
        return state

    @property
    def _view(self):
        if self._view_cache is None:
            self._view_cache = kernels().SchemeView(self)
        return self._view_cache

    def _tokens(self, indices, table):
        idx = V.as_keys(indices, "indices")
        table = V.check_table(table, self)
        flat = idx.reshape(-1)
        V.check_indices(kernels(), self, flat, np.array([0, flat.shape[0]], np.int64), 1, 1, table,
                        unsigned=V.is_uint64(indices))
        return idx, flat, np.full(flat.shape[0], table, np.int64)

    def slots(self, indices, table=0):
        """Slots of every element: int64 array of shape ``indices.shape + (dim,)``
        with values in ``[0, size)`` (for tests and analysis; the bag kernels
        compute slots on the fly and never build this array). CuPy indices: a
        CuPy result, computed on the device.

        Parameters
        ----------
        indices : array_like of int32, int64 or uint64, any shape
            Tokens (rows of a sized table: IndexError outside it).
        table : int
            Table id e (hashed into the slot; a FullTable's table number).

        Returns
        -------
        ndarray of int64, shape ``indices.shape + (dim,)``
            ``out[..., i] = slot(table, indices[...], i)``.

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> full = he.FullTable([3, 5], 2)
        >>> full.slots(np.array([[0, 4]]), table=1).tolist()   # rows 3 and 7 of the array
        [[[6, 7], [14, 15]]]
        """
        if is_cupy(indices):
            from ._gpu.slots import scheme_slots
            return scheme_slots(self, indices, table)
        idx, flat, tables = self._tokens(indices, table)
        out = np.empty((flat.shape[0], self.dim), np.int64)
        kernels().slots(self._view, flat, tables, out)
        return out.reshape(idx.shape + (self.dim,))

    def signs(self, indices, table=0):
        """Signs of every element, float32 +-1 of shape ``indices.shape + (dim,)``
        (all ones for an unsigned scheme); CuPy in, CuPy out.

        Parameters
        ----------
        indices : array_like of int32, int64 or uint64, any shape
        table : int

        Returns
        -------
        ndarray of float32, shape ``indices.shape + (dim,)``
            ``out[..., i] = s(table, indices[...], i)``, each +1 or -1.
        """
        if is_cupy(indices):
            from ._gpu.slots import scheme_signs
            return scheme_signs(self, indices, table)
        idx, flat, tables = self._tokens(indices, table)
        out = np.empty((flat.shape[0], self.dim), np.float32)
        kernels().signs(self._view, flat, tables, out)
        return out.reshape(idx.shape + (self.dim,))

    def init_weight(self, seed=0, dtype=np.float32, scale=None, like=None):
        """A new array of ``weight_shape``, uniform on ``[-scale, scale]``,
        starting on a 64-byte boundary (a full table's rows then start on
        cache lines).

        ``scale`` defaults to ``1/sqrt(rows)`` for a FullTable (each table its
        own rows, as torch's DLRM does) and ``1/sqrt(dim)`` for a shared array;
        a FullTable of several tables also takes one scale per table.

        Parameters
        ----------
        seed : int
            Seed of NumPy's ``default_rng``.
        dtype : float32, float64, float16 or bfloat16
            float16 and bfloat16 (``ml_dtypes.bfloat16``) hold the float32
            draw rounded once to nearest.
        scale : float or list of float, optional
            Half-width of the uniform range; a list (FullTable only) gives
            one per table.
        like : cupy.ndarray or numpy.ndarray, optional
            A CuPy array: the array is drawn on its device (CuPy's current
            stream) by a CUDA kernel that runs NumPy's generator (PCG64) in
            parallel, with the same values bit for bit and no host copy.

        Returns
        -------
        ndarray of shape ``weight_shape`` and ``dtype``
            (a CuPy array with a CuPy ``like``)

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> w = he.RobeZ(1000, 16).init_weight(seed=1)
        >>> w.shape, w.dtype, bool(np.abs(w).max() <= 0.25)    # 1/sqrt(16)
        ((1000,), dtype('float32'), True)
        >>> full = he.FullTable([100, 4], 8).init_weight()
        >>> bool(np.abs(full[:100]).max() <= 0.1), bool(np.abs(full[100:]).max() > 0.1)
        (True, True)
        """
        rng = np.random.default_rng(V.check_seed(seed))
        if scale is None:
            parts = self._default_scales()
        elif isinstance(scale, (list, tuple)) or np.ndim(scale) > 0:
            parts = self._default_scales()
            if not isinstance(self, FullTable):
                raise ValueError(f"scale: expected a number, got {len(scale)} values")
            if len(scale) != len(parts):
                raise ValueError(f"scale: expected a number, or {len(parts)} (one per table), "
                                 f"got {len(scale)} values")
            parts = [(a, b, V.check_float(x, "scale", nonneg=True))
                     for (a, b, _), x in zip(parts, scale)]
        else:
            parts = [(0, self.size, V.check_float(scale, "scale", nonneg=True))]
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64) and not V.is16(dtype):
            raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, "
                            f"got {dtype}")
        if V.check_like(like):
            from ._gpu.init import init_uniform
            return init_uniform(self.weight_shape, dtype, rng, parts, like)
        if V.is16(dtype):
            # storage for the bag functions: the float32 draw rounded once to
            # nearest, a chunk at a time (no float32 copy of a large table;
            # the generator continues its stream across chunks, so the
            # values are the same)
            w = aligned(self.weight_shape, dtype)
            flat = w.reshape(-1).view(np.uint16)
            bf = V.format16(dtype)
            for a in range(0, flat.size, _INIT_CHUNK):
                c = rng.random(min(_INIT_CHUNK, flat.size - a), dtype=np.float32)
                _spread(c, a, parts)
                kernels().half_round(c, flat[a:a + c.size], 0, bf)
            return w
        w = rng.random(dtype=dtype, out=aligned(self.weight_shape, dtype))  # no float64 copy
        _spread(w.reshape(-1), 0, parts)
        return w

    def _default_scales(self):
        """[(first, end, scale)] over the flat array: the default init's ranges."""
        return [(0, self.size, 1.0 / math.sqrt(self.dim))]

    def __eq__(self, other):
        return type(self) is type(other) and self._state() == other._state()

    def __hash__(self):
        return hash(self._state())

    def config(self):
        """The constructor call as a dict: ``Scheme.from_config(s.config()) == s``
        (what the torch adapters put in a state_dict).

        Returns
        -------
        dict
            ``type`` (the constructor's name, e.g. ``"RobeZ"`` or
            ``"RobeZ.reference"``) and its arguments; a new dict each call.
        """
        return dict(self._config)

    @staticmethod
    def from_config(config):
        """Rebuild a scheme from :meth:`config`.

        Examples
        --------
        >>> import hashemb as he
        >>> r = he.RobeZ(1000, 16, block=4, seed=7)
        >>> he.Scheme.from_config(r.config()) == r
        True
        """
        if not isinstance(config, dict) or "type" not in config:
            raise TypeError(f"config: expected a dict made by Scheme.config(), got {config!r}")
        cfg = dict(config)
        kind = cfg.pop("type")
        from .lsh import LMA, LSHTable
        makers = {"LSHTable": LSHTable, "LMA": LMA,"RobeZ": RobeZ, "RobeZ.reference": RobeZ.reference,
                  "HashedNet": HashedNet, "HashedNet.reference": HashedNet.reference,
                  "FullTable": FullTable}
        if kind not in makers:
            raise ValueError(f"config: expected type in {sorted(makers)}, got {kind!r}")
        make = makers[kind]
        known = set(inspect.signature(make).parameters)
        extra = sorted(set(cfg) - known)
        if extra:
            raise ValueError(f"config: expected the keys of a {kind} config "
                             f"({', '.join(sorted(known))}), got unknown {', '.join(extra)}")
        return make(**cfg)

    def _state(self):
        return (self._kind, self.size, self.dim, self._run, self._mod, self._signed,
                tuple(self._coef.tolist()), self._rows,
                None if self.table_sizes is None else tuple(self.table_sizes))


def _check_block(block, dim, name="block"):
    block = V.check_positive_int(block, name)
    if block % dim and dim % block:
        raise ValueError(f"{name}: expected a divisor or a multiple of dim={dim}, got {block}")
    return block


def _size_dim(size, dim, block=1):
    size = V.check_positive_int(size, "size", upper=1 << 61)
    dim = V.check_positive_int(dim, "dim", upper=1 << 20)
    return size, dim


class RobeZ(Scheme):
    r"""ROBE-Z: random offset block embedding array.

    Every embedding is cut into blocks of :math:`Z` consecutive elements; a block
    is read contiguously from a hashed offset of the circular array :math:`M`
    of :math:`m` floats, shared by all tables (the table id is hashed):

    .. math::

        Z \le D:\quad \mathrm{slot}(e,x,i) = (h(e, x, \lfloor i/Z \rfloor) + i \bmod Z) \bmod m

        Z > D:\quad \mathrm{slot}(e,x,i) = (h(e, \lfloor x/r \rfloor, 0) + (x \bmod r) D + i) \bmod m,
        \quad r = Z/D

    with ``h`` the :class:`UniversalHash` of ``seed``. ``wrap=False`` reads
    :math:`h \bmod (m - Z + 1)` instead, so a block never wraps past the end.
    ``signed=True`` multiplies element ``i`` by the sign hash ``g(e, x, i)``
    (the variant the ROBE paper analyses). Range reduction ``v mod m`` uses a
    precomputed reciprocal (``q = mulhi(v, floor((2^64-1)/m))`` and one
    correction), exact and free of division instructions.

    Parameters
    ----------
    size : int
        Floats in the shared array, ``m >= block``.
    dim : int
        Embedding width D.
    block : int, optional
        Z; a divisor or a multiple of ``dim``. Default ``dim`` (ROBE-D: one
        contiguous run per row, the fewest cache lines per lookup).
    seed : int
        Seed of the universal hash.
    signed : bool
    wrap : bool

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> robe = he.RobeZ(1000, 16, block=4, seed=0)
    >>> s = robe.slots(np.array([7]))[0]
    >>> bool(((s[1:4] - s[0]) % 1000 == [1, 2, 3]).all())   # a block is contiguous
    True
    """

    def __init__(self, size, dim, block=None, seed=0, signed=False, wrap=True):
        size, dim = _size_dim(size, dim)
        block = _check_block(dim if block is None else block, dim)
        if size < block:
            raise ValueError(f"size: expected size >= block = {block}, got {size}")
        self.block, self.seed = block, V.check_seed(seed)
        self.wrap = V.check_flag(wrap, "wrap")
        self._signed = V.check_flag(signed, "signed")
        self._config = dict(type="RobeZ", size=size, dim=dim, block=block, seed=self.seed,
                            signed=self._signed, wrap=self.wrap)
        self.hash = UniversalHash(self.seed)
        coef = [int(c) for c in self.hash.coef]
        self._sign_coef = np.array([coef[6] * i % P for i in range(dim)], np.uint64)
        mod = size if wrap else size - block + 1
        if block <= dim:
            rc = [coef[2] * k % P for k in range(dim // block)]
            self._run_coef = np.array(rc + [c % mod for c in rc], np.uint64)
            self._setup(_ROBE, size, dim, block, mod, coef)
        else:
            self._rows = block // dim
            self._setup(_ROBE_WIDE, size, dim, dim, mod, coef)

    def __repr__(self):
        return (f"{type(self).__name__}(size={self.size}, dim={self.dim}, block={self.block}, "
                f"seed={self.seed}, signed={self._signed}, wrap={self.wrap})")

    @property
    def signed(self):
        """Whether elements carry a hashed sign g(e, x, i) in {+1, -1}."""
        return self._signed

    @classmethod
    def reference(cls, size, dim, block=1, seed=1024, table_sizes=None):
        """The ROBE authors' exact index map, bit for bit.

        ``R = numpy.random.RandomState(seed).randint(0, P, 50)`` with
        ``P = 2038074743``; global token ``x = token + rows of earlier tables``
        (``table_sizes``; without it only table 0 exists);
        ``key(x, c) = (R[2] x + R[1] c + R[0]) mod P`` with ``c = i // Z``;
        ``slot = key mod (m - Z + 1) + i mod Z``: blocks never wrap, the table
        id is not hashed, tokens are non-negative.

        Parameters
        ----------
        size, dim : int
            Floats in the array (m) and embedding width D.
        block : int
            Z, a divisor or a multiple of ``dim``.
        seed : int
            The authors' seed, below 2**32 (NumPy's RandomState).
        table_sizes : list of int, optional
            Rows of each table (tokens are range-checked); without it, one
            table of any non-negative token.

        Returns
        -------
        RobeZ
            A scheme of the reference map (its config type ``"RobeZ.reference"``).

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> r = he.RobeZ.reference(1000, 8, block=4, table_sizes=[50, 60])
        >>> R = np.random.RandomState(1024).randint(0, 2038074743, 50)
        >>> x = 50 + 7                          # token 7 of table 1
        >>> want = [(int(R[2]) * x + int(R[1]) * (i // 4) + int(R[0])) % 2038074743
        ...         % (1000 - 4 + 1) + i % 4 for i in range(8)]
        >>> r.slots(np.array([7]), table=1)[0].tolist() == want
        True
        """
        return _RobeReference(size, dim, block, seed, table_sizes)


class _RobeReference(RobeZ):
    def __init__(self, size, dim, block, seed, table_sizes):
        size, dim = _size_dim(size, dim)
        block = _check_block(block, dim)
        if size < block:
            raise ValueError(f"size: expected size >= block = {block}, got {size}")
        # the authors' seed goes to NumPy's RandomState, which takes 32 bits
        self.block, self.seed, self.wrap = block, V.check_int(seed, "seed", lo=0, hi=1 << 32), False
        R = np.random.RandomState(self.seed).randint(0, ROBE_REF_P, size=50)
        _set_tables(self, table_sizes)
        self._config = dict(type="RobeZ.reference", size=size, dim=dim, block=block,
                            seed=self.seed, table_sizes=self.table_sizes)
        self._ref_p = ROBE_REF_P
        self._setup(_ROBE_REF, size, dim, min(block, dim), size - block + 1,
                    [int(R[0]), int(R[1]), int(R[2])] + [0] * 9)

    def __repr__(self):
        return (f"RobeZ.reference(size={self.size}, dim={self.dim}, block={self.block}, "
                f"seed={self.seed}, table_sizes={self.table_sizes})")


def _spread(u, first, parts):
    """u, uniform draws on [0, 1) for flat positions first.., to [-s, s] in
    place, s the scale of the part each position is in."""
    for a, b, scale in parts:
        lo, hi = max(a - first, 0), min(b - first, u.shape[0])
        if lo < hi:
            v = u[lo:hi]
            v *= 2 * scale
            v -= scale


def _set_tables(scheme, table_sizes):
    """Tables with sizes (range-checked), or one table of non-negative tokens."""
    if table_sizes is None:
        scheme.num_tables, scheme._nonneg = 1, True
        return
    if not isinstance(table_sizes, (list, tuple, np.ndarray)):
        table_sizes = [table_sizes]      # one size (a float fails its check by name)
    sizes = [V.check_positive_int(n, "num_embeddings", upper=1 << 62) for n in table_sizes]
    if not sizes:
        raise ValueError("num_embeddings: expected at least one table size, got []")
    scheme.table_sizes = sizes
    scheme.num_tables = len(sizes)
    scheme._table_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


class HashedNet(RobeZ):
    r"""HashedNet element-wise hashing: ROBE-Z with ``Z = 1``.

    .. math:: \mathrm{slot}(e,x,i) = h(e, x, i) \bmod m

    Parameters
    ----------
    size : int
        Floats in the shared array m.
    dim : int
        Embedding width D.
    seed : int
        Seed of the universal hash.
    signed : bool
        Multiply element i by the sign hash g(e, x, i).

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> hn = he.HashedNet(100, 8, seed=3)
    >>> hn.slots(np.array([1, 2])).shape
    (2, 8)
    """

    def __init__(self, size, dim, seed=0, signed=False):
        super().__init__(size, dim, block=1, seed=seed, signed=signed)
        self._config = dict(type="HashedNet", size=self.size, dim=self.dim, seed=self.seed,
                            signed=self._signed)

    def __repr__(self):
        return f"HashedNet(size={self.size}, dim={self.dim}, seed={self.seed}, signed={self._signed})"

    @classmethod
    def reference(cls, size, dim):
        """Seed 000's HashedEmbeddingBag hash, bit for bit (uint64 arithmetic):
        ``slot(r, d) = ((r*9824516537 + d*57857966300227 + 104729)
        mod 117130198221199) mod size``. No seed; the table id is not hashed
        (the original keeps one buffer per table); tokens are non-negative.

        Parameters
        ----------
        size : int
            Floats in the buffer W.
        dim : int
            Embedding width D.

        Returns
        -------
        HashedNet
            A scheme of the reference map (its config type
            ``"HashedNet.reference"``).

        Examples
        --------
        >>> import numpy as np, hashemb as he
        >>> h = he.HashedNet.reference(1000, 4)
        >>> want = [((5 * 9824516537 + d * 57857966300227 + 104729) % 117130198221199) % 1000
        ...         for d in range(4)]
        >>> h.slots(np.array([5]))[0].tolist() == want == h.slots(np.array([5]), table=3)[0].tolist()
        True
        """
        return _HashedNetReference(size, dim)


class _HashedNetReference(HashedNet):
    def __init__(self, size, dim):
        size, dim = _size_dim(size, dim)
        self.block, self.seed, self.wrap = 1, 0, True
        _set_tables(self, None)
        self._config = dict(type="HashedNet.reference", size=size, dim=dim)
        self.num_tables = None          # any table id: it is not hashed
        self._ref_p = HNET_REF[3]
        self._setup(_HNET_REF, size, dim, 1, size, [HNET_REF[0], HNET_REF[1], HNET_REF[2]]
                    + [0] * 9)

    def __repr__(self):
        return f"HashedNet.reference(size={self.size}, dim={self.dim})"


class FullTable(Scheme):
    r"""The uncompressed baseline through the same kernels.

    .. math:: \mathrm{slot}(e, x, i) = (\textstyle\sum_{e' < e} n_{e'} + x)\, D + i

    Parameters
    ----------
    num_embeddings : int or list of int
        Rows of one table, or of several tables laid out one after another.
    dim : int

    Examples
    --------
    >>> import numpy as np, hashemb as he
    >>> full = he.FullTable([3, 5], 4)
    >>> full.size, full.weight_shape
    (32, (8, 4))
    >>> int(full.slots(np.array([1]), table=1)[0, 0])   # row 3 + 1 of the array
    16
    """

    def __init__(self, num_embeddings, dim):
        dim = V.check_positive_int(dim, "dim", upper=1 << 20)
        _set_tables(self, num_embeddings)
        rows = sum(self.table_sizes)
        if rows * dim >= 1 << 61:
            raise ValueError(f"num_embeddings: expected rows * dim < 2**61, got {rows} * {dim}")
        self.num_embeddings = rows
        self._config = dict(type="FullTable", num_embeddings=list(self.table_sizes), dim=dim)
        self._setup(_FULL, rows * dim, dim, dim, rows * dim, [0] * 12)

    def __repr__(self):
        n = self.table_sizes[0] if len(self.table_sizes) == 1 else self.table_sizes
        return f"FullTable({n}, {self.dim})"

    @property
    def weight_shape(self):
        """Shape of the tables stacked: ``(sum of rows, dim)``."""
        return (self.num_embeddings, self.dim)

    def _default_scales(self):
        ends = np.cumsum(self.table_sizes) * self.dim
        return [(int(e - n * self.dim), int(e), 1.0 / math.sqrt(n))
                for n, e in zip(self.table_sizes, ends)]
