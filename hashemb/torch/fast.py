"""Drop-in ``torch.nn.Embedding`` replacements whose lookups and gradients run in
hashemb's plain-lookup kernels (:func:`hashemb.embedding`,
:func:`hashemb.multi_embedding`)."""

import torch

from .. import lookup as _lookup
from ._function import as_any_array, as_tensor, device_context


class _MultiLookup(torch.autograd.Function):
    """out = multi_embedding(indices, weight); d weight = its backward (dense)."""

    @staticmethod
    def forward(ctx, weight, indices, sizes, dims, single):
        with device_context(weight):
            w, idx = as_any_array(weight, "weight"), as_any_array(indices, "indices")
            if single:
                out = _lookup.embedding(idx, w.reshape(sizes, dims))
            else:
                out = _lookup.multi_embedding(idx, w, sizes, dims)
        ctx.save_for_backward(indices)
        ctx.layout = (sizes, dims, single, weight.shape)
        return as_tensor(out)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        sizes, dims, single, shape = ctx.layout
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        with device_context(grad):
            g, idx = as_any_array(grad.contiguous(), "grad"), as_any_array(indices, "indices")
            if single:
                dw = _lookup.embedding_backward(g, idx, sizes)
            else:
                dw = _lookup.multi_embedding_backward(g, idx, sizes, dims)
        return as_tensor(dw).reshape(shape), None, None, None, None


def _index_tensor(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input: expected an int32 or int64 tensor, got {x.dtype}")
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
        as nn.Embedding.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import FastEmbedding
    >>> emb = FastEmbedding(10, 3)
    >>> emb(torch.tensor([[1, 2], [3, 9]])).shape
    torch.Size([2, 2, 3])
    """

    def __init__(self, num_embeddings, embedding_dim, _weight=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        _lookup._layout(self.num_embeddings, self.embedding_dim)      # validates
        shape = (self.num_embeddings, self.embedding_dim)
        if _weight is None:
            _weight = torch.randn(shape, dtype=dtype or torch.float32)
        elif tuple(_weight.shape) != shape:
            raise ValueError(f"_weight: expected shape {shape}, got {tuple(_weight.shape)}")
        self.weight = torch.nn.Parameter(_weight)

    def forward(self, input):
        return _MultiLookup.apply(self.weight, _index_tensor(input), self.num_embeddings,
                                  self.embedding_dim, True)

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
    sizes, dims : sequence of int
        Rows and width of each table.
    _weight : torch.Tensor, optional
        The packed tables, ``sum(sizes[t] * dims[t])`` floats; default N(0, 1).

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import FastMultiEmbedding
    >>> emb = FastMultiEmbedding([5, 7, 2], [1, 4, 3])
    >>> emb(torch.tensor([[4, 6, 1], [0, 0, 0]])).shape
    torch.Size([2, 8])
    """

    def __init__(self, sizes, dims, _weight=None, dtype=None):
        super().__init__()
        size = _lookup._layout(sizes, dims)[4]
        self.sizes, self.dims = tuple(int(n) for n in sizes), tuple(int(d) for d in dims)
        if _weight is None:
            _weight = torch.randn(size, dtype=dtype or torch.float32)
        elif _weight.numel() != size:
            raise ValueError(f"_weight: expected {size} floats, got {_weight.numel()}")
        self.weight = torch.nn.Parameter(_weight.reshape(size))

    def forward(self, input):
        return _MultiLookup.apply(self.weight, _index_tensor(input), self.sizes, self.dims, False)

    def unpacked(self):
        """Views of the packed weight, one ``(sizes[t], dims[t])`` tensor per table."""
        out, start = [], 0
        for n, d in zip(self.sizes, self.dims):
            out.append(self.weight[start:start + n * d].view(n, d))
            start += n * d
        return out

    def extra_repr(self):
        return f"sizes={list(self.sizes)}, dims={list(self.dims)}"
