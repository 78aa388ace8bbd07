"""Plug a compressed embedding into your own PyTorch model.

A small click model (the 26 categorical fields embedded, concatenated with the
13 dense features, then an MLP) trained on the synthetic Criteo-shaped log
with three embeddings: full ``nn.EmbeddingBag`` tables, and ROBE-Z arrays at
100x and 1000x fewer floats. It shows the pieces your own model needs:

- the collection module (one array, one kernel call for all 26 tables);
- a fused optimizer: the array is updated inside backward (here Adagrad), so
  the torch optimizer gets only :func:`hashemb.torch.dense_parameters`;
- ``state_dict`` save / load: a model built with another seed gives the same
  outputs bit for bit once loaded (the hash seeds travel in the state);
- ``memory_bytes`` of each embedding.

    python examples/own_model.py                    # about 20 s on 2 cores
    python examples/own_model.py --samples 20000 --epochs 2 --out /tmp/m.png

Prints a table and writes a PNG (test AUC per epoch; embedding memory: the
weights and their Adagrad state, counted alike for every embedding); the
default PNG is docs/own_model.png of this repository, from any folder.
"""
import argparse
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from hashemb._validate import cli_folder
from hashemb.data import SyntheticCriteo
from hashemb.torch import (RobeEmbeddingBagCollection, TorchEmbeddingBagCollection,
                           dense_parameters, evaluate)

D = 16
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "own_model.png"
# torch's sparse Adagrad (the full table's) warns about its own invariant checks
warnings.filterwarnings("ignore", message="Sparse invariant checks")


class ClickModel(nn.Module):
    """Embeddings of every field, concatenated with the dense features, into
    an MLP; returns logits. ``embedding`` maps (B, T) tokens to (B, T*D)."""

    def __init__(self, embedding, num_tables, num_dense, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = embedding
        self.mlp = nn.Sequential(nn.Linear(num_tables * D + num_dense, 128), nn.ReLU(),
                                 nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, dense, cats):
        return self.mlp(torch.cat([self.embedding(cats), dense], dim=1)).squeeze(1)


def make(kind, card, seed=0):
    """The model and its torch optimizer: the MLP by Adam; a full table by
    torch's Adagrad (sparse gradients); a ROBE-Z array by hashemb's fused
    Adagrad inside backward, so it is left out of the torch optimizer."""
    if kind == "full":
        emb = TorchEmbeddingBagCollection(card, D, sparse=True, seed=seed)
    else:
        emb = RobeEmbeddingBagCollection(card, D, compression=float(kind), block=D,
                                         optimizer="adagrad", lr=0.05, seed=seed,
                                         init_seed=seed)
    model = ClickModel(emb, len(card), 13, seed=seed)
    opts = [torch.optim.Adam(model.mlp.parameters(), lr=1e-3)]
    if kind == "full":
        opts.append(torch.optim.Adagrad(emb.parameters(), lr=0.05))
    assert {id(p) for p in dense_parameters(model)} == \
        {id(p) for o in opts for g in o.param_groups for p in g["params"]}
    return model, opts


def tensors(batch):
    return (torch.from_numpy(np.ascontiguousarray(batch.dense, np.float32)),
            torch.from_numpy(np.ascontiguousarray(batch.cats)),
            torch.from_numpy(np.ascontiguousarray(batch.labels, np.float32)))


def train(kind, tr, te, card, epochs, batch, progress=True):
    model, opts = make(kind, card)
    d, c, y = tensors(tr)
    loss_fn = nn.BCEWithLogitsLoss()
    aucs = []
    rng = np.random.default_rng(0)
    with tqdm(total=epochs * len(y), desc=f"{kind}", unit="sample", unit_scale=True,
              leave=False, disable=not progress) as bar:
        for _ in range(epochs):
            model.train()
            order = torch.from_numpy(rng.permutation(len(y)))
            for lo in range(0, len(y), batch):
                sel = order[lo:lo + batch]
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss_fn(model(d[sel], c[sel]), y[sel]).backward()
                for o in opts:
                    o.step()
                bar.update(len(sel))
            aucs.append(evaluate(model, te.dense, te.cats, te.labels)["auc"])
    return model, aucs, embedding_memory(model, opts)


def embedding_memory(model, opts):
    """Bytes of the embedding's weights and their optimizer state, counted
    alike: ``memory_bytes()`` holds a ROBE-Z array and hashemb's fused
    Adagrad accumulator (one float per array float), to which the state the
    torch optimizers keep for the embedding's parameters is added (the full
    tables' Adagrad ``state_sum``, one float per weight, and its step)."""
    n = model.embedding.memory_bytes()
    mine = {id(p) for p in model.embedding.parameters()}
    for o in opts:
        for p, state in o.state.items():
            if id(p) in mine:
                n += sum(t.numel() * t.element_size() for t in state.values()
                         if torch.is_tensor(t))
    return n


def round_trip(model, kind, card, dense, cats):
    """Save the state, load it into a model built with another seed: the
    outputs must be the same bits."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other, _ = make(kind, card, seed=123)
    other.load_state_dict(torch.load(buf, weights_only=True))
    model.eval()
    other.eval()
    with torch.no_grad():
        return bool(torch.equal(model(dense, cats), other(dense, cats)))


def plot(results, path, title):
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for r in results:
        ax1.plot(range(1, len(r["aucs"]) + 1), r["aucs"], marker="o", label=r["label"])
    ax1.set_xticks(range(1, len(results[0]["aucs"]) + 1))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test AUC")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("test AUC per epoch", fontsize=9)
    names = [r["label"] for r in results]
    mb = [r["memory_mb"] for r in results]
    ax2.barh(names, mb, color=["tab:gray"] + ["tab:blue"] * (len(names) - 1))
    for i, v in enumerate(mb):
        ax2.text(v, i, f" {v:,.3f} MB", va="center", fontsize=8)
    ax2.set_xscale("log")
    ax2.set_xlim(right=max(mb) * 30)
    ax2.set_xlabel("embedding memory: weights + Adagrad state (MB, log scale)")
    ax2.set_title("memory (weights + optimizer state)", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=0.01,
                   help="Criteo Kaggle cardinalities times this (default 0.01: 337,712 rows)")
    p.add_argument("--samples", type=int, default=100_000, help="training samples")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the PNG (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cli_folder(p, Path(args.out).parent)   # before any work
    gen = SyntheticCriteo(scale=args.scale, seed=0)
    tr = gen.sample(0, args.samples, "train")
    te = gen.sample(0, max(args.samples // 5, 1000), "test")
    card = gen.cardinalities
    dt, ct, _ = tensors(te)
    results = []
    for kind, label in (("full", "full nn.EmbeddingBag"), ("100", "ROBE-Z 100x"),
                        ("1000", "ROBE-Z 1000x")):
        model, aucs, nbytes = train(kind, tr, te, card, args.epochs, args.batch,
                                    not args.no_progress)
        results.append({"kind": kind, "label": label, "aucs": aucs,
                        # weights + Adagrad state, for every embedding alike
                        "memory_mb": nbytes / 2 ** 20,
                        "same_after_load": round_trip(model, kind, card, dt[:256], ct[:256])})
    title = (f"own model on synthetic Criteo-shaped data, scale {args.scale:g} "
             f"({sum(card):,} rows), {args.samples:,} samples, {args.epochs} epochs")
    print(title)
    print("| embedding | memory MB (weights + Adagrad state) | test AUC per epoch | "
          "state_dict round trip |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['memory_mb']:,.3f} | "
              f"{' / '.join(f'{a:.4f}' for a in r['aucs'])} | "
              f"{'same bits' if r['same_after_load'] else 'DIFFERENT'} |")
    plot(results, args.out, title)
    print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
