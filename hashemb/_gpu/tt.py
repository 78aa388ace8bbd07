"""TT-Rec tables on the GPU (hashemb/_gpu/tt.cu): what hashemb.tt calls for
CuPy arrays. Same arguments, checks and results as the CPU path.

Per table, a batch runs as:

1. the bag checks of every other GPU function (_args.bags: offsets and
   indices checked on the device, one small read back);
2. deduplication: one stable sort of the table's indices gives the distinct
   rows, each entry's row number and the entries of each row in entry order;
3. the chain products of the distinct rows only (tt_step_fwd: each thread a
   tile of one lookup's product, core slices read in place), then pooling
   (tt_pool, entry order: deterministic);
4. backward: unpooling per distinct row (tt_unpool, over chunks of a row's
   entries, atomic or ordered like the slice gradients), the chain
   backward (tt_step_dA), and per core the slice gradients over the lookups
   sorted by digit and cut into chunks (tt_step_dG / tt_rows_dG) added
   atomically, or with ``he.set_gpu_options(deterministic=True)`` written as
   partials and summed in chunk order (tt_combine: the same bits every run);
5. fused SGD / Adagrad: the dense gradient of every core first (from the
   cores as they were), then the rule on the touched slices (tt_apply), so
   the result is the dense gradient followed by the update, as on the CPU.

Everything goes through the backend's ``xp`` and ``launch``, so the tests
run this very code on NumPy arrays with the kernels compiled for the host
(tests/gpu_emu.py).

The LFU cache (a TTCache made with ``like=`` a device array) works on the
distinct rows of step 2: the ones it holds take their cached row instead of a
chain product (and their gradient trains the cache's row, or is returned for
it), the chain runs for the others only. Its frequency table counts on the
device (tt_cache_find / tt_cache_insert) and ``populate`` runs there too.
"""
from collections import namedtuple

import numpy as np

from .. import tt as TT
from ..optim import SGD, check_optimizer
from . import _args as A
from . import _runtime as RT
from ._runtime import i64

# Lookups per chunk of a digit group in the slice-gradient kernels. A chunk
# is one thread's serial loop, so the cap bounds the time a hot digit
# (skewed batches) takes; below the cap the size is chosen so a launch has
# about TARGET_THREADS threads (steps with few output columns, e.g. the last
# core's N = q, would otherwise leave most of an H100 idle), at the price of
# more atomics / partials. An int fixes the size (the tests use 1, 2 and 32).
CHUNK = None
MAX_CHUNK = 32
TARGET_THREADS = 1 << 17
# entries of one distinct row per unpooling thread (a hot row spreads over
# several threads, added atomically or combined in order)
UNPOOL_CHUNK = 32

_Chain = namedtuple("_Chain", "rows dig inputs Y")
# ctx: the chain of the rows not cached; Y: every distinct row's values (U, D);
# hit: None, or (mu, hu, slot): the distinct rows not cached, those cached
# and their cache slots
_GPart = namedtuple("_GPart", "ctx inv order ustart col0 lo hi Y hit")
_HELD = np.int64(0x7FFFFFFFFFFFFFFF)    # tt.cu HE_TT_HELD


def _bags(be, indices, offsets, per_sample_weights, shapes, sizes, mode, T,
          include_last_offset, want_bounds=True):
    """_args.bags (the GPU checks) normalised to the CPU's layout: flat
    feature-major indices, int64 offsets of length T*B+1, flat weights or
    None, and the T+1 table boundaries (None with want_bounds=False: a
    backward given the forward's saved parts, which hold them, and
    check_indices off, which skips comparing them with the saved's)."""
    xp = be.xp
    dtype = shapes[0][1].dtype
    b = A.bags(be, indices, offsets, per_sample_weights, scheme=TT._Sized(sizes),
               mode=TT._check_mode(mode), dtype=dtype, num_tables=T,
               include_last_offset=include_last_offset)
    idx, off, psw = b.idx, b.off, b.psw
    if off is None:                     # 2-D input: (B, N) bags, or (B, T) one per table
        if T == 1:
            idx = idx.reshape(-1)       # A.bags keeps the 2-D input as given
            off = xp.arange(b.B + 1, dtype=np.int64) * np.int64(b.shape[1])
            bounds = [0, b.B * b.shape[1]]
        else:
            off = xp.arange(T * b.B + 1, dtype=np.int64)
            idx = xp.ascontiguousarray(idx.reshape(b.B, T).T).reshape(-1)
            if psw is not None:
                psw = xp.ascontiguousarray(psw.reshape(b.B, T).T).reshape(-1)
            bounds = [t * b.B for t in range(T + 1)]
    elif want_bounds:
        # the T+1 table boundaries, the only values read back (small scalars;
        # 2-D input knows them without a synchronisation)
        bounds = [int(v) for v in be.to_host(off[xp.arange(T + 1, dtype=np.int64) * b.B])]
    else:
        bounds = None
    return idx, off, psw, b.B, b.mode, bounds


def _runs(be, srt, chunk, order=None):
    """(cs, cv, gc, gv, inv) of sorted int64 keys: chunks k of positions
    cs[k] .. cs[k+1]-1 (at most ``chunk``, one key cv[k] each); run g of
    equal keys = chunks gc[g] .. gc[g+1]-1, of key gv[g]; with ``order``
    (the sort's permutation) inv[order[p]] = the run of position p, else
    None. Two launches and one scan (tt_runs_flags / tt_runs_scatter), and
    one read of the two counts."""
    xp = be.xp
    L = srt.shape[0]
    if L >= 1 << 31:
        raise ValueError(f"indices: expected fewer than 2**31 lookups of one table in a batch "
                         f"on the GPU, got {L}")
    flags = xp.empty(L, np.int64)
    be.launch("tt", "tt_runs_flags", L, [srt, i64(L), i64(chunk), flags])
    counts = xp.cumsum(flags)
    last = int(be.to_host(counts[L - 1:])[0]) if L else 0
    nch, ng = last & 0xFFFFFFFF, last >> 32
    buf = (xp.empty if L else xp.zeros)(2 * nch + 2 * ng + 2, np.int64)   # L = 0: cs = gc = [0]
    cs, cv = buf[:nch + 1], buf[nch + 1:2 * nch + 1]
    gc, gv = buf[2 * nch + 1:2 * nch + ng + 2], buf[2 * nch + ng + 2:]
    inv = xp.empty(L, np.int64) if order is not None else None
    be.launch("tt", "tt_runs_scatter", L,
              [srt, flags, counts, i64(L), i64(nch), i64(ng), cs, cv, gc, gv,
               order if order is not None else flags, i64(order is not None),
               inv if inv is not None else flags])
    return cs, cv, gc, gv, inv


def _dedup(be, idx):
    """(rows, inv, order, ustart) of int64 indices (n >= 1): the distinct rows
    (sorted), each entry's row number, the entries sorted stably by row and
    where each row's entries start in that order (U+1 values)."""
    order = be.stable_argsort(idx)
    n = idx.shape[0]
    ustart, rows, _, _, inv = _runs(be, idx[order], n, order)
    return rows, inv, order, ustart


def _chunk(L, per_chunk):
    """Lookups per chunk when a chunk takes per_chunk threads (see CHUNK)."""
    if CHUNK is not None:
        return CHUNK
    return int(min(MAX_CHUNK, max(1, L * per_chunk // TARGET_THREADS)))


def _groups(be, dig, chunk):
    """Lookups grouped by one core's digit: (order, cs, cv, gc, gv) with
    order the lookups sorted stably by digit, chunks k of positions
    cs[k] .. cs[k+1]-1 (at most ``chunk``, one digit cv[k] each), and digit
    group g = chunks gc[g] .. gc[g+1]-1 of slice gv[g] (the touched slices)."""
    order = be.stable_argsort(dig)
    return (order,) + _runs(be, dig[order], chunk)[:4]


def _chain(be, rows, cores, s, save):
    """Forward chain of the distinct rows: Y (L, D) and the step inputs."""
    xp, d, L = be.xp, len(cores), rows.shape[0]
    dig = xp.empty((d, L), np.int64)
    p = list(s.p) + [1] * (4 - d)
    be.launch("tt", "tt_digits", L, [rows, i64(L), i64(d)] + [i64(v) for v in p] + [dig])
    tname = f"tt_step_fwd<{RT.ctype(s.dtype)}>"
    A_, a_idx, gather, Q = cores[0].reshape(-1), dig[0], 1, s.q[0]
    inputs = []
    for c in range(1, d):
        Rk, N = s.R[c], s.q[c] * s.R[c + 1]
        out = xp.empty(L * Q * N, s.dtype)
        nqt = -(-Q // 8)
        be.launch("tt", tname, L * nqt * N,
                  [A_, a_idx, i64(gather), cores[c].reshape(-1), dig[c], i64(L), i64(Q),
                   i64(Rk), i64(N), out])
        inputs.append((A_, a_idx, gather, Q))
        A_, gather, Q = out, 0, Q * s.q[c]
    return _Chain(rows, dig, inputs if save else None, A_.reshape(L, s.D))


def _slice_grad(be, launch, groups, S, grad, det, dtype):
    """Slice gradients of one core (S values a slice) into the zeroed,
    core-sized flat ``grad``. launch(nchunks, atomic, target) runs the chunk
    kernel: atomic adds into grad, or (deterministic) partials per chunk
    summed in chunk order by tt_combine."""
    order, cs, cv, gc, gv = groups
    nch, ng = cs.shape[0] - 1, gv.shape[0]
    if det:
        partial = be.xp.empty(nch * S, dtype)
        launch(nch, 0, partial)
        be.launch("tt", f"tt_combine<{RT.ctype(dtype)}>", ng * S,
                  [partial, gc, gv, i64(ng), i64(S), grad])
    else:
        launch(nch, 1, grad)


def _chain_backward(be, ctx, dY, cores, s, det):
    """Dense gradients of the cores (flat, core-sized) from dY (L, D), and
    the touched slices of each core (gv of _groups)."""
    xp, d, L = be.xp, len(cores), ctx.rows.shape[0]
    R = RT.ctype(s.dtype)
    grads = [xp.zeros(c.size, s.dtype) for c in cores]
    touched = [None] * d
    dC = dY.reshape(-1)
    for c in range(d - 1, 0, -1):
        A_, a_idx, gather, Q = ctx.inputs[c - 1]
        Rk, N = s.R[c], s.q[c] * s.R[c + 1]
        core = cores[c].reshape(-1)
        dA = xp.empty(L * Q * Rk, s.dtype)
        be.launch("tt", f"tt_step_dA<{R}>", L * -(-Q // 8) * Rk,
                  [dC, core, ctx.dig[c], i64(L), i64(Q), i64(Rk), i64(N), dA])
        groups = _groups(be, ctx.dig[c], _chunk(L, -(-Rk // 8) * N))
        order, cs, cv = groups[:3]

        def launch(nch, atomic, target, A_=A_, a_idx=a_idx, gather=gather, Q=Q, Rk=Rk, N=N,
                   dC=dC, order=order, cs=cs, cv=cv):
            be.launch("tt", f"tt_step_dG<{R}>", nch * -(-Rk // 8) * N,
                      [A_, a_idx, i64(gather), dC, order, cs, cv, i64(nch), i64(Q), i64(Rk),
                       i64(N), i64(atomic), target])

        _slice_grad(be, launch, groups, Rk * N, grads[c], det, s.dtype)
        touched[c] = groups[4]
        dC = dA
    S = s.q[0] * s.R[1]
    groups = _groups(be, ctx.dig[0], _chunk(L, S))
    order, cs, cv = groups[:3]

    def launch0(nch, atomic, target):
        be.launch("tt", f"tt_rows_dG<{R}>", nch * S,
                  [dC, order, cs, cv, i64(nch), i64(S), i64(atomic), target])

    _slice_grad(be, launch0, groups, S, grads[0], det, s.dtype)
    touched[0] = groups[4]
    return grads, touched


def _forward(be, idx, off, psw, B, mode, bounds, shapes, caches, out, save):
    """Pool every table's bags into out (B, sum of D); the parts backward needs."""
    xp = be.xp
    parts, col0 = [], 0
    for t, ((cores, s), cache) in enumerate(zip(shapes, caches)):
        lo, hi = bounds[t], bounds[t + 1]
        toff = off[t * B:(t + 1) * B + 1]
        hit = None
        if hi > lo:
            rows, inv, order, ustart = _dedup(be, idx[lo:hi].astype(np.int64))
            if cache is not None and cache.num_cached:
                slot = cache.slots(rows)
                hu = xp.flatnonzero(slot >= 0)
                if hu.shape[0]:
                    hit = (xp.flatnonzero(slot < 0), hu, slot[hu])
            if hit is None:
                ctx = _chain(be, rows, cores, s, save)
                Y = ctx.Y
            else:
                mu, hu, hslot = hit
                ctx = _chain(be, rows[mu], cores, s, save)
                Y = xp.empty((rows.shape[0], s.D), s.dtype)
                Y[mu] = ctx.Y
                Y[hu] = cache.weight[hslot]
        else:
            inv = order = ustart = None
            ctx = _Chain(None, None, None, xp.zeros((1, s.D), s.dtype))
            Y = ctx.Y
        be.launch("tt", f"tt_pool<{RT.ctype(s.dtype)}>", B * s.D,
                  [Y, inv if inv is not None else toff, toff, i64(lo),
                   psw if psw is not None else Y, i64(psw is not None), i64(mode == 1),
                   i64(B), i64(s.D), out, i64(out.shape[1]), i64(col0)])
        parts.append(_GPart(ctx, inv, order, ustart, col0, lo, hi, Y, hit))
        col0 += s.D
    return parts


def _unpool(be, g, part, bag, toff, psw, mode, D, det, dtype):
    """dY (U, D), the gradient of each distinct row, over chunks of at most
    UNPOOL_CHUNK of its entries (tt_unpool)."""
    xp = be.xp
    U = part.ustart.shape[0] - 1
    cs, cu, gc, gu, _ = _runs(be, part.inv[part.order], UNPOOL_CHUNK)
    nch = cs.shape[0] - 1
    head = [g, i64(g.shape[1]), i64(part.col0), part.order, cs, cu, i64(nch), bag, toff,
            i64(part.lo), psw if psw is not None else g, i64(psw is not None),
            i64(mode == 1), i64(D)]
    name = f"tt_unpool<{RT.ctype(dtype)}>"
    if nch == U:                # every row one chunk: written in place, no atomics
        dY = xp.empty(U * D, dtype)
        be.launch("tt", name, nch * D, head + [i64(0), dY])
    elif det:
        partial = xp.empty(nch * D, dtype)
        be.launch("tt", name, nch * D, head + [i64(0), partial])
        dY = xp.empty(U * D, dtype)
        be.launch("tt", f"tt_combine<{RT.ctype(dtype)}>", U * D,
                  [partial, gc, gu, i64(U), i64(D), dY])
    else:
        dY = xp.zeros(U * D, dtype)
        be.launch("tt", name, nch * D, head + [i64(1), dY])
    return dY


def _apply(be, optimizer, cores, grads, touched, dtype):
    """The fused rule on each core's touched slices from its dense gradient."""
    R = RT.ctype(dtype)
    for core, g, gv in zip(cores, grads, touched):
        S = core.size // core.shape[0]
        ng = gv.shape[0]
        if isinstance(optimizer, SGD):
            state, opt, eps = core, 1, 0.0
        else:
            state, opt, eps = optimizer.state_for(core)[0], 2, optimizer.eps
        be.launch("tt", f"tt_apply<{R}>", ng * S,
                  [core.reshape(-1), g, state, gv, i64(ng), i64(S), i64(opt),
                   RT.real(dtype, optimizer.lr), RT.real(dtype, eps)])


def bags(indices, tables, offsets=None, *, mode="sum", per_sample_weights=None,
         include_last_offset=True, num_embeddings=None, cache=None, return_saved=False,
         single=False, be=None):
    """hashemb.tt_embedding_bags (single: tt_embedding_bag, tables = [cores])
    for device arrays."""
    be = be or RT.backend()
    shapes = TT._check_tables(tables, single, be=be)
    with be.device_of(shapes[0][0][0]):
        T = len(shapes)
        sizes = TT._sizes(num_embeddings, shapes)
        caches = TT._caches(cache, T, shapes, be=be)
        idx, off, psw, B, mode_, bounds = _bags(
            be, indices, offsets, per_sample_weights, shapes, sizes, mode, T,
            include_last_offset if T == 1 else True)
        out = be.xp.empty((B, sum(s.D for _, s in shapes)), shapes[0][1].dtype)
        parts = _forward(be, idx, off, psw, B, mode_, bounds, shapes, caches, out,
                         save=return_saved)
        if return_saved:
            return out, TT.TTSaved(parts, B, idx.shape[0], shapes, caches)
        return out


def bags_backward(grad_output, indices, tables, offsets=None, *, mode="sum",
                  per_sample_weights=None, include_last_offset=True, num_embeddings=None,
                  cache=None, saved=None, optimizer=None, single=False, be=None):
    """hashemb.tt_embedding_bags_backward (single: tt_embedding_bag_backward)
    for device arrays."""
    be = be or RT.backend()
    xp = be.xp
    optimizer = check_optimizer(optimizer)
    shapes = TT._check_tables(tables, single, writable=optimizer is not None, be=be)
    with be.device_of(shapes[0][0][0]):
        T = len(shapes)
        sizes = TT._sizes(num_embeddings, shapes)
        caches = TT._caches(cache, T, shapes, be=be)
        dtype = shapes[0][1].dtype
        idx, off, psw, B, mode_, bounds = _bags(
            be, indices, offsets, per_sample_weights, shapes, sizes, mode, T,
            include_last_offset if T == 1 else True,
            want_bounds=saved is None or RT.OPTIONS["check_indices"])
        D = sum(s.D for _, s in shapes)
        g = A.as_grad(be, grad_output, (B, D), dtype)
        if saved is not None:
            parts = TT._check_saved(saved, B, idx.shape[0], shapes, _GPart, bounds, caches)
        else:
            parts = _forward(be, idx, off, psw, B, mode_, bounds, shapes, caches,
                             xp.empty((B, D), dtype), save=True)
        det = bool(RT.OPTIONS["deterministic"])
        results = []
        for t, ((cores, s), cache, part) in enumerate(zip(shapes, caches, parts)):
            n = part.hi - part.lo
            # (with a fused rule the cached rows hit are updated in place: no
            # O(capacity D) zeros a step)
            dcache = None if cache is None or optimizer is not None else \
                xp.zeros_like(cache.weight)
            if n == 0 or B == 0:
                results.append([xp.zeros(c.shape, dtype) for c in cores]
                               + ([dcache] if cache is not None else []))
                continue
            toff = off[t * B:(t + 1) * B + 1]
            bag = xp.empty(n, np.int64)
            be.launch("tt", "tt_bag_of", n, [toff, i64(part.lo), i64(B), i64(n), bag])
            dY = _unpool(be, g, part, bag, toff, psw, mode_, s.D, det, dtype)
            if part.hit is not None:
                # the cached rows' gradients train (or are) the cache's rows:
                # distinct rows, distinct slots
                mu, hu, hslot = part.hit
                dY = dY.reshape(-1, s.D)
                dhit, dY = dY[hu], dY[mu].reshape(-1)
                if optimizer is not None:
                    TT._update_rows(cache.weight, dhit, hslot, optimizer)
                else:
                    dcache[hslot] = dhit
            if part.ctx.rows.shape[0]:
                grads, touched = _chain_backward(be, part.ctx, dY, cores, s, det)
            else:               # every row cached: the cores get no gradient
                grads, touched = [xp.zeros(c.size, dtype) for c in cores], None
            if optimizer is not None:
                if touched is not None:
                    _apply(be, optimizer, cores, grads, touched, dtype)
            else:
                results.append([gr.reshape(c.shape) for gr, c in zip(grads, cores)]
                               + ([dcache] if cache is not None else []))
        return None if optimizer is not None else results


def cache_count(cache, indices, be=None):
    """TTCache.count of a device cache (see tt.cu tt_cache_find): the same
    (row, count) pairs as the CPU's loop, counted in parallel. Two sorts (the
    ids; the new rows by first entry), four launches and one read back (the
    distinct rows' count), plus one for the negative-id check."""
    be = be or RT.backend()
    xp = be.xp
    idx = A.as_keys(be, indices, "indices")
    with be.device_of(cache.keys):
        idx = xp.ascontiguousarray(idx.reshape(-1), np.int64)
        if idx.shape[0] == 0:
            return
        if RT.OPTIONS["check_indices"]:
            low = int(be.to_host(idx.min()))
            if low < 0:
                raise ValueError(f"indices: expected row ids >= 0, got {low}")
        rows, _, order, ustart = _dedup(be, idx)
        U, S = rows.shape[0], cache.keys.shape[0]
        first = xp.empty(U, np.int64)
        be.launch("tt", "tt_cache_find", U,
                  [rows, ustart, order, i64(U), cache.keys, cache.freq, i64(S), first])
        used = cache._used
        if used is None:        # (a moved or loaded cache: counted from its keys)
            used = xp.count_nonzero(cache.keys >= 0)
        used = xp.asarray(used, np.int64).reshape(1)
        # the new rows that fit under the load cap, in order of first entry
        take = xp.minimum(xp.count_nonzero(first != _HELD), cache._limit() - used)
        take = xp.ascontiguousarray(take, np.int64).reshape(1)
        be.launch("tt", "tt_cache_insert", U,
                  [rows, ustart, be.stable_argsort(first), take, i64(U), cache.keys,
                   cache.freq, i64(S)])
        cache._used = used + take       # (on the device: no read back)


def cache_populate(cache, cores, num_embeddings=None, optimizer=None, be=None):
    """TTCache.populate of a device cache: the CPU's selection and slot
    assignment in array operations, new rows from the chain kernels."""
    be = be or RT.backend()
    cores, s, n = cache._populate_args(cores, num_embeddings, optimizer, be=be)
    with be.device_of(cores[0]):
        return cache._populate(be.xp, n, optimizer,
                               lambda rows: _chain(be, rows, cores, s, save=False).Y)


def to_full(cores, num_embeddings=None, be=None):
    """hashemb.tt_to_full for device arrays (the same einsum chain on the device)."""
    be = be or RT.backend()
    cs = TT._as_cores(cores, be=be)[0]
    with be.device_of(cs[0]):
        return TT._to_full(cores, num_embeddings, be.xp, be=be)
