/*
 * hashemb/_gpu/tt.cu -- tensor-train (TT-Rec) tables: the chain products of
 * the distinct rows of a batch, bag pooling and unpooling, the core-slice
 * gradients and the fused SGD / Adagrad step (launchers: hashemb/_gpu/tt.py).
 *
 * Layout (hashemb/tt.py): core c is (p_c, R_c, q_c, R_c+1) row-major; its
 * slice v is the matrix G_c[v] of R_c rows by N = q_c R_c+1 columns. A chain
 * step maps A[l] (Q, R_c) to out[l] = A[l] G_c[x_l,c] (Q, N), seen next as
 * (Q q_c, R_c+1). The lookups l are the distinct rows of the batch.
 *
 * The products are tiny (R, N <= a few hundred) and each lookup picks its own
 * core slice, so instead of gathering L slices into an (L, R, N) temporary
 * for a batched GEMM (R/Q times the output's bytes), every thread computes a
 * tile of HE_TT_TILE outputs of one lookup, reading the slice straight from
 * the core (a few MB: it stays in L2) -- one coalesced core load feeds a tile
 * of multiply-adds, the A values are warp-wide broadcasts. Independent
 * threads only (common.cuh), so tests/gpu_emu runs these on the host.
 *
 * Slice gradients: the lookups are sorted by digit and cut into chunks of at
 * most `chunk` lookups inside one digit group; a thread sums one element of
 * one chunk's A^T dC, then either adds it to the gradient atomically or
 * writes it to a partial buffer that tt_combine sums in chunk order
 * (deterministic: the same bits on every run).
 */
#ifndef HASHEMB_GPU_COMMON_H
#include "common.cuh"
#endif

/* outputs a thread keeps in registers */
#define HE_TT_TILE 8

/* acc[i] += x[i * stride] * c for the first `valid` outputs of a tile: the
 * inner step of the three tiled products (forward, dA, dG) */
template <typename R>
__device__ __forceinline__ void he_tt_tile_fma(R* acc, const R* x, i64 stride, i64 valid, R c)
{
    for (int i = 0; i < HE_TT_TILE; i++)
        if (i < valid)
            acc[i] += x[i * stride] * c;
}

/* Thread t's tile in a launch of outer x ceil(rows / HE_TT_TILE) x cols
 * threads (the order the launchers size them): which outer item, the first
 * of its (at most HE_TT_TILE) rows, how many, and the column. False past the
 * end of the launch. */
struct he_tt_tile {
    i64 outer, row0, rows, col;
};

__device__ __forceinline__ bool he_tt_tile_of(i64 t, i64 outer, i64 rows, i64 cols,
                                              he_tt_tile* p)
{
    const i64 ntiles = (rows + HE_TT_TILE - 1) / HE_TT_TILE;
    if (t >= outer * ntiles * cols)
        return false;
    const i64 rest = t / cols;
    p->col = t % cols;
    p->row0 = (rest % ntiles) * HE_TT_TILE;
    p->outer = rest / ntiles;
    p->rows = rows - p->row0 < HE_TT_TILE ? rows - p->row0 : HE_TT_TILE;
    return true;
}

/* o[i * stride] = acc[i] (or added atomically) for the first `valid` outputs */
template <typename R>
__device__ __forceinline__ void he_tt_tile_store(R* o, i64 stride, const R* acc, i64 valid,
                                                 i64 atomic)
{
    for (int i = 0; i < HE_TT_TILE; i++) {
        if (i >= valid)
            break;
        if (atomic)
            he_atomic_add(o + i * stride, acc[i]);
        else
            o[i * stride] = acc[i];
    }
}

/*
 * Mixed-radix digits, most significant first: dig[k*L + l] = digit k of
 * rows[l] for the d <= 4 factors p0..p3.
 */
__global__ void tt_digits(const int64_t* __restrict__ rows, i64 L, i64 d, i64 p0, i64 p1, i64 p2,
                          i64 p3, int64_t* __restrict__ dig)
{
    const i64 l = he_tid();
    if (l >= L)
        return;
    const i64 p[4] = {p0, p1, p2, p3};
    i64 x = rows[l];
    for (i64 k = d - 1; k >= 0; k--) {
        dig[k * L + l] = x % p[k];
        x /= p[k];
    }
}

/*
 * One chain step: out[l] (Q, N) = A[l] (Q, Rk) @ core[v] (Rk, N), v = dig[l].
 * A[l] starts at row(l) * Q * Rk with row(l) = a_idx[l] (a_gather: the first
 * step reads core 0's slices in place) or l. Thread: (l, tile of rows i, n).
 */
template <typename R>
__global__ void tt_step_fwd(const R* __restrict__ A, const int64_t* __restrict__ a_idx,
                            i64 a_gather, const R* __restrict__ core,
                            const int64_t* __restrict__ dig, i64 L, i64 Q, i64 Rk, i64 N,
                            R* __restrict__ out)
{
    he_tt_tile p;
    if (!he_tt_tile_of(he_tid(), L, Q, N, &p))
        return;
    const i64 l = p.outer, i0 = p.row0, ni = p.rows, n = p.col;
    const R* a = A + (a_gather ? a_idx[l] : l) * Q * Rk + i0 * Rk;
    const R* g = core + dig[l] * Rk * N + n;
    R acc[HE_TT_TILE];
    for (int i = 0; i < HE_TT_TILE; i++)
        acc[i] = 0;
    for (i64 r = 0; r < Rk; r++)
        he_tt_tile_fma(acc, a + r, Rk, ni, g[r * N]);
    he_tt_tile_store(out + (l * Q + i0) * N + n, N, acc, ni, 0);
}

/*
 * Backward of a step to its input: dA[l] (Q, Rk) = dC[l] (Q, N) @ core[v]^T.
 * Thread: (l, tile of rows i, r).
 */
template <typename R>
__global__ void tt_step_dA(const R* __restrict__ dC, const R* __restrict__ core,
                           const int64_t* __restrict__ dig, i64 L, i64 Q, i64 Rk, i64 N,
                           R* __restrict__ dA)
{
    he_tt_tile p;
    if (!he_tt_tile_of(he_tid(), L, Q, Rk, &p))
        return;
    const i64 l = p.outer, i0 = p.row0, ni = p.rows, r = p.col;
    const R* d = dC + (l * Q + i0) * N;
    const R* g = core + (dig[l] * Rk + r) * N;
    R acc[HE_TT_TILE];
    for (int i = 0; i < HE_TT_TILE; i++)
        acc[i] = 0;
    for (i64 n = 0; n < N; n++)
        he_tt_tile_fma(acc, d + n, N, ni, g[n]);
    he_tt_tile_store(dA + (l * Q + i0) * Rk + r, Rk, acc, ni, 0);
}

/*
 * Slice gradient of one chunk of lookups (sorted positions cs[k] .. cs[k+1]-1
 * of `order`, all of digit cv[k]): sum over them of A[l]^T dC[l], element
 * (r, n) of the (Rk, N) slice. Thread: (chunk k, tile of r, n). atomic: add
 * to grad[cv[k]] (the core-shaped gradient); else write partial[k] for
 * tt_combine. (Core 0 has no A: tt_rows_dG.)
 */
template <typename R>
__global__ void tt_step_dG(const R* __restrict__ A, const int64_t* __restrict__ a_idx,
                           i64 a_gather, const R* __restrict__ dC,
                           const int64_t* __restrict__ order, const int64_t* __restrict__ cs,
                           const int64_t* __restrict__ cv, i64 nchunks, i64 Q, i64 Rk, i64 N,
                           i64 atomic, R* __restrict__ target)
{
    he_tt_tile p;
    if (!he_tt_tile_of(he_tid(), nchunks, Rk, N, &p))
        return;
    const i64 k = p.outer, r0 = p.row0, nr = p.rows, n = p.col;
    R acc[HE_TT_TILE];
    for (int r = 0; r < HE_TT_TILE; r++)
        acc[r] = 0;
    for (i64 j = cs[k]; j < cs[k + 1]; j++) {
        const i64 l = order[j];
        const R* a = A + (a_gather ? a_idx[l] : l) * Q * Rk + r0;
        const R* d = dC + l * Q * N + n;
        for (i64 i = 0; i < Q; i++)
            he_tt_tile_fma(acc, a + i * Rk, 1, nr, d[i * N]);
    }
    he_tt_tile_store(target + (atomic ? cv[k] : k) * Rk * N + r0 * N + n, N, acc, nr, atomic);
}

/*
 * Core 0's slice gradient: the sum of dT[l] (S = q_0 R_1 values) over a
 * chunk's lookups. Thread: (chunk k, s); atomic or partial as tt_step_dG.
 */
template <typename R>
__global__ void tt_rows_dG(const R* __restrict__ dT, const int64_t* __restrict__ order,
                           const int64_t* __restrict__ cs, const int64_t* __restrict__ cv,
                           i64 nchunks, i64 S, i64 atomic, R* __restrict__ target)
{
    const i64 t = he_tid();
    if (t >= nchunks * S)
        return;
    const i64 s = t % S, k = t / S;
    R acc = 0;
    for (i64 j = cs[k]; j < cs[k + 1]; j++)
        acc += dT[order[j] * S + s];
    if (atomic)
        he_atomic_add(target + cv[k] * S + s, acc);
    else
        target[k * S + s] = acc;
}

/*
 * Deterministic gradient: digit group g owns chunks gc[g] .. gc[g+1]-1; its
 * slice gv[g] of grad is the sum of their partials, in chunk order.
 */
template <typename R>
__global__ void tt_combine(const R* __restrict__ partial, const int64_t* __restrict__ gc,
                           const int64_t* __restrict__ gv, i64 ngroups, i64 S,
                           R* __restrict__ grad)
{
    const i64 t = he_tid();
    if (t >= ngroups * S)
        return;
    const i64 s = t % S, g = t / S;
    R acc = 0;
    for (i64 k = gc[g]; k < gc[g + 1]; k++)
        acc += partial[k * S + s];
    grad[gv[g] * S + s] = acc;
}

/*
 * The fused rule on the touched slices gv[0..ngroups-1] (S values each) from
 * their complete gradient: opt 1 SGD w -= lr g; opt 2 Adagrad (he_apply,
 * the CPU's arithmetic). Untouched slices keep their values and state.
 */
template <typename R>
__global__ void tt_apply(R* __restrict__ w, const R* __restrict__ grad, R* __restrict__ state,
                         const int64_t* __restrict__ gv, i64 ngroups, i64 S, i64 opt, R lr, R eps)
{
    const i64 t = he_tid();
    if (t >= ngroups * S)
        return;
    const i64 e = gv[t / S] * S + t % S;
    const R g = grad[e];
    if (opt == 1)
        w[e] -= lr * g;
    else
        he_apply(w, state, e, g, lr, eps, 1, 0);
}

/*
 * Pool: out[b, col0 + i] (row stride ldo) = sum over the entries n of bag b
 * (off[b] .. off[b+1]-1, positions in the flat batch) of w_n Y[inv[n - base], i],
 * w_n = psw[n] (has_w), 1/|bag| (mean) or 1; entry order, as the CPU's pool.
 * Thread: (b, i). Empty bags give 0.
 */
template <typename R>
__global__ void tt_pool(const R* __restrict__ Y, const int64_t* __restrict__ inv,
                        const int64_t* __restrict__ off, i64 base, const R* __restrict__ psw,
                        i64 has_w, i64 mean, i64 B, i64 D, R* __restrict__ out, i64 ldo, i64 col0)
{
    const i64 t = he_tid();
    if (t >= B * D)
        return;
    const i64 i = t % D, b = t / D;
    const i64 j0 = off[b], j1 = off[b + 1];
    const R scale = (R)1 / (R)(j1 - j0);
    R acc = 0;
    for (i64 j = j0; j < j1; j++) {
        const R w = has_w ? psw[j] : (mean ? scale : (R)1);
        acc += w * Y[inv[j - base] * D + i];
    }
    out[b * ldo + col0 + i] = acc;
}

/* bag[e] = the bag b of entry j = base + e, off[b] <= j < off[b + 1] (thread:
 * one entry, a binary search: a bag of a million entries is not one thread's
 * loop). */
__global__ void tt_bag_of(const int64_t* __restrict__ off, i64 base, i64 B, i64 n,
                          int64_t* __restrict__ bag)
{
    const i64 e = he_tid();
    if (e >= n)
        return;
    bag[e] = he_last_le(off, 1, B, base + e);
}

/*
 * Unpool: the gradient of each distinct row u is the sum over its entries n
 * (relative to base) of w_n g[bag[n], col0 + i] (row stride ldg). The
 * entries sorted by row (`order`) are cut into chunks k of positions
 * cs[k] .. cs[k+1]-1, all of row cu[k], at most a few each, so a row looked
 * up thousands of times (skewed batches) is not one thread's serial loop.
 * Thread: (k, i), summing in entry order; atomic: add to target[cu[k]]
 * (dY, zeroed), else write target[k] (dY itself when every row is one
 * chunk, else partials for tt_combine).
 */
template <typename R>
__global__ void tt_unpool(const R* __restrict__ g, i64 ldg, i64 col0,
                          const int64_t* __restrict__ order, const int64_t* __restrict__ cs,
                          const int64_t* __restrict__ cu, i64 nch,
                          const int64_t* __restrict__ bag, const int64_t* __restrict__ off,
                          i64 base, const R* __restrict__ psw, i64 has_w, i64 mean, i64 D,
                          i64 atomic, R* __restrict__ target)
{
    const i64 t = he_tid();
    if (t >= nch * D)
        return;
    const i64 i = t % D, k = t / D;
    R acc = 0;
    for (i64 j = cs[k]; j < cs[k + 1]; j++) {
        const i64 n = order[j], b = bag[n];
        const R w = has_w ? psw[n + base] : (mean ? (R)1 / (R)(off[b + 1] - off[b]) : (R)1);
        acc += w * g[b * ldg + col0 + i];
    }
    if (atomic)
        he_atomic_add(target + cu[k] * D + i, acc);
    else
        target[k * D + i] = acc;
}

/*
 * Runs of equal keys in sorted keys srt[0 .. L), each cut into chunks of at
 * most `chunk` positions (hashemb/_gpu/tt.py _runs): the deduplication of a
 * table's indices (chunk >= L: one chunk a run) and the chunks of the
 * digit groups and of unpooling. Two launches around one scan:
 *   tt_runs_flags: flags[p] = (p starts a chunk) + ((p starts a run) << 32);
 *   (an inclusive cumsum of flags: chunk count below bit 32, run count above)
 *   tt_runs_scatter: chunk c starts at cs[c] with key cv[c]; run g is chunks
 *   gc[g] .. gc[g+1]-1 of key gv[g]; cs[nch] = L, gc[ng] = nch; with `order`
 *   (the sort's permutation) inv[order[p]] = run of position p.
 * A run start always starts a chunk, and counts stay below 2^32 (L < 2^31).
 */
__global__ void tt_runs_flags(const int64_t* __restrict__ srt, i64 L, i64 chunk,
                              int64_t* __restrict__ flags)
{
    const i64 p = he_tid();
    if (p >= L)
        return;
    i64 lo = 0, hi = p;                  /* first position of srt[p]'s run */
    while (lo < hi) {
        const i64 mid = (lo + hi) >> 1;
        if (srt[mid] < srt[p])
            lo = mid + 1;
        else
            hi = mid;
    }
    flags[p] = (i64)((p - lo) % chunk == 0) + ((i64)(lo == p) << 32);
}

__global__ void tt_runs_scatter(const int64_t* __restrict__ srt,
                                const int64_t* __restrict__ flags,
                                const int64_t* __restrict__ counts, i64 L, i64 nch, i64 ng,
                                int64_t* __restrict__ cs, int64_t* __restrict__ cv,
                                int64_t* __restrict__ gc, int64_t* __restrict__ gv,
                                const int64_t* __restrict__ order, i64 use_order,
                                int64_t* __restrict__ inv)
{
    const i64 p = he_tid();
    if (p >= L)
        return;
    const i64 f = flags[p], n = counts[p];
    const i64 c = (n & 0xFFFFFFFFLL) - 1, g = (n >> 32) - 1;
    if (f & 0xFFFFFFFFLL) {
        cs[c] = p;
        cv[c] = srt[p];
    }
    if (f >> 32) {
        gc[g] = c;
        gv[g] = srt[p];
    }
    if (use_order)
        inv[order[p]] = g;
    if (p == 0) {
        cs[nch] = L;
        gc[ng] = nch;
    }
}

/*
 * The LFU cache's frequency table (hashemb.TTCache: keys -1 = empty, linear
 * probing from he_mix64(row) mod S, as the CPU's count). A batch's distinct
 * rows rows[g] (sorted; entries ustart[g] .. ustart[g+1]-1 of the sort
 * `order`) are counted in two launches, so that what is counted is what the
 * CPU's one-by-one loop counts:
 *   tt_cache_find: a row held adds its count to its slot (distinct rows:
 *     distinct slots, no atomics) and writes first[g] = HE_TT_HELD; a row
 *     not held writes its first entry's position (the stable sort's first).
 *     A negative id (check_indices off) counts nowhere and takes no room:
 *     written HE_TT_HELD, as if held.
 *   tt_cache_insert: thread i < take[0] inserts the row byfirst[i] (the
 *     rows in order of first entry, held ones last), claiming an empty slot
 *     with atomicCAS, with its count. take[0] = min(new rows, room under the
 *     load cap): the rows the CPU inserts are the first new ones in entry
 *     order, and a row it cannot insert is not counted at all.
 * Which slot a row lands in may differ from the CPU's (insertion order); the
 * (row, count) pairs are the same.
 */
#define HE_TT_HELD 0x7fffffffffffffffLL

__global__ void tt_cache_find(const int64_t* __restrict__ rows,
                              const int64_t* __restrict__ ustart,
                              const int64_t* __restrict__ order, i64 U,
                              const int64_t* __restrict__ keys, int64_t* __restrict__ freq,
                              i64 S, int64_t* __restrict__ first)
{
    const i64 g = he_tid();
    if (g >= U)
        return;
    const i64 x = rows[g];
    if (x < 0) {
        first[g] = HE_TT_HELD;
        return;
    }
    i64 j = (i64)(he_mix64((uint64_t)x) % (uint64_t)S);
    for (i64 probe = 0; probe < S; probe++) {
        const i64 k = keys[j];
        if (k == x) {
            freq[j] += ustart[g + 1] - ustart[g];
            first[g] = HE_TT_HELD;
            return;
        }
        if (k == -1)
            break;
        if (++j == S)
            j = 0;
    }
    first[g] = order[ustart[g]];
}

__global__ void tt_cache_insert(const int64_t* __restrict__ rows,
                                const int64_t* __restrict__ ustart,
                                const int64_t* __restrict__ byfirst,
                                const int64_t* __restrict__ take, i64 U,
                                int64_t* __restrict__ keys, int64_t* __restrict__ freq, i64 S)
{
    const i64 i = he_tid();
    if (i >= U || i >= take[0])
        return;
    const i64 g = byfirst[i];
    const i64 x = rows[g];
    i64 j = (i64)(he_mix64((uint64_t)x) % (uint64_t)S);
    for (i64 probe = 0; probe < S; probe++) {
        if (atomicCAS((unsigned long long*)(keys + j), ~0ULL, (unsigned long long)x) == ~0ULL) {
            freq[j] = ustart[g + 1] - ustart[g];
            return;
        }
        if (++j == S)
            j = 0;
    }
}

HE_KERNEL(tt_digits)
HE_KERNEL(tt_runs_flags)
HE_KERNEL(tt_runs_scatter)
HE_KERNEL(tt_bag_of)
HE_KERNEL(tt_cache_find)
HE_KERNEL(tt_cache_insert)
HE_KERNEL(tt_step_fwd<float>)
HE_KERNEL(tt_step_fwd<double>)
HE_KERNEL(tt_step_dA<float>)
HE_KERNEL(tt_step_dA<double>)
HE_KERNEL(tt_step_dG<float>)
HE_KERNEL(tt_step_dG<double>)
HE_KERNEL(tt_rows_dG<float>)
HE_KERNEL(tt_rows_dG<double>)
HE_KERNEL(tt_combine<float>)
HE_KERNEL(tt_combine<double>)
HE_KERNEL(tt_apply<float>)
HE_KERNEL(tt_apply<double>)
HE_KERNEL(tt_pool<float>)
HE_KERNEL(tt_pool<double>)
HE_KERNEL(tt_unpool<float>)
HE_KERNEL(tt_unpool<double>)
