"""Data-parallel DLRM training with torch.distributed (DDP).

At 1000x compression the whole embedding array fits on every worker, so pure
data parallelism replaces the model parallelism that full tables need: each
worker holds a full replica (array + MLPs), trains on its shard of the global
batch, and DDP averages every gradient, the array's included (the array gets a
plain dense gradient here, not a fused update, so that DDP can all-reduce it).

Launch (gloo on CPU; with ``HASHEMB_NCCL=1`` and CUDA, NCCL, each worker's
replica on GPU ``LOCAL_RANK``, running the CuPy kernels)::

    torchrun --nproc_per_node 2 -m hashemb.torch.ddp --steps 50
"""
import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import _validate as V
from .dlrm import DLRM
from .modules import RobeEmbeddingBagCollection


def build_model(cardinalities, num_dense=13, compression=1000.0, block=16, seed=0,
                bottom=(512, 256, 64), top=(512, 256)):
    """A DLRM over a ROBE-Z collection whose array takes dense gradients."""
    emb = RobeEmbeddingBagCollection(cardinalities, 16, compression=compression, block=block,
                                     seed=seed, init_seed=seed)
    return DLRM(emb, len(cardinalities), num_dense=num_dense, bottom=bottom, top=top,
                seed=seed)


def train_steps(model, batches, lr, rank=0, world=1):
    """SGD on ``batches`` (an iterable of (dense, cats, labels) numpy arrays of
    the GLOBAL batch); worker ``rank`` of ``world`` takes its contiguous shard.
    Each worker differentiates its shard's summed loss times ``world / n`` (n
    the global batch), so DDP's gradient average equals the gradient of the
    mean over the global batch, shards of unequal size included (a batch
    that ``world`` does not divide: averaging the shards' means weighted
    their samples unequally). Returns each step's mean loss over the shard."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    dev = next(model.parameters()).device
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    model.train()
    losses = []
    for dense, cats, labels in batches:
        n = len(labels)
        lo, hi = rank * n // world, (rank + 1) * n // world
        d = torch.from_numpy(np.ascontiguousarray(dense[lo:hi], np.float32)).to(dev)
        c = torch.from_numpy(np.ascontiguousarray(cats[lo:hi])).to(dev)
        y = torch.from_numpy(np.ascontiguousarray(labels[lo:hi], np.float32)).to(dev)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(d, c), y)
        (loss * (world / n)).backward()
        opt.step()
        losses.append(loss.item() / max(hi - lo, 1))
    return losses


def synthetic_batches(steps, batch_size, scale=0.001, seed=0):
    """The same global batches on every worker (each takes its own shard)."""
    from ..data import SyntheticCriteo
    gen = SyntheticCriteo(scale=scale, seed=seed)
    for s in range(steps):
        b = gen.sample(s * batch_size, batch_size)
        yield b.dense, b.cats, b.labels


def main(argv=None):
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m hashemb.torch.ddp",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # checked here (a 0 step count or batch once failed with an IndexError or
    # ZeroDivisionError after the process group had started)
    p.add_argument("--steps", type=V.cli_number(int), default=50)
    p.add_argument("--batch-size", type=V.cli_number(int), default=2048, help="global batch")
    p.add_argument("--lr", type=V.cli_number(float), default=0.5)
    p.add_argument("--scale", type=V.cli_number(float, high=1.0), default=0.01)
    p.add_argument("--compression", type=V.cli_number(float), default=1000.0)
    p.add_argument("--seed", type=V.cli_number(int, high=2**64 - 1, closed=True), default=0)
    p.add_argument("--save", default=None,
                   help="every rank saves its replica's state_dict here ({rank} is replaced)")
    args = p.parse_args(argv)
    nccl = torch.cuda.is_available() and os.environ.get("HASHEMB_NCCL", "0") not in ("", "0")
    dist.init_process_group("nccl" if nccl else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from ..data import SyntheticCriteo
    card = SyntheticCriteo(scale=args.scale, seed=args.seed).cardinalities
    model = build_model(card, compression=args.compression, seed=args.seed)
    if nccl:        # NCCL reduces CUDA tensors only: the replica on this worker's GPU
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        model = nn.parallel.DistributedDataParallel(model.cuda(local), device_ids=[local])
    else:
        model = nn.parallel.DistributedDataParallel(model)
    losses = train_steps(model, synthetic_batches(args.steps, args.batch_size, args.scale,
                                                  args.seed), args.lr, rank, world)
    if rank == 0:
        print(f"{world} workers, {args.steps} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if args.save:
        torch.save(model.module.state_dict(), args.save.format(rank=rank))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
