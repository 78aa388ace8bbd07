"""The SCMA / LMA build on the GPU (he.LSHTable.fit / he.LMA.fit with a CuPy X
or ``device="gpu"``) and their token lookups: the distinct sampled (field,
token) pairs numbered by sorting, the minhash per (pair, function) and, for
he.LSHTable, the run starts (hashemb/_gpu/slots.cu lsh_row_keys, lsh_minhash,
lsh_starts, lsh_lookup), with the CPU build's exact results."""
import numpy as np

from .. import _validate as V
from . import _args as A
from . import _runtime as RT
from ._runtime import i64


CHUNK = 256     # keys per thread; a token with more is split over several


def build(probe, Xs, sample, F, slots, be):
    """(fields, tokens, data) on the host: the distinct (field, token) pairs of
    the sampled rows ``Xs`` (device, (n, T) int64 bits) numbered in order of
    first occurrence, row-major, as the CPU's map numbers them, and their
    (pairs, F) uint32 signatures, or (pairs, D/Z) run starts with ``slots``.
    ``sample`` (device int64): the row of X each row of Xs is, whose key the
    minhash takes.

    Two stable sorts put the N = n*T entries in (field, token) order with
    equal pairs in entry order, so each run's first entry is the pair's first
    occurrence; a pair's number is the rank of that entry among the runs'."""
    xp = be.xp
    n, T = Xs.shape
    tok = Xs.reshape(-1)                               # entry p = row * T + field
    by_tok = be.stable_argsort(tok)
    order = by_tok[be.stable_argsort(by_tok % T)]     # by field, then token, then entry
    field, srt = order % T, tok[order]
    new = xp.empty(order.shape[0], bool)
    new[0] = True
    new[1:] = (srt[1:] != srt[:-1]) | (field[1:] != field[:-1])
    starts = xp.flatnonzero(new)
    first = order[starts]                              # each run's first entry
    rank = xp.empty_like(first)
    rank[xp.argsort(first)] = xp.arange(first.shape[0], dtype=np.int64)
    row_keys = xp.empty(n, np.uint64)
    be.launch("slots", "lsh_row_keys", n, [sample, i64(n), np.uint64(probe._salt), row_keys])
    ptr = xp.empty(starts.shape[0] + 1, np.int64)
    ptr[:-1], ptr[-1] = starts, order.shape[0]
    by_run = signatures(probe, ptr, row_keys[order // T], F, slots, be)
    data = xp.empty_like(by_run)
    data[rank] = by_run
    firsts = xp.sort(first)
    return (be.to_host((firsts % T).astype(np.int32)), be.to_host(tok[firsts]).view(np.uint64),
            be.to_host(data))


def signatures(probe, ptr, keys, F, slots, be):
    """(ids, F) uint32 signatures, or (ids, D/Z) run starts with ``slots``, of
    the pairs whose sample-row keys are ``keys[ptr[i]:ptr[i+1]]`` (device
    arrays in and out).

    A pair with more than CHUNK keys (a value present in most rows) is split
    into chunks of CHUNK keys, each chunk's minimum taken by its own threads
    and combined by atomic min, so no thread loops over the whole sample."""
    xp = be.xp
    n = ptr.shape[0] - 1
    sig = xp.empty(n * F, np.uint32)
    mh = be.to_device(probe._lsh["mh"])
    be.launch("slots", "lsh_minhash", n * F, [mh, ptr, keys, i64(n), i64(F), i64(CHUNK), sig])
    long_ = xp.flatnonzero(ptr[1:] - ptr[:-1] > CHUNK)
    if long_.shape[0]:
        # the few long pairs' chunk table, built on the host from their bounds
        ids = be.to_host(long_)
        lo0, hi0 = be.to_host(ptr[long_]), be.to_host(ptr[long_ + 1])
        per = (hi0 - lo0 + CHUNK - 1) // CHUNK
        tok = np.repeat(np.arange(ids.size, dtype=np.int64), per)
        first = np.repeat(np.cumsum(per) - per, per)             # each pair's first chunk
        lo = lo0[tok] + (np.arange(tok.size, dtype=np.int64) - first) * CHUNK
        hi = np.minimum(lo + CHUNK, hi0[tok])
        best = xp.full(ids.size * F, (1 << 61) - 1, np.uint64)
        be.launch("slots", "lsh_minhash_chunks", tok.size * F,
                  [mh, be.to_device(tok), be.to_device(lo), be.to_device(hi), i64(tok.size),
                   i64(F), keys, best])
        be.launch("slots", "lsh_minhash_store", ids.size * F,
                  [best, long_.astype(np.int64), i64(ids.size), i64(F), sig])
    if not slots:
        return sig.reshape(n, F)
    R = probe.dim // probe.block
    out = xp.empty(n * R, np.uint32)
    be.launch("slots", "lsh_starts", n * R, [RT.scheme_struct(be, probe), sig, i64(n), i64(F),
                                              out])
    return out.reshape(n, R)


def lookup_ids(scheme, tokens, table, be=None):
    """scheme.lookup_ids(tokens, table) for a device array: int64, -1 where absent."""
    be = be or RT.backend()
    A.as_array(be, tokens, "tokens")
    with be.device_of(tokens):
        idx = A.as_keys(be, tokens, "tokens")
        table = V.check_table(table, scheme)
        out = be.xp.empty(idx.shape, np.int64)
        flat = idx.reshape(-1)
        be.launch("slots", f"lsh_lookup<{RT.ctype(flat.dtype)}>", flat.shape[0],
                  [RT.scheme_struct(be, scheme), flat, i64(flat.shape[0]), i64(table),
                   out.reshape(-1)])
        return out
