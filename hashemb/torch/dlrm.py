"""DLRM (bottom MLP, dot interaction, top MLP) over any embedding collection,
and the train / evaluate loop used by the demo and the examples."""
import math
import time

import numpy as np
import torch
from torch import nn

from .. import _validate as V
from ..metrics import auc, logloss
from ..schemes import FullTable
from ._function import optimizer_name
from .modules import (HashEmbeddingBagCollection, HashedNetEmbeddingBagCollection,
                      HashingTrickEmbeddingBagCollection, RobeEmbeddingBagCollection,
                      TorchEmbeddingBagCollection, _sizes, dense_parameters, dlrm_init_)

METHODS = ("full", "robez", "hashednet", "hashing_trick")


def _mlp(sizes, last_relu, gen):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():          # DLRM's init
            lin.weight.normal_(0.0, math.sqrt(2.0 / (a + b)), generator=gen)
            lin.bias.normal_(0.0, math.sqrt(1.0 / b), generator=gen)
        layers.append(lin)
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    r"""DLRM with dot interaction (Naumov et al. 2019):

    .. math::

        x = \mathrm{bot}(d),\quad e_t = \mathrm{emb}_t(c_t),\quad
        z = [x, (\langle u, v\rangle)_{u < v \in \{x, e_1..e_T\}}],\quad
        \hat y = \mathrm{top}(z)

    Defaults are the ROBE paper's Criteo Kaggle settings: bottom 13-512-256-64-16,
    top 512-256-1, D = 16. ``forward`` returns logits.

    Parameters
    ----------
    embedding : nn.Module
        Maps a ``(B, T)`` tensor of tokens to ``(B, T*dim)``: any
        hashemb.torch collection or :class:`TorchEmbeddingBagCollection`.
    num_tables, num_dense, dim : int
    bottom, top : tuple of int
        Hidden sizes of the MLPs.
    seed : int
        Seed of the MLP initialisation.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import DLRM, RobeEmbeddingBagCollection
    >>> emb = RobeEmbeddingBagCollection([100, 200], 16, compression=10)
    >>> m = DLRM(emb, num_tables=2, num_dense=3, bottom=(8,), top=(8,))
    >>> m(torch.rand(4, 3), torch.randint(0, 100, (4, 2))).shape
    torch.Size([4])
    """

    def __init__(self, embedding, num_tables, num_dense=13, dim=16, bottom=(512, 256, 64),
                 top=(512, 256), seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embedding, self.num_tables, self.dim = embedding, num_tables, dim
        self.bottom = _mlp([num_dense, *bottom, dim], True, gen)
        n_int = (num_tables + 1) * num_tables // 2
        self.top = _mlp([dim + n_int, *top, 1], False, gen)
        li, lj = torch.tril_indices(num_tables + 1, num_tables + 1, offset=-1)
        self.register_buffer("_li", li, persistent=False)
        self.register_buffer("_lj", lj, persistent=False)

    def forward(self, dense, cats):
        x = self.bottom(dense)
        # (hashemb modules pool 16-bit arrays in float32: the MLPs' dtype
        # after .half() / .bfloat16() is the model's)
        e = self.embedding(cats).view(-1, self.num_tables, self.dim).to(x.dtype)
        z = torch.cat([x.unsqueeze(1), e], dim=1)
        dots = torch.bmm(z, z.transpose(1, 2))[:, self._li, self._lj]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)


def make_embedding(method, num_embeddings, dim=16, compression=1000.0, lr=0.1, seed=0,
                   block=None, optimizer="sgd", dtype=torch.float32):
    """The embedding collection of a method of :data:`METHODS`, trained by
    ``optimizer`` ("sgd", "adagrad", or a hashemb.SGD / Adagrad object) at
    ``lr``, fused into backward for the hashemb modules: "full" (torch
    nn.EmbeddingBag, float32, sparse gradients, left to the torch
    optimizer; with ``optimizer="rowwise_adagrad"`` hashemb's FullTable of
    ``dtype`` and a fused :class:`hashemb.RowwiseAdagrad`), "robez"
    (ROBE-Z, Z = ``block`` or dim), "hashednet",
    "hashing_trick" (each at ``compression``, their array of ``dtype``:
    float32, float64, float16 or bfloat16 storage).

    Parameters
    ----------
    method : {"full", "robez", "hashednet", "hashing_trick"}
    num_embeddings : int or list of int
        Rows of each table.
    dim : int
        Embedding width D.
    compression : float
        Of the compressed methods (unused by "full").
    lr : float
        Of the fused optimizer (unused by "full" with a torch optimizer).
    seed : int
        Seed of the hash and of the initial array (the baseline's init for
        "full").
    block : int, optional
        ROBE-Z's Z (default ``dim``).
    optimizer : str or hashemb optimizer
        "sgd", "adagrad", "rowwise_adagrad" (with "full": hashemb's fused
        row-wise Adagrad), or a hashemb.SGD / Adagrad object.
    dtype : torch.dtype
        Of the hashemb modules' array.

    Returns
    -------
    torch.nn.Module
        :class:`TorchEmbeddingBagCollection` ("full"), a
        :class:`HashEmbeddingBagCollection` of a FullTable ("full" with
        "rowwise_adagrad"), or the method's collection; input ``(B, T)``,
        output ``(B, T * dim)``.

    Examples
    --------
    >>> import torch
    >>> from hashemb.torch import make_embedding
    >>> emb = make_embedding("robez", [1000, 5000], dim=16, compression=100)
    >>> emb.weight.numel(), emb(torch.tensor([[1, 4999]])).shape
    (960, torch.Size([1, 32]))
    """
    if method == "full" and optimizer_name(optimizer) == "rowwise_adagrad":
        # FBGEMM's optimizer for large tables, fused: through hashemb's
        # FullTable, from the torch baseline's initial rows (the same draws,
        # made once into one array rather than into a copy of the baseline)
        sizes = _sizes(num_embeddings)
        rows = torch.empty(sum(sizes), dim)
        dlrm_init_(rows.split(sizes), sizes, seed)
        return HashEmbeddingBagCollection(FullTable(sizes, dim), len(sizes),
                                          optimizer=optimizer, lr=lr, _weight=rows.to(dtype))
    if method == "full":
        return TorchEmbeddingBagCollection(num_embeddings, dim, sparse=True, seed=seed)
    kw = dict(compression=compression, seed=seed, optimizer=optimizer, lr=lr, init_seed=seed,
              dtype=dtype)
    if method == "robez":
        return RobeEmbeddingBagCollection(num_embeddings, dim, block=block, **kw)
    if method == "hashednet":
        return HashedNetEmbeddingBagCollection(num_embeddings, dim, **kw)
    if method == "hashing_trick":
        return HashingTrickEmbeddingBagCollection(num_embeddings, dim, **kw)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def embedding_params(module):
    """Floats held by the embedding part of ``module``."""
    emb = module.embedding if hasattr(module, "embedding") else module
    return sum(p.numel() for p in emb.parameters())


def _tensors(dense, cats, labels, device, dtype=torch.float32):
    """The data as tensors on ``device`` (moved once, not per batch), dense
    features in ``dtype``, its rows checked to agree: a short ``labels``
    would otherwise pair samples with the wrong labels or fail deep inside
    the loss."""
    d, c, y = (np.ascontiguousarray(dense, np.float32), np.ascontiguousarray(cats),
               np.ascontiguousarray(labels, np.float32))
    if d.ndim != 2 or c.ndim != 2 or y.ndim != 1 or not d.shape[0] == c.shape[0] == y.shape[0]:
        raise ValueError(f"dense, cats, labels: expected (n, num_dense), (n, num_tables) and "
                         f"(n,) arrays, got shapes {d.shape}, {c.shape}, {y.shape}")
    return (torch.from_numpy(d).to(device, dtype), torch.from_numpy(c).to(device),
            torch.from_numpy(y).to(device))


def _dense_dtype(model):
    """The dtype a model's dense features go in: its bottom MLP's (a DLRM
    after .double() or .bfloat16(); the embeddings' own dtype may differ),
    else float32."""
    bottom = getattr(getattr(model, "module", model), "bottom", None)     # (DDP's wrapper)
    p = next(bottom.parameters(), None) if isinstance(bottom, nn.Module) else None
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model, optimizer, dense, cats, labels, batch_size=2048, seed=0,
                progress=None):
    """One pass over the data in a seeded random order, on the model's device
    (the data is moved there once); returns ``(mean training loss,
    samples/s)``. ``progress`` is a tqdm bar (or None).

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(dense, cats)``, returning logits (a :class:`DLRM`);
        put in training mode.
    optimizer : torch.optim.Optimizer
        Steps the dense parameters (:func:`dense_parameters`; the fused
        hashemb arrays step inside backward).
    dense, cats, labels : array_like
        ``(n, num_dense)`` floats, ``(n, num_tables)`` tokens and ``(n,)``
        0/1 labels.
    batch_size : int
    seed : int
        Seed of the sample order.
    progress : tqdm bar, optional
        Updated by each batch's size.

    Returns
    -------
    (loss, samples_per_s) : (float, float)
        The binary cross-entropy averaged over every sample (each batch's
        mean weighted by its size), and samples per second of the pass.

    Examples
    --------
    >>> from hashemb.data import SyntheticCriteo
    >>> from hashemb.torch import DLRM, evaluate, make_embedding, train_epoch
    >>> from hashemb.torch.dlrm import make_optimizer
    >>> gen = SyntheticCriteo(scale=0.0001, seed=0)
    >>> tr, te = gen.sample(0, 2000, "train"), gen.sample(0, 500, "test")
    >>> model = DLRM(make_embedding("robez", gen.cardinalities, compression=10), 26,
    ...              bottom=(32,), top=(32,))
    >>> loss, sps = train_epoch(model, make_optimizer(model, 0.5), tr.dense, tr.cats,
    ...                         tr.labels, batch_size=500)
    >>> sorted(evaluate(model, te.dense, te.cats, te.labels))
    ['auc', 'logloss', 'samples_per_s']
    """
    batch_size = V.check_positive_int(batch_size, "batch_size")
    dev = _device(model)
    d, c, y = _tensors(dense, cats, labels, dev, _dense_dtype(model))
    n = y.shape[0]
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n)).to(dev)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    # the loss is summed on the device: .item() per step would wait for the GPU
    total = torch.zeros((), dtype=torch.float64, device=dev)
    _sync(dev)
    t0 = time.perf_counter()
    for lo in range(0, n, batch_size):
        sel = order[lo:lo + batch_size]
        optimizer.zero_grad(set_to_none=True)
        out = model(d[sel], c[sel])
        loss = loss_fn(out, y[sel].to(out.dtype))
        loss.backward()
        optimizer.step()
        total += loss.detach() * sel.shape[0]
        if progress is not None:
            progress.update(sel.shape[0])
    total = total.item()
    return total / max(n, 1), n / (time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model, dense, cats, labels, batch_size=16384):
    """``dict(auc, logloss, samples_per_s)`` of the model's predictions (run
    on the model's device); see :func:`train_epoch` for a training example.

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(dense, cats)``, returning logits; put in eval mode
        (and left there), run without autograd.
    dense, cats, labels : array_like
        As in :func:`train_epoch`; at least one sample, both classes among
        the labels (for the AUC).
    batch_size : int
        Samples per forward call.

    Returns
    -------
    dict
        ``auc`` and ``logloss`` (:func:`hashemb.metrics.auc`,
        :func:`hashemb.metrics.logloss`) of ``sigmoid(model(dense, cats))``,
        and ``samples_per_s`` of the pass.

    Examples
    --------
    >>> import torch
    >>> from hashemb.data import SyntheticCriteo
    >>> from hashemb.metrics import auc
    >>> from hashemb.torch import DLRM, evaluate, make_embedding
    >>> gen = SyntheticCriteo(scale=0.0001, seed=0)
    >>> te = gen.sample(0, 500, "test")
    >>> model = DLRM(make_embedding("robez", gen.cardinalities, compression=10), 26,
    ...              bottom=(32,), top=(32,))
    >>> res = evaluate(model, te.dense, te.cats, te.labels)
    >>> with torch.no_grad():
    ...     p = torch.sigmoid(model(torch.from_numpy(te.dense), torch.from_numpy(te.cats)))
    >>> res["auc"] == auc(te.labels, p.numpy()), model.training
    (True, False)
    """
    batch_size = V.check_positive_int(batch_size, "batch_size")
    dev = _device(model)
    d, c, _ = _tensors(dense, cats, labels, dev, _dense_dtype(model))
    if d.shape[0] == 0:
        raise ValueError("labels: expected at least one sample to evaluate, got none")
    model.eval()
    out = []
    _sync(dev)
    t0 = time.perf_counter()
    for lo in range(0, d.shape[0], batch_size):
        out.append(torch.sigmoid(model(d[lo:lo + batch_size], c[lo:lo + batch_size])))
    p = torch.cat(out).float().cpu().numpy()
    dt = time.perf_counter() - t0
    return {"auc": auc(labels, p), "logloss": logloss(labels, p),
            "samples_per_s": d.shape[0] / dt}


def make_optimizer(model, lr, name="sgd"):
    """torch SGD (or Adagrad: name "adagrad" or "rowwise_adagrad") over the
    parameters not updated by a fused hashemb optimizer."""
    if name in ("adagrad", "rowwise_adagrad"):
        return torch.optim.Adagrad(dense_parameters(model), lr=lr)
    if name != "sgd":
        raise ValueError(f"name: expected 'sgd', 'adagrad' or 'rowwise_adagrad', got {name!r}")
    return torch.optim.SGD(dense_parameters(model), lr=lr)
