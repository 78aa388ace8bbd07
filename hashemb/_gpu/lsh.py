"""The SCMA / LMA signature build on the GPU (hashemb/_gpu/slots.cu lsh_minhash,
lsh_starts): the minimum per (token, minhash function) and, for he.LSHTable,
the run starts, with the CPU build's exact results."""
import numpy as np

from . import _runtime as RT
from ._runtime import i64


def signatures(probe, ptr, keys, F, slots, be=None):
    """(ids, F) uint32 signatures, or (ids, D/Z) run starts with ``slots``, of
    the tokens whose sample-row keys are ``keys[ptr[i]:ptr[i+1]]`` (host arrays
    in, a host array out: he.LSHTable.fit(..., device="gpu") asked for the copy)."""
    be = be or RT.backend()
    n = ptr.shape[0] - 1
    sig = be.xp.empty(n * F, np.uint32)
    be.launch("slots", "lsh_minhash", n * F,
              [be.to_device(probe._lsh["mh"]), be.to_device(ptr), be.to_device(keys),
               i64(n), i64(F), sig])
    if not slots:
        return be.to_host(sig).reshape(n, F)
    R = probe.dim // probe.block
    out = be.xp.empty(n * R, np.uint32)
    be.launch("slots", "lsh_starts", n * R, [RT.scheme_struct(be, probe), sig, i64(n), i64(F),
                                              out])
    return be.to_host(out).reshape(n, R)
