"""nn.Module adapters: nn.EmbeddingBag-like modules whose array is one hashemb
scheme's array. No math here: every lookup is a hashemb kernel call."""
import contextlib
import math

import numpy as np
import torch
from torch import nn

from .. import _validate as V
from ..hashing import UniversalHash
from ..lsh import LMA, LSHTable
from ..schemes import FullTable, HashedNet, RobeZ, Scheme
from ..optim import check_optimizer
from ._function import (BagFunction, Lookup, _rebind, as_any_array, as_tensor, bfloat16,
                        check_device, check_psw_shape, compile_opaque, device_context, getstate_unbound,
                        make_optimizer, optimizer_name, plain_lookup, records_grad,
                        refuse_computed)


def _cupy():
    import cupy
    return cupy


def _as_index(t, name):
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(np.asarray(t))
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got {t.dtype}")
    return t          # CPU or CUDA: a device mismatch with the weight is a TypeError later


def _check_2d_offsets(offsets):
    if offsets is not None:
        raise ValueError("offsets: expected None with 2-D input (each row is a bag), "
                         "got a tensor")


def _scheme_of(state):
    """The scheme a module's extra state holds."""
    return Scheme.from_config({k: v.numpy() if isinstance(v, torch.Tensor) else v
                               for k, v in state["scheme"].items()})


def _init_weight(scheme, seed, np_dtype, scale, device):
    """scheme.init_weight as a tensor on ``device``: drawn there for CUDA
    (bfloat16 through its float32 draw, which torch rounds to nearest as
    the CPU does: CuPy before 14 has no bfloat16), else on the CPU."""
    if device is None or device.type != "cuda":
        w = as_tensor(scheme.init_weight(seed=seed, dtype=np_dtype, scale=scale))
        return w if device is None else w.to(device)
    probe = torch.empty(1, device=device)
    bf = V.format16(np.dtype(np_dtype)) == 1
    with device_context(probe):
        w = as_tensor(scheme.init_weight(seed=seed, dtype=np.float32 if bf else np_dtype,
                                         scale=scale, like=as_any_array(probe, "device")))
    return w.to(torch.bfloat16) if bf else w


class HashEmbeddingBag(nn.Module):
    r"""One embedding-bag table stored through any hashemb scheme.

    Forward is ``torch.nn.EmbeddingBag``'s: ``input`` 1-D with ``offsets`` (B
    starts, or B+1 with ``include_last_offset``) or 2-D ``(B, N)``;
    ``per_sample_weights`` with ``mode="sum"``. The array ``weight`` has
    ``scheme.weight_shape``.

    Parameters
    ----------
    scheme : hashemb.Scheme
    table : int
        Table id (hashed into the slot; a FullTable's table number).
    mode : {"sum", "mean", "max"}
    padding_idx : int, optional
    include_last_offset : bool
    optimizer : None, "sgd", "adagrad", "rowwise_adagrad" or a hashemb optimizer
        Fused optimizer: backward updates ``weight`` in place (``weight.grad``
        stays None, so leave ``weight`` out of the torch optimizer; see
        :func:`dense_parameters`). ``"adagrad"`` keeps its accumulator in the
        ``optimizer_state`` buffer (saved in the state_dict);
        ``"rowwise_adagrad"`` (:class:`hashemb.RowwiseAdagrad`, full tables)
        keeps one value per row there.
    lr, eps : float
        Of the fused optimizer.
    _weight : Tensor, optional
        Initial array (copied); default ``scheme.init_weight(init_seed)``.
    init_seed : int
    dtype : None, torch.float32, torch.float64, torch.float16 or torch.bfloat16
        Of the array (None: ``_weight``'s, else float32; given with
        ``_weight``, its values are converted). float16 and bfloat16 are storage: lookups pool in
        float32 and return float32; a fused optimizer rounds each updated
        slot to the array's format (stochastically by default, see
        :class:`hashemb.SGD`); without one, autograd hands the float32
        gradient to ``weight.grad`` in the array's dtype. bfloat16 needs
        the ``ml_dtypes`` package (and, on CUDA, CuPy 14 or newer).
    device : None, str or torch.device
        Where the array and its optimizer state are made (None: the CPU), as
        ``nn.EmbeddingBag``'s. A CUDA device draws the array there
        (:meth:`hashemb.Scheme.init_weight` with ``like=``, on torch's
        current stream): the CPU module's values, with no host copy.

    Notes
    -----
    ``state_dict`` holds the array and, as extra state, the scheme's
    :meth:`~hashemb.Scheme.config` (hash seed and all), so a module loaded from
    it gives bit-identical outputs whatever seed it was built with (its
    ``table``, ``mode`` and ``padding_idx`` come from the state too). The
    fused optimizer stays the one the module was built with (loading a
    checkpoint trained without one does not switch this module's off); its
    ``optimizer_state`` buffer and its place in the stochastic-rounding
    stream are restored when it is of the saved kind.
    Results are deterministic on the CPU (see :func:`hashemb.embedding_bag`).

    Examples
    --------
    >>> import torch, hashemb as he
    >>> from hashemb.torch import HashEmbeddingBag
    >>> emb = HashEmbeddingBag(he.RobeZ(1000, 16, block=16))
    >>> emb(torch.tensor([1, 2, 3]), torch.tensor([0, 2])).shape
    torch.Size([2, 16])
    """

    num_tables = 1

    __getstate__ = getstate_unbound

    def __init__(self, scheme, table=0, mode="sum", padding_idx=None,
                 include_last_offset=False, optimizer=None, lr=0.01, eps=1e-10,
                 _weight=None, init_seed=0, dtype=None, device=None):
        super().__init__()
        scheme = V.check_scheme(scheme)
        V.check_mode(mode)
        self.table = V.check_table(table, scheme)
        self.mode, self.padding_idx = mode, padding_idx
        self.include_last_offset = V.check_flag(include_last_offset, "include_last_offset")
        self._build(scheme, make_optimizer(optimizer, lr, eps))
        check_optimizer(self._lookup.optimizer, scheme, mode)
        kind = optimizer_name(self._lookup.optimizer)
        np_dtype = {torch.float32: np.float32, torch.float64: np.float64,
                    torch.float16: np.float16, None: np.float32}.get(dtype)
        if dtype == torch.bfloat16:
            np_dtype = bfloat16()
        if np_dtype is None:
            raise TypeError(f"dtype: expected torch.float32, torch.float64, "
                            f"torch.float16 or torch.bfloat16, got {dtype}")
        device = check_device(device)
        if _weight is None:
            w = _init_weight(scheme, init_seed, np_dtype, self._init_scale(), device)
        else:
            # copied, in dtype when one is given (it was ignored: a float16
            # module given float32 values stored them in float32)
            w = torch.as_tensor(_weight).detach().clone()
            if dtype is not None:
                w = w.to(dtype)
            if tuple(w.shape) not in (tuple(scheme.weight_shape), (scheme.size,)):
                raise ValueError(f"_weight: expected shape {scheme.weight_shape}, "
                                 f"got {tuple(w.shape)}")
            if device is not None:
                w = w.to(device)
        self.weight = nn.Parameter(w.contiguous())
        if kind in ("adagrad", "rowwise_adagrad"):
            # 16-bit arrays keep a float32 accumulator (the kernels' dtype);
            # row-wise: one value per row
            n = self.weight.numel()
            self.register_buffer("optimizer_state", torch.zeros(
                n if kind == "adagrad" else n // scheme.dim,
                dtype=_state_dtype(self.weight.dtype), device=self.weight.device))

    def _apply(self, fn, *args, **kwargs):
        # .half(), .bfloat16(), .double(), .to(dtype): the accumulator follows
        # the array into the dtype the kernels compute in (float32 for 16-bit
        # storage), converted from its value before the call, so no
        # precision is lost on the way (a float16 accumulator was refused)
        state = self._buffers.get("optimizer_state")
        super()._apply(fn, *args, **kwargs)
        moved = self._buffers.get("optimizer_state")
        if state is not None and moved is not None:
            want = _state_dtype(self.weight.dtype)
            if moved.dtype != want:
                self._buffers["optimizer_state"] = state.to(device=moved.device, dtype=want)
        return self

    def _fused_parameters(self):
        """What the fused optimizer updates inside backward."""
        return [self.weight] if self._lookup.optimizer is not None else []

    def _build(self, scheme, optimizer):
        self.scheme = scheme
        self._lookup = Lookup(scheme, self.num_tables, self.table, self.mode,
                              self.padding_idx, optimizer)

    def _init_scale(self):
        """init_weight's scale (None: the scheme's default)."""
        return None

    def _bind_state(self):
        opt = self._lookup.optimizer
        if opt is None:
            return
        w = as_any_array(self.weight, "weight")
        if hasattr(self, "optimizer_state"):
            opt.use_state(w, as_any_array(self.optimizer_state, "optimizer_state"))
        _rebind(opt, self, [w])

    def _normalise(self, input, offsets, per_sample_weights):
        input = _as_index(input, "input")
        if input.dim() == 2:
            # read in place by the kernels (offsets None): no copy, and one-entry
            # bags take the one-entry paths (CPU pipeline, GPU warp kernels)
            _check_2d_offsets(offsets)
            return input, None, per_sample_weights
        if input.dim() != 1:
            raise ValueError(f"input: expected a 1-D or 2-D tensor, got {input.dim()}-D")
        if offsets is None:
            raise ValueError("offsets: expected a 1-D tensor with 1-D input, got None")
        offsets = _as_index(offsets, "offsets")
        if offsets.dim() != 1:
            raise ValueError(f"offsets: expected a 1-D tensor, got {offsets.dim()}-D")
        if not self.include_last_offset:
            if offsets.shape[0] == 0 and input.shape[0]:
                # (appended, the input's length read as a first start: "expected 0, got N")
                raise ValueError(f"offsets: expected at least 1 value (the bags' starts) for "
                                 f"{input.shape[0]} indices, got 0")
            offsets = torch.cat([offsets.to(torch.int64),
                                 torch.tensor([input.shape[0]], dtype=torch.int64,
                                              device=offsets.device)])
        elif offsets.shape[0] == 0:
            raise ValueError("offsets: expected at least 1 value with include_last_offset, got 0")
        return input, offsets, per_sample_weights

    @compile_opaque
    def forward(self, input, offsets=None, per_sample_weights=None):
        """Pooled embeddings, shape ``(B, dim)`` (like ``nn.EmbeddingBag``)."""
        check_psw_shape(per_sample_weights, input)
        flat, off, psw = self._normalise(input, offsets, per_sample_weights)
        w = self.weight
        if not records_grad(psw, w):
            # inference: the lookup alone, without the autograd.Function
            # (a batch of one at 26 tables: 49 -> 34 us a call)
            return as_tensor(plain_lookup(w, flat, off, psw, self._lookup))
        if self._lookup.optimizer is not None:
            refuse_computed([w], "weight", "optimizer=None")
        self._bind_state()
        return BagFunction.apply(w, flat, off, psw, self._lookup, w.requires_grad)

    def get_extra_state(self):
        # a scheme's arrays (SCMA / LMA) travel as tensors: torch.load(weights_only=True)
        # accepts them, and a uint32 array goes as its int32 bit pattern
        # (copies: the scheme's arrays are read-only, and a state_dict is the caller's)
        cfg = {k: torch.from_numpy((v.view(np.int32) if v.dtype == np.uint32 else v).copy())
               if isinstance(v, np.ndarray) else v for k, v in self.scheme.config().items()}
        opt = self._lookup.optimizer
        return {"scheme": cfg, "table": self.table, "mode": self.mode,
                "padding_idx": self.padding_idx, "optimizer": _opt_args(opt),
                "rounding_calls": 0 if opt is None else opt._calls}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # an accumulator belongs to the optimizer, which is this module's own
        # (see set_extra_state): a state saved without one starts this
        # module's at zero, and one saved with one is dropped by a module
        # without it, strict or not
        problem = self._state_problem(state_dict, prefix)
        if problem:
            # before anything is loaded: set_extra_state runs even after a
            # size mismatch, which left a scheme that no longer fit the array
            error_msgs.append(f"{type(self).__name__}: {problem} (nothing was loaded)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        key = prefix + "optimizer_state"
        if key in missing_keys:
            missing_keys.remove(key)
            self.optimizer_state.zero_()
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def _state_problem(self, state_dict, prefix):
        """Why the state cannot load into this module, or None: it may bring
        another seed, block, table, mode or padding (the checkpoint's model),
        not another kind of scheme, width, table count or array shape."""
        state = state_dict.get(prefix + "_extra_state")
        if not isinstance(state, dict) or "scheme" not in state:
            return None
        try:
            scheme = _scheme_of(state)
            check_optimizer(self._lookup.optimizer, scheme, state["mode"])
        except (TypeError, ValueError, KeyError) as e:
            return f"the state's scheme does not fit this module ({e})"
        kind, ours = scheme.config()["type"], self.scheme.config()["type"]
        if kind != ours:
            return f"scheme: expected a {ours} (this module's), got a {kind}"
        if scheme.dim != self.scheme.dim:
            return f"embedding dim: expected {self.scheme.dim}, got {scheme.dim}"
        T = state.get("num_tables", self.num_tables)
        if T != self.num_tables:
            return f"num_tables: expected {self.num_tables}, got {T}"
        w = state_dict.get(prefix + "weight")
        if w is not None and tuple(w.shape) != tuple(self.weight.shape):
            return f"weight: expected shape {tuple(self.weight.shape)}, got {tuple(w.shape)}"
        return None

    def set_extra_state(self, state):
        # the model (scheme, table, mode, padding) comes from the state; the
        # fused optimizer is the module's own, as built (training set-up, as a
        # torch optimizer is not in a module's state_dict): fine-tuning a
        # checkpoint trained without one keeps this module's. Its position in
        # the stochastic-rounding stream comes back when the kinds agree, so a
        # resumed 16-bit run takes the bits an unbroken one would.
        self.table, self.mode = state["table"], state["mode"]
        self.padding_idx = state["padding_idx"]
        opt = self._lookup.optimizer
        self._build(_scheme_of(state), opt)
        check_optimizer(opt, self.scheme, self.mode)
        if opt is not None and tuple(state["optimizer"])[0] == optimizer_name(opt):
            opt._calls = int(state.get("rounding_calls", 0))

    def memory_bytes(self):
        """Bytes of the array (plus an Adagrad accumulator and, for SCMA / LMA,
        the sampled tokens' map and slots or signatures).

        Returns
        -------
        int
            ``weight``'s bytes in its dtype, plus the ``optimizer_state``
            buffer's (fused Adagrad / row-wise Adagrad) and the scheme's
            ``extra_bytes()`` where it has them.
        """
        n = self.weight.numel() * self.weight.element_size()
        extra = self.scheme.extra_bytes() if hasattr(self.scheme, "extra_bytes") else 0
        if hasattr(self, "optimizer_state"):
            extra += self.optimizer_state.numel() * self.optimizer_state.element_size()
        return n + extra

    def extra_repr(self):
        return (f"{self.scheme!r}, mode={self.mode!r}, "
                f"optimizer={optimizer_name(self._lookup.optimizer)!r}")


class HashEmbeddingBagCollection(HashEmbeddingBag):
    r"""T tables sharing one array through one scheme, looked up in ONE kernel call.

    Input as TorchRec/FBGEMM: a 2-D ``(B, T)`` tensor (one index per table per
    sample), or flat ``input`` with ``offsets`` of length ``T*B+1``,
    feature-major (bag b of table t is ``input[offsets[t*B+b]:offsets[t*B+b+1]]``).
    Output ``(B, T*dim)``: table t fills columns ``t*dim:(t+1)*dim``.

    Parameters
    ----------
    scheme : hashemb.Scheme
    num_tables : int
    mode, optimizer, lr, eps, _weight, init_seed, dtype
        As in :class:`HashEmbeddingBag`.

    Examples
    --------
    >>> import torch, hashemb as he
    >>> from hashemb.torch import HashEmbeddingBagCollection
    >>> emb = HashEmbeddingBagCollection(he.RobeZ(10_000, 16), num_tables=3)
    >>> emb(torch.randint(0, 100, (8, 3))).shape
    torch.Size([8, 48])
    """

    def __init__(self, scheme, num_tables, mode="sum", optimizer=None, lr=0.01, eps=1e-10,
                 _weight=None, init_seed=0, dtype=None, device=None):
        self.num_tables = V.check_positive_int(num_tables, "num_tables", upper=1 << 31)
        s = V.check_scheme(scheme)
        if s.num_tables is not None and self.num_tables > s.num_tables:
            raise ValueError(f"num_tables: expected <= {s.num_tables} (the scheme's tables), "
                             f"got {num_tables}")
        super().__init__(scheme, 0, mode, None, True, optimizer, lr, eps, _weight,
                         init_seed, dtype, device)

    def _normalise(self, input, offsets, per_sample_weights):
        input = _as_index(input, "input")
        T = self.num_tables
        if input.dim() == 2:
            _check_2d_offsets(offsets)
            if input.shape[1] != T:
                raise ValueError(f"input: expected shape (B, {T}) (one index per table), "
                                 f"got {tuple(input.shape)}")
            return input, None, per_sample_weights      # in place, as above
        if input.dim() != 1:
            raise ValueError(f"input: expected a 1-D or 2-D tensor, got {input.dim()}-D")
        if offsets is None:
            raise ValueError(f"offsets: expected {T}*B+1 values with 1-D input, got None")
        offsets = _as_index(offsets, "offsets")
        if offsets.dim() != 1 or (offsets.shape[0] - 1) % T:
            raise ValueError(f"offsets: expected a 1-D tensor of {T}*B+1 values, "
                             f"got shape {tuple(offsets.shape)}")
        return input, offsets, per_sample_weights

    def get_extra_state(self):
        return dict(super().get_extra_state(), num_tables=self.num_tables)

    def set_extra_state(self, state):
        self.num_tables = state["num_tables"]
        super().set_extra_state(state)


def _robe_size(total_floats, compression, block, name="compression"):
    c = V.check_float(compression, name, positive=True)
    return max(block, math.ceil(total_floats / c))


def _robe_weight_size(weight, total_floats, compression, block):
    """The ROBE-Z array's size: the given initial array's, else by compression."""
    block = V.check_positive_int(block, "block")
    if weight is None:
        return _robe_size(total_floats, compression, block)
    n = torch.as_tensor(weight).numel()
    if n < block:
        raise ValueError(f"_weight: expected at least block = {block} floats, got {n}")
    return n


class RobeEmbeddingBag(HashEmbeddingBag):
    r"""ROBE-Z embedding bag: a ``num_embeddings x embedding_dim`` table kept in
    ``max(block, ceil(num_embeddings * embedding_dim / compression))`` floats
    (:class:`hashemb.RobeZ`; an array holds at least one block).

    Parameters
    ----------
    num_embeddings, embedding_dim : int
        The n x D table compressed.
    compression : float
        n D / (array size), before the ceiling and the one-block floor.
    block : int, optional
        Z, a divisor or a multiple of ``embedding_dim`` (default
        ``embedding_dim``: ROBE-D).
    mode : {"sum", "mean", "max"}
    seed : int
        Seed of the scheme's hash.
    signed : bool
        Signed ROBE-Z (:class:`hashemb.RobeZ` ``signed=True``).
    _weight : Tensor, optional
        Initial array (copied); its length, at least ``block``, is the
        array size (``compression`` is then not used).
    **kwargs
        ``table``, ``padding_idx``, ``include_last_offset``, ``optimizer``,
        ``lr``, ``eps``, ``init_seed``, ``dtype``: as in :class:`HashEmbeddingBag`.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import RobeEmbeddingBag
    >>> emb = RobeEmbeddingBag(1_000_000, 16, compression=1000, block=16)
    >>> emb.weight.numel(), emb(torch.tensor([[1, 2], [3, 4]])).shape
    (16000, torch.Size([2, 16]))
    """

    def __init__(self, num_embeddings, embedding_dim, compression=1000.0, block=None,
                 mode="sum", seed=0, signed=False, _weight=None, **kwargs):
        n = V.check_positive_int(num_embeddings, "num_embeddings", upper=1 << 62)
        D = V.check_positive_int(embedding_dim, "embedding_dim", upper=1 << 20)
        block = D if block is None else block
        size = _robe_weight_size(_weight, n * D, compression, block)
        self.num_embeddings, self.embedding_dim = n, D
        super().__init__(RobeZ(size, D, block=block, seed=seed, signed=signed),
                         mode=mode, _weight=_weight, **kwargs)


class RobeEmbeddingBagCollection(HashEmbeddingBagCollection):
    r"""Many tables in ONE ROBE-Z array (the ROBE / UMA setting): the array has
    ``max(block, ceil(sum(num_embeddings) * embedding_dim / compression))``
    floats, every
    table's id is hashed into its slots, and a batch of all tables is one kernel
    call.

    Parameters
    ----------
    num_embeddings : int or list of int
        Rows of each table.
    embedding_dim : int
    compression : float
        ``sum(num_embeddings) * embedding_dim`` / (array size).
    block, mode, seed, signed, _weight
        As in :class:`RobeEmbeddingBag`.
    **kwargs
        ``optimizer``, ``lr``, ``eps``, ``init_seed``, ``dtype``: as in
        :class:`HashEmbeddingBag`.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import RobeEmbeddingBagCollection
    >>> emb = RobeEmbeddingBagCollection([1000, 50_000, 7], 16, compression=100)
    >>> emb.weight.numel(), emb(torch.tensor([[1, 2, 3], [4, 5, 6]])).shape
    (8162, torch.Size([2, 48]))
    """

    def __init__(self, num_embeddings, embedding_dim, compression=1000.0, block=None,
                 mode="sum", seed=0, signed=False, _weight=None, **kwargs):
        sizes = _sizes(num_embeddings)
        D = V.check_positive_int(embedding_dim, "embedding_dim", upper=1 << 20)
        block = D if block is None else block
        size = _robe_weight_size(_weight, sum(sizes) * D, compression, block)
        self.num_embeddings, self.embedding_dim = sizes, D
        super().__init__(RobeZ(size, D, block=block, seed=seed, signed=signed),
                         len(sizes), mode=mode, _weight=_weight, **kwargs)


class HashedNetEmbeddingBagCollection(HashEmbeddingBagCollection):
    r"""Many tables in one HashedNet array (element-wise hashing, ROBE-Z with
    Z = 1) of ``ceil(sum(num_embeddings) * embedding_dim / compression)`` floats.

    Parameters
    ----------
    num_embeddings : int or list of int
        Rows of each table.
    embedding_dim : int
    compression : float
    mode : {"sum", "mean", "max"}
    seed : int
        Seed of the hash.
    signed : bool
    **kwargs
        ``optimizer``, ``lr``, ``eps``, ``_weight`` (of the computed size),
        ``init_seed``, ``dtype``: as in :class:`HashEmbeddingBag`.

    Examples
    --------
    >>> from hashemb.torch import HashedNetEmbeddingBagCollection
    >>> HashedNetEmbeddingBagCollection([1000, 2000], 16, compression=10).weight.numel()
    4800
    """

    def __init__(self, num_embeddings, embedding_dim, compression=1000.0, mode="sum",
                 seed=0, signed=False, **kwargs):
        sizes = _sizes(num_embeddings)
        D = V.check_positive_int(embedding_dim, "embedding_dim", upper=1 << 20)
        self.num_embeddings, self.embedding_dim = sizes, D
        super().__init__(HashedNet(_robe_size(sum(sizes) * D, compression, 1), D, seed=seed,
                                   signed=signed), len(sizes), mode=mode, **kwargs)


def _minhash_scheme(data, sizes, dim, compression, lma, num_hashes, num_points, block,
                    seed, signature_size, progress):
    """An he.LSHTable / he.LMA fitted on ``data`` (or ``data`` itself if it is one)."""
    if isinstance(data, (LSHTable, LMA)):
        if V.check_positive_int(dim, "embedding_dim", upper=1 << 20) != data.dim:
            raise ValueError(f"embedding_dim: expected {data.dim} (the given {type(data).__name__}"
                             f"'s dim), got {dim}")
        return data
    if isinstance(data, torch.Tensor) and data.is_cuda:
        # built on the tensor's device, from a zero-copy CuPy view of it
        X, on = as_any_array(data, "data"), device_context(data)
        if X.dtype not in (np.int32, np.int64, np.uint64):
            raise TypeError(f"data: expected an int32, int64 or uint64 tensor, got {data.dtype}")
    else:
        X = V.as_keys(data.numpy() if isinstance(data, torch.Tensor) else data, "data")
        on = contextlib.nullcontext()
    X = X.reshape(-1, 1) if X.ndim == 1 else X
    D = V.check_positive_int(dim, "embedding_dim", upper=1 << 20)
    size = _robe_size(sum(sizes) * D, compression,
                      D if block is None else V.check_positive_int(block, "block"))
    num_points = min(V.check_positive_int(num_points, "num_points", upper=1 << 62), X.shape[0])
    with on:
        if lma:
            return LMA.fit(X, size, D, num_hashes, num_points, seed, block, signature_size,
                           progress)
        return LSHTable.fit(X, size, D, num_hashes, num_points, seed, block, progress)


class LSHEmbeddingBag(HashEmbeddingBag):
    r"""SCMA / LMA embedding bag: memory allocated by minhash of the data
    (:class:`hashemb.LSHTable`, or :class:`hashemb.LMA` with ``lma=True``), a
    ``num_embeddings x embedding_dim`` table kept in
    ``max(block, ceil(num_embeddings * embedding_dim / compression))`` floats
    (``block`` defaults to ``embedding_dim``).

    Parameters
    ----------
    data : array (rows,) or (rows, fields), or a fitted he.LSHTable / he.LMA
        Training tokens to learn the allocation from (``num_points`` rows are
        sampled), or a scheme built before (e.g. by ``python -m hashemb
        lsh-table``), whose own size and hashes are then used. A CUDA
        tensor is fitted on its device (the CuPy build).
    num_embeddings, embedding_dim : int
    compression : float
    table : int
        The field of ``data`` this bag reads (tokens are that column's values).
    lma : bool
        Signatures with slots computed on the fly (he.LMA) instead of a slot table.
    num_hashes, num_points, block, seed, signature_size, progress
        As in :meth:`hashemb.LSHTable.fit` / :meth:`hashemb.LMA.fit`.
    mode, optimizer, lr, eps, init_seed, dtype
        As in :class:`HashEmbeddingBag`.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import LSHEmbeddingBag
    >>> x = torch.randint(0, 1000, (5000,))
    >>> emb = LSHEmbeddingBag(x, 1000, 16, compression=10)
    >>> emb.weight.numel(), emb(x[:8].reshape(4, 2)).shape
    (1600, torch.Size([4, 16]))
    """

    def __init__(self, data, num_embeddings, embedding_dim, compression=1000.0, table=0,
                 lma=False, num_hashes=2, num_points=125_000, block=None, seed=0,
                 signature_size=None, mode="sum", progress=False, **kwargs):
        sizes = _sizes(num_embeddings)
        self.num_embeddings, self.embedding_dim = sizes[0], embedding_dim
        scheme = _minhash_scheme(data, sizes, embedding_dim, compression, lma, num_hashes,
                                 num_points, block, seed, signature_size, progress)
        super().__init__(scheme, table, mode=mode, **kwargs)


class LSHEmbeddingBagCollection(HashEmbeddingBagCollection):
    r"""Many tables in ONE SCMA / LMA array: memory allocated by minhash of the
    training data's co-occurrence (:class:`hashemb.LSHTable`, or
    :class:`hashemb.LMA` with ``lma=True``), ``max(block,
    ceil(sum(num_embeddings) * embedding_dim / compression))`` floats
    (``block`` defaults to ``embedding_dim``), a batch of all tables in one kernel
    call. Tokens of different tables that occur in the same rows share memory.

    Parameters
    ----------
    data : array (rows, T), or a fitted he.LSHTable / he.LMA
        The training tokens (column t = table t), or a scheme built before.
        A CUDA tensor is fitted on its device (the CuPy build).
    num_embeddings : list of int
        Rows of each table (for the array size).
    embedding_dim, compression, lma, num_hashes, num_points, block, seed,
    signature_size, progress, mode, optimizer, lr, eps, init_seed, dtype
        As in :class:`LSHEmbeddingBag`.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import LSHEmbeddingBagCollection
    >>> X = torch.randint(0, 100, (2000, 3))
    >>> emb = LSHEmbeddingBagCollection(X, [100, 100, 100], 16, compression=10, lma=True)
    >>> emb.weight.numel(), emb(X[:4]).shape
    (480, torch.Size([4, 48]))
    """

    def __init__(self, data, num_embeddings, embedding_dim, compression=1000.0, lma=False,
                 num_hashes=2, num_points=125_000, block=None, seed=0, signature_size=None,
                 mode="sum", progress=False, **kwargs):
        sizes = _sizes(num_embeddings)
        self.num_embeddings, self.embedding_dim = sizes, embedding_dim
        scheme = _minhash_scheme(data, sizes, embedding_dim, compression, lma, num_hashes,
                                 num_points, block, seed, signature_size, progress)
        if scheme.num_tables != len(sizes):
            raise ValueError(f"num_embeddings: expected {scheme.num_tables} table sizes (the "
                             f"fields of data), got {len(sizes)}")
        super().__init__(scheme, len(sizes), mode=mode, **kwargs)


class HashedEmbeddingBag(HashEmbeddingBag):
    r"""Seed 000's HashedEmbeddingBag: element-wise hashing of (row, column)
    into a buffer of ``W = int(num_embeddings * embedding_dim * compression)``
    floats (``compression`` is the fraction kept, e.g. 0.1), with its exact
    hash :meth:`hashemb.HashedNet.reference`
    ``((r*9824516537 + d*57857966300227 + 104729) mod 117130198221199) mod W``.
    A 1-D ``_weight`` sets the buffer (and W) directly.

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    compression : float
        The fraction of ``num_embeddings * embedding_dim`` kept (W rounds down,
        and must be at least 1).
    mode : {"sum", "mean", "max"}
    _weight : Tensor, optional
        A non-empty 1-D buffer (copied): W is its length.
    **kwargs
        ``table``, ``padding_idx``, ``include_last_offset``, ``optimizer``,
        ``lr``, ``eps``, ``init_seed``, ``dtype``: as in :class:`HashEmbeddingBag`.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import HashedEmbeddingBag
    >>> emb = HashedEmbeddingBag(1000, 16, compression=0.1)
    >>> lengths = torch.arange(18) % 8                     # 18 bags of 0-7 values
    >>> x = torch.randint(0, 1000, (int(lengths.sum()),))
    >>> offsets = torch.cumsum(lengths, 0) - lengths
    >>> emb.weight.numel(), emb(x, offsets).shape
    (1600, torch.Size([18, 16]))
    """

    def __init__(self, num_embeddings, embedding_dim, compression=0.1, mode="sum",
                 _weight=None, **kwargs):
        n = V.check_positive_int(num_embeddings, "num_embeddings", upper=1 << 62)
        D = V.check_positive_int(embedding_dim, "embedding_dim", upper=1 << 20)
        if _weight is not None:
            w = torch.as_tensor(_weight)
            if w.dim() != 1 or w.numel() == 0:
                raise ValueError(f"_weight: expected a non-empty 1-D tensor, "
                                 f"got shape {tuple(w.shape)}")
            W = w.numel()
        else:
            c = V.check_float(compression, "compression", positive=True)
            W = int(n * D * c)
            if W == 0:
                raise ValueError(f"compression: expected int(num_embeddings * embedding_dim "
                                 f"* compression) >= 1, got {n} * {D} * {c} < 1")
        self.num_embeddings, self.embedding_dim = n, D
        super().__init__(HashedNet.reference(W, D), mode=mode, _weight=_weight, **kwargs)


class HashingTrickEmbeddingBagCollection(HashEmbeddingBagCollection):
    r"""The hashing trick, the baseline every compression paper compares to:
    table t keeps ``rows_t = ceil(num_embeddings[t] / compression)`` full rows
    and token x uses row ``h(t, x) mod rows_t`` (:class:`hashemb.UniversalHash`);
    the rows live in one :class:`hashemb.FullTable` array.

    Parameters
    ----------
    num_embeddings : int or list of int
        Rows of each table before hashing.
    embedding_dim : int
    compression : float
    mode : {"sum", "mean", "max"}
    seed : int
        Seed of the :class:`hashemb.UniversalHash` mapping tokens to rows.
    **kwargs
        ``optimizer``, ``lr``, ``eps``, ``_weight``, ``init_seed``, ``dtype``:
        as in :class:`HashEmbeddingBag`. The default init draws table t's rows
        on ``+-1/sqrt(num_embeddings[t])``, as the full model would.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import HashingTrickEmbeddingBagCollection
    >>> emb = HashingTrickEmbeddingBagCollection([1000, 10], 4, compression=100)
    >>> emb.scheme.table_sizes, emb(torch.tensor([[999, 9]])).shape
    ([10, 1], torch.Size([1, 8]))
    """

    def __init__(self, num_embeddings, embedding_dim, compression=1000.0, mode="sum",
                 seed=0, **kwargs):
        sizes = _sizes(num_embeddings)
        c = V.check_float(compression, "compression", positive=True)
        self.rows = [max(1, math.ceil(n / c)) for n in sizes]
        self.num_embeddings, self.embedding_dim = sizes, embedding_dim
        self.hash = UniversalHash(seed)
        super().__init__(FullTable(self.rows, embedding_dim), len(sizes), mode=mode, **kwargs)

    def _init_scale(self):
        # each row as the full model draws its table's rows, 1/sqrt(n_t) (a
        # table's hashed rows' own count, 1 for a small table, drew +-1 and
        # sent the DLRM demo's training to NaN)
        return [1 / math.sqrt(n) for n in self.num_embeddings]

    def get_extra_state(self):
        return dict(super().get_extra_state(), hash_seed=self.hash.seed, rows=self.rows)

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.hash, self.rows = UniversalHash(state["hash_seed"]), list(state["rows"])

    def _normalise(self, input, offsets, per_sample_weights):
        flat, off, psw = super()._normalise(input, offsets, per_sample_weights)
        if off is None:                 # (B, T): column t holds table t's tokens
            with device_context(flat):
                keys = as_any_array(flat, "input")
                xp = np if isinstance(keys, np.ndarray) else _cupy()
                out = xp.empty(keys.shape, np.int64)
                for t, rows in enumerate(self.rows):
                    out[:, t] = self.hash(xp.ascontiguousarray(keys[:, t]), rows, table=t)
            return as_tensor(out), None, psw
        B = (off.shape[0] - 1) // self.num_tables
        o = off[::B].cpu().numpy() if B else np.zeros(self.num_tables + 1, np.int64)
        with device_context(flat):
            keys = as_any_array(flat, "input")
            out = (np if isinstance(keys, np.ndarray) else _cupy()).empty(keys.shape[0], np.int64)
            for t, rows in enumerate(self.rows):
                lo, hi = int(o[t]), int(o[t + 1])
                if lo < 0 or hi > keys.shape[0] or lo > hi:
                    raise ValueError(f"offsets: expected values in [0, {keys.shape[0]}] and "
                                     f"non-decreasing, got {lo}..{hi} for table {t}")
                out[lo:hi] = self.hash(keys[lo:hi], rows, table=t)
        return as_tensor(out), off, psw


def dlrm_init_(weights, sizes, seed):
    """Fill the rows of each table (``weights[t]``, ``sizes[t]`` rows) uniform
    on ``+-1/sqrt(sizes[t])``, as DLRM does, in table order from one
    generator seeded with ``seed``: the draws of the torch baseline, whether
    the tables are separate tensors or consecutive slices of one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w, n in zip(weights, sizes):
            w.uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n), generator=g)


class TorchEmbeddingBagCollection(nn.Module):
    r"""The uncompressed baseline in plain torch: one ``nn.EmbeddingBag`` per
    table (mode sum, uniform init on ``+-1/sqrt(rows)`` as DLRM does), outputs
    concatenated to ``(B, T*dim)``. Input ``(B, T)``.

    Parameters
    ----------
    num_embeddings : int or list of int
        Rows of each table.
    embedding_dim : int
    sparse : bool
        Sparse gradients (``nn.EmbeddingBag(sparse=True)``), for a torch
        optimizer that takes them (SGD, Adagrad, SparseAdam).
    seed : int
        Seed of the init (one generator, tables in order).
    device : None, str or torch.device
        Where the tables go after the init (drawn on the CPU, as the
        compressed modules' values are).

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import TorchEmbeddingBagCollection
    >>> TorchEmbeddingBagCollection([10, 20], 4)(torch.tensor([[1, 2]])).shape
    torch.Size([1, 8])
    """

    def __init__(self, num_embeddings, embedding_dim, sparse=True, seed=0, device=None):
        super().__init__()
        device = check_device(device)
        self.num_embeddings, self.embedding_dim = _sizes(num_embeddings), embedding_dim
        self.tables = nn.ModuleList(nn.EmbeddingBag(n, embedding_dim, mode="sum", sparse=sparse)
                                    for n in self.num_embeddings)
        dlrm_init_([e.weight for e in self.tables], self.num_embeddings, seed)
        if device is not None:
            self.to(device)         # the same draws as on the CPU (one CPU generator)

    def forward(self, input, offsets=None, per_sample_weights=None):
        if input.dim() != 2 or offsets is not None or per_sample_weights is not None:
            raise ValueError("input: expected a (B, T) tensor without offsets")
        return torch.cat([e(input[:, t:t + 1]) for t, e in enumerate(self.tables)], dim=1)

    def memory_bytes(self):
        """Bytes of the full tables.

        Returns
        -------
        int
            Every table's weight, in its dtype.
        """
        return sum(e.weight.numel() * e.weight.element_size() for e in self.tables)


def _opt_args(opt):
    """(kind, lr, eps) of a fused optimizer, as saved (None: no optimizer)."""
    return (optimizer_name(opt), getattr(opt, "lr", None), getattr(opt, "eps", None))


def _state_dtype(weight_dtype):
    """The optimizer state's dtype for an array of ``weight_dtype``."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def _sizes(num_embeddings):
    if isinstance(num_embeddings, (int, np.integer)):
        num_embeddings = [num_embeddings]
    sizes = [V.check_positive_int(n, "num_embeddings", upper=1 << 62) for n in num_embeddings]
    if not sizes:
        raise ValueError("num_embeddings: expected at least one table size, got []")
    return sizes


def dense_parameters(module):
    """The parameters a torch optimizer should update: all but the arrays that
    a fused hashemb optimizer updates inside backward.

    Parameters
    ----------
    module : torch.nn.Module
        Any model; its hashemb modules are asked which arrays they update
        themselves (a fused ``optimizer=``; TT modules with ``sparse=True``).

    Returns
    -------
    list of torch.nn.Parameter
        ``module.parameters()`` that require a gradient, less those arrays,
        in ``module.parameters()``' order.

    Examples
    --------
    >>> import torch, hashemb as he
    >>> from hashemb.torch import HashEmbeddingBag, dense_parameters
    >>> model = torch.nn.ModuleDict({"emb": HashEmbeddingBag(he.RobeZ(1000, 8), optimizer="sgd"),
    ...                              "mlp": torch.nn.Linear(8, 1)})
    >>> [p.shape for p in dense_parameters(model)]          # the array is not there
    [torch.Size([1, 8]), torch.Size([1])]
    >>> opt = torch.optim.SGD(dense_parameters(model), lr=0.1)
    """
    # asked of the modules, not marked on the tensors: a mark on a Parameter
    # does not survive copy.deepcopy (the copy's array was listed)
    fused = {id(p) for m in module.modules() if hasattr(m, "_fused_parameters")
             for p in m._fused_parameters()}
    return [p for p in module.parameters() if p.requires_grad and id(p) not in fused]
