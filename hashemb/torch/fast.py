"""Drop-in ``torch.nn.Embedding`` replacements whose lookups and gradients run in
hashemb's plain-lookup kernels (:func:`hashemb.embedding`,
:func:`hashemb.multi_embedding`): on the CPU through a native C++ autograd
function over the same kernels (hashemb/torch/_native.cpp, built on first
use), on CUDA through the CuPy kernels."""

import numpy as np
import torch

from .. import _validate as V
from .. import lookup as _lookup
from . import _native
from ._function import (as_any_array, as_tensor, check_device, compile_opaque,
                        device_context, refuse_double_backward)


_FLOATS = (torch.float32, torch.float64)


def _lookup_apply(weight, indices, layout, layout_t, single, shape=None):
    """The lookup with autograd: the native C++ function for CPU tensors when
    it is built (hashemb/torch/_native.cpp), else the Python one below
    (also while torch.jit traces: the tracer cannot see inside the native
    op, and recorded an empty output)."""
    # the layout is the module's, fixed at construction: a weight put in its
    # place (a Parameter assigned, .data, functional_call) must fit it, or the
    # kernels would read and write past it. ``shape``: the weight's, kept by
    # the module as a torch.Size (compared in 0.13 us; built here, 0.4 us)
    if shape is None:
        shape = torch.Size((int(layout.sizes[0]), int(layout.dims[0])) if single
                           else (layout.size,))
    if weight.shape != shape:
        what = "the module's num_embeddings, embedding_dim" if single else \
            "a 1-D tensor of the packed tables' floats"
        raise ValueError(f"weight: expected shape {tuple(shape)} ({what}), "
                         f"got {tuple(weight.shape)}")
    if weight.device.type == "cpu" and indices.device.type == "cpu":
        if weight.dtype not in _FLOATS:
            raise TypeError(f"weight: expected a float32 or float64 parameter, got {weight.dtype}")
        native = None if torch.jit.is_tracing() else _native.module()
        if native is not None:
            try:
                return native.lookup(weight, indices, layout_t, layout.total, single)
            except IndexError as e:
                bad = _native.bad_index(e)
                if bad is None:
                    raise
                raise V.index_error(indices.numpy(), bad, layout.sizes) from None
    return _MultiLookup.apply(weight, indices, layout, single)


class _MultiLookup(torch.autograd.Function):
    """out = multi_embedding(indices, weight); d weight = its backward (dense).

    The path for CUDA tensors (the public functions' CuPy kernels) and the
    CPU fallback when the native op is not built (called through
    _lookup_apply, which checks the weight's dtype): CPU tensors go straight to
    the kernels (hashemb.lookup._gather/_scatter, range check fused in),
    skipping the public functions' generic checks, which at batch 128 would
    cost as much as torch's whole step."""

    @staticmethod
    def forward(ctx, weight, indices, layout, single):
        ctx.save_for_backward(indices)
        ctx.layout, ctx.single, ctx.shape = layout, single, weight.shape
        if weight.device.type == "cuda" or indices.device.type == "cuda":
            with device_context(weight):
                w, idx = as_any_array(weight, "weight"), as_any_array(indices, "indices")
                sizes, dims = layout.sizes, layout.dims
                if single:
                    out = _lookup.embedding(idx, w.reshape(int(sizes[0]), int(dims[0])))
                else:
                    out = _lookup.multi_embedding(idx, w, sizes, dims)
            return as_tensor(out)
        # float32/float64 checked by _lookup_apply; reshape copies a non-contiguous weight: the kernel reads a flat buffer
        w = weight.detach().numpy().reshape(-1)
        return torch.from_numpy(_lookup._gather(layout, w, indices.numpy(), single))

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("FastEmbedding")
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (indices,) = ctx.saved_tensors
        layout = ctx.layout
        if grad.device.type == "cuda":
            with device_context(grad):
                g, idx = as_any_array(grad.contiguous(), "grad"), as_any_array(indices, "indices")
                sizes, dims = layout.sizes, layout.dims
                if ctx.single:
                    dw = _lookup.embedding_backward(g, idx, int(sizes[0]))
                else:
                    dw = _lookup.multi_embedding_backward(g, idx, sizes, dims)
            return as_tensor(dw).reshape(ctx.shape), None, None, None
        g = np.ascontiguousarray(grad.detach().resolve_neg().numpy()).reshape(-1, layout.total)
        dw = _lookup._scatter(layout, g, indices.numpy())
        return torch.from_numpy(dw.reshape(ctx.shape)), None, None, None


def _check_dtype(dtype):
    """The ``dtype=`` of a new module's weight, checked: None (float32),
    torch.float32 or torch.float64, the dtypes forward runs (a float16 module
    was built and failed at its first call; an integer one failed inside
    torch.randn)."""
    if dtype is None or dtype in _FLOATS:
        return dtype
    raise TypeError(f"dtype: expected None, torch.float32 or torch.float64 (the weight "
                    f"dtypes the lookup runs), got {dtype!r}")


def _initial_weight(_weight, shape, dtype, device):
    """A new module's weight: N(0, 1) of ``shape`` on ``device`` (as
    nn.Embedding's, from torch's generator of that device), or the
    ``_weight`` given, checked to be a float32 or float64 tensor (one of
    another dtype was built and failed at its first call) on ``device``
    where one is given. The caller checks its size."""
    device = check_device(device)
    if _weight is None:
        return torch.randn(shape, dtype=dtype or torch.float32, device=device)
    if not isinstance(_weight, torch.Tensor):
        raise TypeError(f"_weight: expected a torch.Tensor, got {type(_weight).__name__}")
    if _weight.dtype not in _FLOATS:
        raise TypeError(f"_weight: expected a float32 or float64 tensor, got {_weight.dtype}")
    if device is not None and (_weight.device.type != device.type or
                               device.index not in (None, _weight.device.index)):
        raise ValueError(f"device: expected {_weight.device} (_weight's; it is used as "
                         f"given), got {device}")
    return _weight


def _index_tensor(x, T=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input: expected an int32 or int64 tensor, got {x.dtype}")
    if T is not None:
        V.check_table_columns(x, T, "input")
    return x.contiguous()


class FastEmbedding(torch.nn.Module):
    r"""``torch.nn.Embedding(num_embeddings, embedding_dim)`` through hashemb's
    kernels: any input shape, out-of-range ids raise IndexError, backward gives
    a dense gradient summed by one thread per column block in sample order
    (bitwise deterministic, hot ids spread over every thread).

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    _weight : torch.Tensor, optional
        Initial table of shape (num_embeddings, embedding_dim); default N(0, 1)
        as nn.Embedding. Used as given (not copied, not converted): forward
        runs float32 and float64 weights only.
    dtype : None, torch.float32 or torch.float64
        Of the default N(0, 1) table (None: float32); with ``_weight`` it is
        checked but not applied (the weight keeps its own dtype). Any other
        dtype (float16, bfloat16, integers, ...) is a TypeError here: the
        lookup kernels read float32 and float64 tables only.
    device : None, str or torch.device
        Of the default table (None: the CPU), drawn there by torch as
        nn.Embedding's; with ``_weight`` it must be ``_weight``'s device.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import FastEmbedding
    >>> emb = FastEmbedding(10, 3)
    >>> emb(torch.tensor([[1, 2], [3, 9]])).shape
    torch.Size([2, 2, 3])
    """

    def __init__(self, num_embeddings, embedding_dim, *, _weight=None, dtype=None, device=None):
        # keyword-only: nn.Embedding's third and fourth are padding_idx and max_norm
        super().__init__()
        dtype = _check_dtype(dtype)
        self.num_embeddings = V.check_positive_int(num_embeddings, "num_embeddings", upper=1 << 61)
        self.embedding_dim = V.check_positive_int(embedding_dim, "embedding_dim", upper=1 << 20)
        self._layout = _lookup._layout(self.num_embeddings, self.embedding_dim)  # validates
        self._layout_t = torch.tensor(self._layout.packed)
        shape = (self.num_embeddings, self.embedding_dim)
        _weight = _initial_weight(_weight, shape, dtype, device)
        if tuple(_weight.shape) != shape:
            raise ValueError(f"_weight: expected shape {shape}, got {tuple(_weight.shape)}")
        self.weight = torch.nn.Parameter(_weight)
        self._shape = torch.Size(shape)

    @compile_opaque
    def forward(self, input):
        # (getattr: a module pickled before _shape was kept)
        return _lookup_apply(self.weight, _index_tensor(input), self._layout, self._layout_t, True,
                             getattr(self, "_shape", None))

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class FastMultiEmbedding(torch.nn.Module):
    r"""Many small tables of mixed widths in one packed parameter, one lookup:
    input (B, T) -> output (B, sum(dims)), column block t holding row
    ``input[:, t]`` of table t. Replaces T ``nn.Embedding`` modules and a
    ``torch.cat``; the tables are packed without padding (``unpacked()`` gives
    per-table views).

    Parameters
    ----------
    sizes, dims : int or sequence of int
        Rows and width of each table (an int: one table).
    _weight : torch.Tensor, optional
        The packed tables, ``sum(sizes[t] * dims[t])`` floats (any shape of
        that many elements, reshaped to 1-D); default N(0, 1). Its dtype is
        kept: forward runs float32 and float64 weights only.
    dtype : None, torch.float32 or torch.float64
        Of the default N(0, 1) tables (None: float32); with ``_weight`` it is
        checked but not applied. Any other dtype is a TypeError here, as in
        :class:`FastEmbedding`.
    device : None, str or torch.device
        As :class:`FastEmbedding`'s.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import FastMultiEmbedding
    >>> emb = FastMultiEmbedding([5, 7, 2], [1, 4, 3])
    >>> emb(torch.tensor([[4, 6, 1], [0, 0, 0]])).shape
    torch.Size([2, 8])
    """

    def __init__(self, sizes, dims, *, _weight=None, dtype=None, device=None):
        super().__init__()
        dtype = _check_dtype(dtype)
        self._layout = _lookup._layout(sizes, dims)
        self._layout_t = torch.tensor(self._layout.packed)
        size = self._layout.size
        # (an int for either, as multi_embedding takes: one table)
        self.sizes, self.dims = (tuple(int(v) for v in a) for a in self._layout.packed[[3, 1]])
        _weight = _initial_weight(_weight, size, dtype, device)
        if _weight.numel() != size:
            raise ValueError(f"_weight: expected {size} floats, got {_weight.numel()}")
        self.weight = torch.nn.Parameter(_weight.reshape(size))
        self._shape = torch.Size((size,))

    @compile_opaque
    def forward(self, input):
        return _lookup_apply(self.weight, _index_tensor(input, len(self.sizes)),
                             self._layout, self._layout_t, False, getattr(self, "_shape", None))

    def unpacked(self):
        """Views of the packed weight, one ``(sizes[t], dims[t])`` tensor per table.

        Returns
        -------
        list of torch.Tensor
            Views of ``weight`` (no copies; autograd views of the parameter):
            writes under ``torch.no_grad()`` change the packed tables.
        """
        out, start = [], 0
        for n, d in zip(self.sizes, self.dims):
            out.append(self.weight[start:start + n * d].view(n, d))
            start += n * d
        return out

    def extra_repr(self):
        return f"sizes={list(self.sizes)}, dims={list(self.dims)}"
