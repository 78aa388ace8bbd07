"""TT-Rec tensor-train embedding bags as torch modules (:mod:`hashemb.tt` kernels)."""
import numpy as np
import torch
from torch import nn

from .. import _validate as V
from .. import tt as _tt
from .._backend import array_module, host
from ._function import (_rebind, as_any_array, as_tensor, check_device, check_psw_shape,
                        compile_opaque, device_context, getstate_unbound, make_optimizer,
                        raise_stale, records_grad, refuse_computed, refuse_double_backward)


def _np_dtype(dtype):
    if dtype in (None, torch.float32):
        return np.float32
    if dtype == torch.float64:
        return np.float64
    raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")


class _TTBags(torch.autograd.Function):
    """out = tt_embedding_bags(indices, tables, offsets, psw); backward gives the
    cores' (and caches') dense gradients, or runs the fused optimizer and
    gives none."""

    @staticmethod
    def forward(ctx, module, indices, offsets, psw, *params):
        m = module
        out, saved = m._bags(indices, offsets, psw, return_saved=True, params=params)
        ctx.module, ctx.saved, ctx.steps = m, saved, m._steps
        # the cores themselves: backward differentiates the ones this forward
        # read (functional_call's replacements are gone by then), and torch
        # refuses a backward after an in-place change to them
        ctx.save_for_backward(indices, offsets, psw, *params)
        return as_tensor(out)

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("TT embedding bag")
        m = ctx.module
        indices, offsets, psw, *params = ctx.saved_tensors
        n_params = len(ctx.needs_input_grad) - 4
        with device_context(m.tt_cores[0]):
            cores, caches = m._tables_of(params)
            g = as_any_array(grad.contiguous(), "grad_output")
            idx, off = as_any_array(indices, "input"), as_any_array(offsets, "offsets")
            gp = None
            if psw is not None and ctx.needs_input_grad[3]:      # before a fused update
                gp = as_tensor(m._psw_grad(g, ctx.saved, off))
            if not any(ctx.needs_input_grad[4:]):   # frozen cores: no step, fused or not
                return (None, None, None, gp) + (None,) * n_params
            if m.sparse and m._steps != ctx.steps:
                # a core's gradient is the product of the other cores at forward
                raise_stale("cores' gradient")
            res = _tt.tt_embedding_bags_backward(
                g, idx, cores, off, mode=m.mode,
                per_sample_weights=as_any_array(psw, "per_sample_weights"),
                include_last_offset=True, num_embeddings=list(m.num_embeddings),
                cache=caches, saved=ctx.saved, optimizer=m._fused())
        if res is None:
            m._steps += 1
            return (None, None, None, gp) + (None,) * n_params
        # per table: its cores, then its cache's rows; the parameters are every
        # table's cores, then every cache
        d = m._ncores
        grads = [x for per_table in res for x in per_table[:d]] + \
            [x for per_table in res for x in per_table[d:]]
        return (None, None, None, gp) + tuple(as_tensor(x) for x in grads)


class TTEmbeddingBagCollection(nn.Module):
    r"""Several tensor-train (TT-Rec) tables in one call: input ``(B, T)`` (one
    token per table per sample) or flat indices with feature-major offsets of
    length ``T*B + 1``; output ``(B, T*embedding_dim)``.

    Each table :math:`t` is a train of cores :math:`G_k` of shape
    :math:`(p_k, R_k, q_k, R_{k+1})` whose row :math:`x` is
    :math:`\mathrm{vec}(G_0[x_0] \cdots G_{d-1}[x_{d-1}])` (see
    :mod:`hashemb.tt`).

    Parameters
    ----------
    num_embeddings : list of int
    embedding_dim : int
    tt_ranks : list of int or int
        The d - 1 inner ranks (the same for every table); an int ``r`` means
        ``[r] * (d - 1)``, d from the shapes given, else ``num_cores``, else 3.
    tt_p_shapes, tt_q_shapes : list of int, optional
        The factors of every table (default :func:`hashemb.tt_shapes` per table).
    sparse : bool
        True: the optimizer (``optimizer``, ``learning_rate``, ``eps``) runs
        fused inside backward and the cores get no ``.grad``. False: dense
        gradients for a torch optimizer.
    optimizer : {"sgd", "adagrad"} or hashemb.SGD / hashemb.Adagrad
    learning_rate, eps : float
    use_cache : bool
    cache_size : int or list of int
        LFU cache (:class:`hashemb.TTCache`) of the ``cache_size`` most used
        rows of each table, or a size a table (0: none cached there; rows
        beyond a table's size would only hold zeros, so ``min(cache_size,
        n)`` a table keeps the memory to what can be used). Frequencies are
        counted by every forward in
        training mode, :meth:`cache_populate` refreshes the cached rows. On
        CUDA the caches live on the cores' device (moved with the module at
        its first call after ``.cuda()`` / ``.cpu()``).
    hashtbl_size : int
        Slots of each table's frequency table (default ``max(4 cache_size,
        1024)``).
    weight_dist : str
        See :func:`hashemb.tt_init`.
    mode : {"sum", "mean"}
    num_cores : int
        Cores per table when the shapes are automatic (default 3).
    seed : int
    dtype : torch.float32 or torch.float64
    device : None, str or torch.device
        Where the cores (and caches) live (None: the CPU); drawn on the CPU,
        then moved, as ``.to(device)`` would.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import TTEmbeddingBagCollection
    >>> emb = TTEmbeddingBagCollection([1000, 5000], 16, [8, 8])
    >>> emb(torch.tensor([[1, 2], [3, 4999]])).shape
    torch.Size([2, 32])
    """

    __getstate__ = getstate_unbound

    def __init__(self, num_embeddings, embedding_dim, tt_ranks, tt_p_shapes=None,
                 tt_q_shapes=None, sparse=False, optimizer="sgd", learning_rate=0.1,
                 eps=1e-10, use_cache=False, cache_size=0, hashtbl_size=0,
                 weight_dist="approx-normal", mode="sum", num_cores=None, seed=0,
                 dtype=None, device=None):
        super().__init__()
        device = check_device(device)
        if isinstance(num_embeddings, (int, np.integer)):
            num_embeddings = [num_embeddings]
        self.num_embeddings = [V.check_positive_int(n, "num_embeddings", upper=1 << 61)
                               for n in num_embeddings]
        if not self.num_embeddings:
            raise ValueError("num_embeddings: expected at least one table size, got []")
        self.embedding_dim = V.check_positive_int(embedding_dim, "embedding_dim", upper=1 << 20)
        self.mode = _tt._check_mode(mode)
        self.sparse = V.check_flag(sparse, "sparse")
        self.learning_rate, self.eps = learning_rate, eps
        self._opt = make_optimizer(optimizer, learning_rate, eps)
        self.optimizer = optimizer if isinstance(optimizer, str) else type(optimizer).__name__.lower()
        ndt = _np_dtype(dtype)
        d = None
        if tt_p_shapes is not None:
            d = len(tt_p_shapes)
        elif tt_q_shapes is not None:
            d = len(tt_q_shapes)
        elif not isinstance(tt_ranks, (int, np.integer)):
            d = len(tt_ranks) + 1
        d = d or (num_cores if num_cores is not None else 3)
        if num_cores is not None and d != num_cores:
            raise ValueError(f"num_cores: expected {d} (from the shapes or ranks given), got {num_cores}")
        self.tt_ranks = _tt._check_ranks(tt_ranks, V.check_int(d, "num_cores", lo=2, hi=5))
        self.tt_p_shapes, self.tt_q_shapes = [], []
        self.tt_cores = nn.ParameterList()
        self._ncores = d
        for t, n in enumerate(self.num_embeddings):
            p_auto, q_auto = _tt.tt_shapes(n, self.embedding_dim, d)
            p = _tt._check_factors(tt_p_shapes, "tt_p_shapes", d) if tt_p_shapes is not None else p_auto
            q = _tt._check_factors(tt_q_shapes, "tt_q_shapes", d) if tt_q_shapes is not None else q_auto
            if int(np.prod(q)) != self.embedding_dim:
                raise ValueError(f"tt_q_shapes: expected factors with product embedding_dim = "
                                 f"{self.embedding_dim}, got {q}")
            self.tt_p_shapes.append(p)
            self.tt_q_shapes.append(q)
            for c in _tt.tt_init(n, p, q, self.tt_ranks, weight_dist, seed=seed + t, dtype=ndt):
                self.tt_cores.append(nn.Parameter(torch.from_numpy(c)))
        self.use_cache = V.check_flag(use_cache, "use_cache")
        if isinstance(cache_size, (list, tuple)):
            if len(cache_size) != len(self.num_embeddings):
                raise ValueError(f"cache_size: expected an int or {len(self.num_embeddings)} "
                                 f"sizes (one a table), got {len(cache_size)}")
            self.cache_size = [V.check_int(c, "cache_size", lo=0, hi=1 << 40)
                               for c in cache_size]
            sizes = self.cache_size
        else:
            self.cache_size = V.check_int(cache_size, "cache_size", lo=0, hi=1 << 40)
            sizes = [self.cache_size] * len(self.num_embeddings)
        self.hashtbl_size = V.check_int(hashtbl_size, "hashtbl_size", lo=0, hi=1 << 40)
        self._cache_objs = None
        self._steps = 0         # fused steps taken (see _TTBags.backward)
        self.cache_weights = nn.ParameterList()
        if self.use_cache:
            if max(sizes) <= 0:
                raise ValueError(f"cache_size: expected > 0 with use_cache=True, got {cache_size}")
            self._cache_objs = []
            for size in sizes:
                c = _tt.TTCache(size, self.embedding_dim, self.hashtbl_size or None, ndt)
                self._cache_objs.append(c)
                self.cache_weights.append(nn.Parameter(torch.from_numpy(c.weight)))
        if self.sparse and isinstance(self._opt, _tt_adagrad()):
            self._bind_states()
        if device is not None:
            self.to(device)         # the cores are small; caches follow at the first call

    # -- internals
    def _params(self):
        """The cores, then the caches' rows: what forward reads."""
        return list(self.tt_cores) + list(self.cache_weights)

    def _fused_parameters(self):
        """What the fused optimizer updates inside backward (sparse=True)."""
        return self._params() if self.sparse else []

    def _tables_of(self, params):
        """(each table's core arrays, the caches) of ``params``: the cores,
        then the caches' rows (the module's parameters, or what
        functional_call put in their place)."""
        d, T = self._ncores, len(self.num_embeddings)
        arrs = [as_any_array(p, "tt_cores") for p in params[:d * T]]
        cores = [arrs[t * d:(t + 1) * d] for t in range(T)]
        if self._cache_objs is None:
            return cores, None
        for t, (c, prm) in enumerate(zip(self._cache_objs, params[d * T:])):
            w = as_any_array(prm, "cache_weight")           # the parameter's memory
            if w.shape != c.weight.shape:
                # (a parameter swapped for one of another shape: the cached
                # rows were read past its end)
                raise ValueError(f"cache_weights[{t}]: expected shape {tuple(c.weight.shape)}, "
                                 f"got {tuple(w.shape)}")
            # a module moved by .cuda() / .cpu() takes its caches' frequency
            # tables and row indices along (once, at the first call after)
            c._move_like(w)
        return cores, self._cache_objs

    def _fused(self):
        if not self.sparse:
            return None
        if isinstance(self._opt, _tt_adagrad()):
            self._bind_states()
        return self._opt

    def _bind_states(self):
        """Adagrad accumulators as buffers (saved in the state_dict)."""
        prms = self._params()
        arrays = [as_any_array(p, "weight") for p in prms]
        for i, (prm, w) in enumerate(zip(prms, arrays)):
            name = f"optimizer_state_{i}"
            if not hasattr(self, name) or getattr(self, name).shape != prm.shape:
                self.register_buffer(name, torch.zeros_like(prm.detach()))
            self._opt.use_state(w, as_any_array(getattr(self, name), "state"))
        _rebind(self._opt, self, arrays)

    def _rows(self, t, part, g):
        """The rows of entries ``part.lo:part.hi`` of table ``t`` from the
        forward's saved distinct rows (CPU: ``src``, negative for a cached
        row; GPU: ``inv`` into ``Y``, cached rows included)."""
        D = self.embedding_dim
        if hasattr(part, "inv"):
            return part.Y.reshape(-1, D)[part.inv]
        src = part.src
        rows = np.empty((part.hi - part.lo, D), g.dtype)
        m = src >= 0
        rows[m] = part.ctx.Y[src[m]]
        if (~m).any():
            rows[~m] = self._cache_objs[t].weight[-src[~m] - 1]
        return rows

    def _psw_grad(self, g, saved, off):
        """d loss / d psw[j] = <row(x_j), grad[bag(j)]> (NumPy or CuPy)."""
        xp = array_module(g)
        out = xp.zeros(saved.nnz, g.dtype)
        B, D = saved.B, self.embedding_dim
        for t, part in enumerate(saved.parts):
            if part.hi == part.lo:
                continue
            bag = xp.searchsorted(off[t * B:(t + 1) * B + 1], xp.arange(part.lo, part.hi),
                                  side="right") - 1
            out[part.lo:part.hi] = (self._rows(t, part, g) * g[bag, t * D:(t + 1) * D]).sum(1)
        return out

    def _check_device(self, flat):
        """CUDA tensors run the CuPy path (the LFU caches too); the cores
        compute in float32 or float64 (``.half()`` / ``.bfloat16()`` of the
        module are refused here, by name)."""
        dtype = self.tt_cores[0].dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"tt_cores: expected float32 or float64 cores (TT tables compute "
                            f"in them), got {dtype}: convert the module with .float() or "
                            f".double()")
        dev = self.tt_cores[0].device
        if flat.device != dev:
            raise TypeError(f"input: expected a tensor on {dev} (the cores' device), "
                            f"got one on {flat.device}")

    # -- public
    @compile_opaque
    def forward(self, input, offsets=None, per_sample_weights=None):
        T = len(self.num_embeddings)
        idx = _index_tensor(input)
        check_psw_shape(per_sample_weights, idx)
        if idx.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets: expected None when input is 2-D, got a tensor")
            if idx.shape[1] != T:
                raise ValueError(f"input: expected shape (B, {T}) (one column per table), "
                                 f"got {tuple(idx.shape)}")
            B = idx.shape[0]
            flat = idx.t().contiguous().reshape(-1)
            off = torch.arange(T * B + 1, dtype=torch.int64, device=idx.device)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.t().contiguous().reshape(-1)
        else:
            if offsets is None:
                raise ValueError("offsets: expected a 1-D tensor when input is 1-D, got None")
            flat, off = idx, _index_tensor(offsets, "offsets").to(torch.int64)
        return self._apply_bags(flat, off, per_sample_weights)

    def _apply_bags(self, flat, off, psw):
        self._check_device(flat)
        if self.training and self.use_cache:
            with device_context(self.tt_cores[0]):      # (CUDA: torch's device and stream)
                caches = self._tables_of(self._params())[1]
                fl = as_any_array(flat, "input").astype(np.int64)
                T = len(self.num_embeddings)
                B = (off.shape[0] - 1) // T
                # the T+1 table boundaries (one read back on CUDA)
                bounds = off[::B].tolist() if B else [0] * (T + 1)
                for t, c in enumerate(caches):
                    seg = fl[bounds[t]:bounds[t + 1]]
                    c.count(seg[(seg >= 0) & (seg < self.num_embeddings[t])])
        if psw is not None:
            psw = psw.contiguous()
        params = self._params()
        if not records_grad(psw, *params):
            # inference: the lookup alone, keeping no chain for a backward
            return as_tensor(self._bags(flat, off, psw, return_saved=False))
        if self.sparse:
            refuse_computed(params, "tt_cores", "sparse=False")
        return _TTBags.apply(self, flat, off, psw, *params)

    def _bags(self, flat, off, psw, return_saved, params=None):
        """tt_embedding_bags of these tensors, on the cores' device and stream
        (``params``: the cores and caches' rows; default the module's)."""
        if params is None:
            params = self._params()
        with device_context(self.tt_cores[0]):
            cores, caches = self._tables_of(params)
            return _tt.tt_embedding_bags(
                as_any_array(flat, "input"), cores, as_any_array(off, "offsets"),
                mode=self.mode, per_sample_weights=as_any_array(psw, "per_sample_weights"),
                include_last_offset=True, num_embeddings=list(self.num_embeddings),
                cache=caches, return_saved=return_saved)

    def cache_populate(self):
        """Refresh every table's cache with its most frequent rows (see
        :class:`hashemb.TTCache`: a row leaving the cache loses what it
        learnt there; a row staying keeps its slot, values and fused Adagrad
        accumulators; a row coming in starts from its TT value and zero
        accumulators). Returns each table's changed slots (rows of
        ``cache_weights[t]``), where a torch optimizer's state (sparse=False)
        belongs to the rows that left: zero it there.

        Returns
        -------
        list of ndarray of int64
            One per table: its changed slots (empty arrays without
            ``use_cache``), NumPy arrays on CUDA too (indices for a torch
            optimizer's state on either side).

        Examples
        --------
        >>> import torch
        >>> from hashemb.torch import TTEmbeddingBagCollection
        >>> emb = TTEmbeddingBagCollection([1000], 16, 8, use_cache=True, cache_size=2)
        >>> _ = emb(torch.tensor([[7], [7], [3]]))           # training mode counts rows
        >>> [s.tolist() for s in emb.cache_populate()]
        [[0, 1]]
        >>> emb._cache_objs[0].rows.tolist()
        [3, 7]
        """
        if not self.use_cache:
            return [np.zeros(0, np.int64) for _ in self.num_embeddings]
        with device_context(self.tt_cores[0]):
            cores, caches = self._tables_of(self._params())
            # the fused optimizer, its Adagrad buffers bound: populate zeroes their
            # changed slots in place, as it does for the NumPy API
            opt = self._fused()
            changed = [c.populate(cores[t], self.num_embeddings[t], optimizer=opt)
                       for t, c in enumerate(caches)]
        return [host(s) for s in changed]

    def get_extra_state(self):
        # the LFU caches' row sets and frequency tables: the cached rows'
        # values are parameters, but which rows they hold is not (a module
        # loaded without it read its trained cached rows from the cores)
        if self._cache_objs is None:
            return {}
        # (host copies, on CUDA too: the state loads on either side)
        return {"caches": [{k: torch.from_numpy(host(getattr(c, k), copy=True))
                            for k in ("rows", "keys", "freq")}
                           for c in self._cache_objs]}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a state saved before the caches travelled has no extra state: the
        # caches then start empty, as they did (strict loads of it failed)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")

    def set_extra_state(self, state):
        caches = (state or {}).get("caches")
        if caches is None or self._cache_objs is None:
            return      # (a module without caches takes the cores alone)
        if len(caches) != len(self._cache_objs):
            raise ValueError(f"state_dict: expected {len(self._cache_objs)} LFU caches (one a "
                             f"table), got {len(caches)}")
        for c, st in zip(self._cache_objs, caches):
            rows, keys, freq = (st[k].detach().cpu().numpy() for k in ("rows", "keys", "freq"))
            if keys.shape != c.keys.shape or freq.shape != c.freq.shape:
                raise ValueError(f"state_dict: expected LFU frequency tables of "
                                 f"{c.keys.shape[0]} slots (hashtbl_size), got {keys.shape[0]}")
            if rows.shape[0] > c.capacity:
                raise ValueError(f"state_dict: expected at most cache_size = {c.capacity} "
                                 f"cached rows, got {rows.shape[0]}")
            # on the cache's side (a device cache uploads them, on torch's stream)
            with device_context(self.tt_cores[0]), c._here():
                xp = c._xp()
                c.rows = xp.asarray(rows.astype(np.int64, copy=True))
                c.keys[:], c.freq[:] = xp.asarray(keys), xp.asarray(freq)
            c._used = None      # counted again from the keys at the next count

    def full_weights(self):
        """The reconstructed tables, one ``(num_embeddings[t], D)`` tensor each.

        Returns
        -------
        list of torch.Tensor
            New tensors (no autograd history), on the cores' device and in
            their dtype: :func:`hashemb.tt_to_full` of each table's cores.
            Cached rows are not substituted.
        """
        with device_context(self.tt_cores[0]):
            return [as_tensor(_tt.tt_to_full(c, n))
                    for c, n in zip(self._tables_of(list(self.tt_cores))[0],
                                    self.num_embeddings)]

    def memory_bytes(self):
        """Bytes of the cores (and the LFU caches' rows).

        Returns
        -------
        int
            The parameters' bytes: the cores and ``cache_weights``. A fused
            Adagrad's ``optimizer_state_*`` buffers are not counted.
        """
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"tt_ranks={self.tt_ranks}, tt_p_shapes={self.tt_p_shapes}, "
                f"tt_q_shapes={self.tt_q_shapes}, sparse={self.sparse}, mode={self.mode!r}")


def _tt_adagrad():
    from ..optim import Adagrad
    return Adagrad


def _index_tensor(x, name="input"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got {x.dtype}")
    return x.contiguous()


class TTEmbeddingBag(TTEmbeddingBagCollection):
    r"""One TT-Rec table as an embedding bag, FBTT's ``TTEmbeddingBag`` arguments
    plus ``nn.EmbeddingBag``'s calling conventions.

    ``forward(input, offsets=None, per_sample_weights=None)``: 1-D input with
    offsets of length ``B + 1`` (``include_last_offset=True``, the default,
    FBTT's convention) or ``B`` (``include_last_offset=False``, as
    ``nn.EmbeddingBag``), or 2-D ``(B, N)`` input; mode "sum" (with optional
    per-sample weights) or "mean"; empty bags give zeros. Row :math:`x` of the
    table is :math:`\mathrm{vec}(G_0[x_0] \cdots G_{d-1}[x_{d-1}])`.

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    tt_ranks : list of int or int
        The d - 1 inner ranks (2 to 4 cores, so 1 to 3 ranks). A plain int
        ``r`` is the same rank between every pair of cores: ``[r] * (d - 1)``,
        with d the length of ``tt_p_shapes`` or ``tt_q_shapes`` when given,
        else 3 (``TTEmbeddingBag(1000, 16, 8).tt_ranks == [8, 8]``).
    tt_p_shapes, tt_q_shapes : list of int, optional
        Default :func:`hashemb.tt_shapes`.
    sparse, optimizer, learning_rate, eps, use_cache, cache_size, hashtbl_size, weight_dist
        As FBTT (see :class:`TTEmbeddingBagCollection`); ``sparse=False`` is
        the default here (dense core gradients for a torch optimizer).
    mode : {"sum", "mean"}
    include_last_offset : bool
    seed : int
    dtype : torch.float32 or torch.float64
    device : None, str or torch.device
        As :class:`TTEmbeddingBagCollection`'s.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import TTEmbeddingBag
    >>> emb = TTEmbeddingBag(1_000_000, 64, [16, 16])
    >>> emb.tt_p_shapes, emb.tt_q_shapes
    ([100, 100, 100], [4, 4, 4])
    >>> out = emb(torch.tensor([1, 2, 999_999]), torch.tensor([0, 2, 3]))
    >>> out.shape
    torch.Size([2, 64])
    >>> W = emb.full_weight()
    >>> bool(torch.allclose(out[0], W[1] + W[2], atol=1e-6))
    True
    """

    def __init__(self, num_embeddings, embedding_dim, tt_ranks, tt_p_shapes=None,
                 tt_q_shapes=None, sparse=False, optimizer="sgd", learning_rate=0.1,
                 eps=1e-10, use_cache=False, cache_size=0, hashtbl_size=0,
                 weight_dist="approx-normal", mode="sum", include_last_offset=True, seed=0,
                 dtype=None, device=None):
        super().__init__([num_embeddings], embedding_dim, tt_ranks, tt_p_shapes, tt_q_shapes,
                         sparse, optimizer, learning_rate, eps, use_cache, cache_size,
                         hashtbl_size, weight_dist, mode, None, seed, dtype, device)
        self.include_last_offset = V.check_flag(include_last_offset, "include_last_offset")
        self.tt_p_shapes, self.tt_q_shapes = self.tt_p_shapes[0], self.tt_q_shapes[0]

    @property
    def cache_weight(self):
        """The LFU cache's rows (``cache_size x embedding_dim``), or None."""
        return self.cache_weights[0] if self.use_cache else None

    @compile_opaque
    def forward(self, input, offsets=None, per_sample_weights=None):
        idx = _index_tensor(input)
        check_psw_shape(per_sample_weights, idx)
        if idx.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets: expected None when input is 2-D (B, N), got a tensor")
            B, N = idx.shape
            flat = idx.reshape(-1)
            off = torch.arange(0, B * N + 1, max(N, 1), dtype=torch.int64, device=idx.device) \
                if N else torch.zeros(B + 1, dtype=torch.int64, device=idx.device)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        elif idx.dim() == 1:
            if offsets is None:
                raise ValueError("offsets: expected a 1-D tensor when input is 1-D, got None")
            off = _index_tensor(offsets, "offsets").to(torch.int64)
            if off.dim() != 1:
                raise ValueError(f"offsets: expected a 1-D tensor, got shape {tuple(off.shape)}")
            if not self.include_last_offset:
                off = torch.cat([off, torch.tensor([idx.shape[0]], dtype=torch.int64,
                                                   device=off.device)])
            elif off.shape[0] < 1:
                raise ValueError("offsets: expected B + 1 offsets (include_last_offset=True), "
                                 "got none")
            flat = idx
        else:
            raise ValueError(f"input: expected a 1-D or 2-D tensor, got shape {tuple(idx.shape)}")
        return self._apply_bags(flat, off, per_sample_weights)

    def full_weight(self):
        """The reconstructed table, ``(num_embeddings, embedding_dim)`` (as FBTT's).

        Returns
        -------
        torch.Tensor
            ``full_weights()[0]``: a new tensor without autograd history.
        """
        return self.full_weights()[0]

    def extra_repr(self):
        return super().extra_repr() + f", include_last_offset={self.include_last_offset}"


def tt_ranks_for_compression(num_embeddings, embedding_dim, compression, num_cores=3):
    """The largest common rank r (ranks [r] * (d-1)) whose TT tables, with
    automatic shapes, hold at most ``sum(n) * D / compression`` floats (at
    least 1).

    Examples
    --------
    >>> from hashemb.torch.tt import tt_ranks_for_compression
    >>> tt_ranks_for_compression([10**6], 16, 100)
    [26, 26]
    """
    sizes = [num_embeddings] if isinstance(num_embeddings, (int, np.integer)) else list(num_embeddings)
    sizes = [V.check_positive_int(n, "num_embeddings", upper=1 << 61) for n in sizes]
    if not sizes:
        raise ValueError("num_embeddings: expected at least one table size, got []")
    embedding_dim = V.check_positive_int(embedding_dim, "embedding_dim", upper=1 << 20)
    num_cores = V.check_int(num_cores, "num_cores", lo=2, hi=5)
    budget = sum(sizes) * embedding_dim / V.check_float(compression, "compression",
                                                        positive=True)
    shapes = [_tt.tt_shapes(n, embedding_dim, num_cores) for n in sizes]

    def params(r):
        tot = 0
        for p, q in shapes:
            R = [1] + [r] * (num_cores - 1) + [1]
            tot += sum(p[k] * R[k] * q[k] * R[k + 1] for k in range(num_cores))
        return tot

    r = 1
    while params(r + 1) <= budget and r < 1 << 12:
        r += 1
    return [r] * (num_cores - 1)


__all__ = ["TTEmbeddingBag", "TTEmbeddingBagCollection", "tt_ranks_for_compression"]
