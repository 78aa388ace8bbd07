"""The SCMA / LMA signature build on the GPU (hashemb/_gpu/slots.cu lsh_minhash,
lsh_starts): the minimum per (token, minhash function) and, for he.LSHTable,
the run starts, with the CPU build's exact results."""
import numpy as np

from . import _runtime as RT
from ._runtime import i64


CHUNK = 256     # keys per thread; a token with more is split over several


def signatures(probe, ptr, keys, F, slots, be=None):
    """(ids, F) uint32 signatures, or (ids, D/Z) run starts with ``slots``, of
    the tokens whose sample-row keys are ``keys[ptr[i]:ptr[i+1]]`` (host arrays
    in, a host array out: he.LSHTable.fit(..., device="gpu") asked for the copy).

    A token with more than CHUNK keys (a value present in most rows) is split
    into chunks of CHUNK keys, each chunk's minimum taken by its own threads
    and combined by atomic min, so no thread loops over the whole sample."""
    be = be or RT.backend()
    n = ptr.shape[0] - 1
    sig = be.xp.empty(n * F, np.uint32)
    mh, dkeys = be.to_device(probe._lsh["mh"]), be.to_device(keys)
    be.launch("slots", "lsh_minhash", n * F,
              [mh, be.to_device(ptr), dkeys, i64(n), i64(F), i64(CHUNK), sig])
    lens = np.diff(ptr)
    ids = np.flatnonzero(lens > CHUNK)
    if ids.size:
        per = (lens[ids] + CHUNK - 1) // CHUNK
        tok = np.repeat(np.arange(ids.size, dtype=np.int64), per)
        first = np.repeat(np.cumsum(per) - per, per)             # each token's first chunk
        lo = ptr[ids][tok] + (np.arange(tok.size, dtype=np.int64) - first) * CHUNK
        hi = np.minimum(lo + CHUNK, ptr[ids + 1][tok])
        best = be.to_device(np.full(ids.size * F, (1 << 61) - 1, np.uint64))
        be.launch("slots", "lsh_minhash_chunks", tok.size * F,
                  [mh, be.to_device(tok), be.to_device(lo), be.to_device(hi), i64(tok.size),
                   i64(F), dkeys, best])
        be.launch("slots", "lsh_minhash_store", ids.size * F,
                  [best, be.to_device(ids.astype(np.int64)), i64(ids.size), i64(F), sig])
    if not slots:
        return be.to_host(sig).reshape(n, F)
    R = probe.dim // probe.block
    out = be.xp.empty(n * R, np.uint32)
    be.launch("slots", "lsh_starts", n * R, [RT.scheme_struct(be, probe), sig, i64(n), i64(F),
                                              out])
    return be.to_host(out).reshape(n, R)
