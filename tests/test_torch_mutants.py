"""Tests beside tests/test_torch.py, each killing a mutant that survived the suite
(mutation round 3, of hashemb/torch/_function.py and hashemb/torch/dlrm.py)."""
import numpy as np
import pytest
import torch
from torch import nn

import hashemb as he
from hashemb.torch import HashEmbeddingBag, train_epoch


@pytest.mark.parametrize("form", ["offsets", "2d"])
def test_per_sample_weight_gradient_skips_padding_like_torch(form):
    """The padding entries are not in their bags: their per-sample weights
    get a zero gradient, as torch.nn.EmbeddingBag gives them, and the other
    entries torch's gradient (the padding row non-zero, so a padding entry
    looked up would show)."""
    torch.manual_seed(0)
    n, D, pad = 11, 5, 3
    ref = torch.nn.EmbeddingBag(n, D, mode="sum", padding_idx=pad)
    with torch.no_grad():
        ref.weight[pad] = 1.0           # (torch zeroes it; skipped whatever it holds)
    ours = HashEmbeddingBag(he.FullTable(n, D), mode="sum", padding_idx=pad,
                            _weight=ref.weight.detach())
    if form == "offsets":
        idx = torch.tensor([1, 3, 4, 3, 3, 7, 10, 3, 0])
        off = torch.tensor([0, 3, 5])
    else:
        idx, off = torch.tensor([[1, 3, 4], [3, 3, 7], [10, 3, 0]]), None
    g = torch.randn(3, D)
    grads = []
    for m in (ref, ours):
        w = torch.rand(idx.shape, dtype=torch.float32, requires_grad=True)
        (m(idx, off, per_sample_weights=w) * g).sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert (grads[1][idx == pad] == 0).all() and (grads[1][idx != pad] != 0).all()


def test_per_sample_weight_gradient_skips_padding_of_a_hashed_scheme():
    emb = HashEmbeddingBag(he.RobeZ(37, 4, block=2, signed=True), mode="sum", padding_idx=5,
                           dtype=torch.float64)
    idx = torch.tensor([1, 5, 9, 5, 7, 7])
    off = torch.tensor([0, 2, 2, 5])
    psw = torch.rand(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: emb(idx, off, p), (psw,))
    emb(idx, off, psw).sum().backward()
    assert (psw.grad[idx == 5] == 0).all() and (psw.grad[idx != 5] != 0).all()



class _Recorder(nn.Module):
    """A model that records which samples each step saw (dense[:, 0] holds
    the sample's id)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.seen = []

    def forward(self, dense, cats):
        self.seen.append(dense[:, 0].long().tolist())
        return self.lin(dense).squeeze(1)


def _order(seed, n=64, batch=10):
    m = _Recorder()
    dense = np.stack([np.arange(n), np.zeros(n)], 1).astype(np.float32)
    cats = np.zeros((n, 1), np.int64)
    labels = (np.arange(n) % 2).astype(np.float32)
    train_epoch(m, torch.optim.SGD(m.parameters(), lr=0.0), dense, cats, labels,
                batch_size=batch, seed=seed)
    assert [len(b) for b in m.seen] == [10] * 6 + [4]
    return [i for b in m.seen for i in b]


def test_train_epoch_visits_every_sample_once_in_a_seeded_random_order():
    a, b, c = _order(0), _order(0), _order(1)
    assert sorted(a) == list(range(64))                 # each sample once
    assert a == b                                       # the seed fixes the order
    assert a != c                                       # another seed, another order
    assert a != list(range(64))                         # shuffled, not the data's order
    assert a == np.random.default_rng(0).permutation(64).tolist()
