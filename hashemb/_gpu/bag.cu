/*
 * hashemb/_gpu/bag.cu -- embedding-bag kernels of the GPU backend, the CUDA
 * twins of hashemb/_cpu/_bag.pyx: gather-pool forward (sum / mean / max,
 * per-sample weights, padding, many tables per launch), scatter-add backward
 * with atomics or as (slot, value) pairs for the sorted deterministic path,
 * the fused Adagrad passes, and the pre-launch offsets / index check.
 *
 * Thread layout of the bag kernels: W lanes (W a power of two <= 32, chosen
 * by the launcher from D) per bag q = t*B + b of the feature-major batch; lane
 * l handles elements l, l+W, l+2W, ... and one pass over the bag's entries
 * serves up to EPT of them (HE_EPT = 4 in the backward; a template argument,
 * 4 or 16, in the forward; the launcher picks W so that a lane serves `per`
 * of them: hashemb/_gpu/bag.py FORWARD_PER, BACKWARD_PER). The lanes of a bag read
 * consecutive floats of a run and write consecutive floats of the output
 * row. Index arithmetic is 64-bit; divisions are 32-bit where the operands
 * fit (he_div).
 *
 * One-entry bags (2-D input, the DLRM layout, or offsets of one entry a
 * bag) instead take bag_forward_rows / bag_backward_rows, warp kernels
 * (common.cuh HE_LANES): a lane hashes one entry, then the warp moves whole
 * rows.
 *
 * Run starts come from hashemb/slots.h, per lane on the fly, or, for
 * unsigned schemes with few runs per row (ROBE-Z, Z >= D/4) in a backward
 * or a forward that keeps them, from bag_starts, which hashes each (entry,
 * run) once instead of once per lane; those launches use the kernels' ST
 * instantiation.
 */
#ifndef HASHEMB_GPU_COMMON_H
#include "common.cuh"
#endif

/*
 * ST (a template argument of the bag kernels): the run starts of every entry
 * were precomputed by bag_starts (unsigned schemes). An ST kernel holds no
 * slot math at all, so it needs far fewer registers (more threads resident
 * to hide the gather's latency) than one that hashes per lane.
 */

/* The table's part of its rows' hashes (he_table_term), taken once per
 * thread; none needed when the run starts were precomputed. */
template <bool ST>
__device__ __forceinline__ he_tterm he_thread_term(const he_scheme* s, i64 table)
{
    if (ST)
        return he_tterm{0, 0};
    return he_table_term(s, table);
}

/* The row state of token x: none needed when its run starts were precomputed. */
template <bool ST>
__device__ __forceinline__ he_row he_entry_row(const he_scheme* s, i64 table, he_tterm tt, i64 x)
{
    if (ST)
        return he_row{0, 0};
    return he_row_begin_t(s, table, tt, x);
}

/*
 * Start of run k of the row `row` of entry j (precomputed or on the fly). A
 * start read from memory is trusted only to stay in bounds: a saved of other
 * inputs (entries its forward never wrote) gives wrong values, never a write
 * outside the array.
 */
template <bool ST>
__device__ __forceinline__ uint64_t he_start(const he_scheme* s, const he_row* row,
                                             const uint64_t* starts, i64 j, i64 k)
{
    if (ST) {
        const uint64_t st = starts[j * s->runs + k];
        return st < s->size ? st : 0;
    }
    return he_run_start(s, row, k);
}

/* Sign of element i (always +1 where the starts were precomputed: unsigned). */
template <bool ST>
__device__ __forceinline__ int he_entry_sign(const he_scheme* s, const he_row* row, i64 i)
{
    return ST ? 1 : he_sign(s, row, i);
}

/*
 * What a bag kernel's thread works on: bag q = t*B + b (table `table`), its
 * lane, and the bag's entries r. False for a thread past the last bag.
 * Threads take the bags in memory order: feature-major with offsets (the
 * offsets and entries of consecutive bags are adjacent), sample-major for
 * 2-D (B, T) input, where bag (t, b) is the entry [b, t] and its output
 * row out[b, t*D:(t+1)*D], so that a warp's index reads and output writes
 * are contiguous rather than T entries / T*D floats apart.
 */
struct he_bag_thread {
    i64 q, t, b, table, lane;
    he_range r;
};

__device__ __forceinline__ bool he_bag_thread_of(i64 W, i64 B, i64 T, i64 table0,
                                                 const int64_t* off, i64 use_off, i64 rowlen,
                                                 i64 nper, he_bag_thread* h)
{
    const i64 g = he_bag_of_thread(he_tid(), W, &h->lane);
    if (g >= T * B)
        return false;
    if (use_off || T == 1) {
        h->t = he_div(g, B);
        h->b = g - h->t * B;
    } else {
        h->b = he_div(g, T);
        h->t = g - h->b * T;
    }
    h->q = h->t * B + h->b;
    h->table = table0 + h->t;
    h->r = he_bag_range(off, use_off, h->q, h->t, h->b, rowlen, nper);
    return true;
}

/* Run kk[c] and place jj[c] in it of the N elements i0 + c*nw a lane serves in a pass. */
template <int N>
__device__ __forceinline__ void he_lane_runs(int i0, int nw, int L, int* kk, int* jj)
{
#pragma unroll
    for (int c = 0; c < N; c++) {
        const int i = i0 + c * nw;
        kk[c] = i / L;
        jj[c] = i - kk[c] * L;
    }
}

/*
 * starts[j * R + k] = start of run k of entry j for every entry in a bag
 * (R = s->runs), one thread per (entry, run). Only for unsigned schemes: the
 * bag kernels then need no row state at all.
 */
template <typename I>
__global__ void bag_starts(const he_scheme* __restrict__ s, const I* __restrict__ idx,
                           i64 n, const int64_t* __restrict__ off, i64 use_off, i64 B,
                           i64 T, i64 rowlen, i64 table0, uint64_t* __restrict__ starts)
{
    const i64 g = he_tid(), R = s->runs;
    if (g >= n * R)
        return;
    const i64 j = g / R, k = g - j * R;
    const i64 t = he_entry_table(off, use_off, j, B, T, rowlen);
    if (t < 0)
        return;
    const he_row row = he_row_begin(s, table0 + t, (i64)idx[j]);
    starts[g] = he_run_start(s, &row, k);
}

/*
 * out[b, t*D + i] = pool over the entries of bag t*B + b (the CPU's _bag).
 * EPT: register slots of a lane per pass (the launcher's elements per lane,
 * rounded up to an instantiated 4 or 16; slots past D stay idle).
 * use_keep (hashing per lane, !ST): also write every (entry, run) start to
 * keep[j * R + k], as bag_starts would (the lane holding a run's first
 * element writes it), so that a training step's backward hashes nothing
 * and the forward is still one launch.
 */
template <typename R, typename I, bool ST, int EPT, typename S = R>
__global__ void bag_forward(const he_scheme* __restrict__ s, const I* __restrict__ idx,
                            const int64_t* __restrict__ off, i64 use_off, i64 rowlen, i64 nper,
                            const uint64_t* __restrict__ starts, const S* __restrict__ M,
                            const R* __restrict__ psw, i64 use_psw, R* __restrict__ out,
                            i64 B, i64 T, i64 table0, i64 mode, i64 has_pad, i64 pad, i64 W,
                            uint64_t* __restrict__ keep, i64 use_keep)
{
    he_bag_thread h;
    if (!he_bag_thread_of(W, B, T, table0, off, use_off, rowlen, nper, &h))
        return;
    const i64 table = h.table;
    const he_tterm tt = he_thread_term<ST>(s, table);
    const he_range r = h.r;
    const int D = (int)s->dim, L = (int)s->run, nw = (int)W;     /* D < 2^20 */
    R* o = out + h.b * (T * D) + h.t * D;
    for (int i0 = (int)h.lane; i0 < D; i0 += EPT * nw) {
        R acc[EPT];
        int kk[EPT], jj[EPT];
        he_lane_runs<EPT>(i0, nw, L, kk, jj);
#pragma unroll
        for (int c = 0; c < EPT; c++)
            acc[c] = 0;
        i64 cnt = 0;
        for (i64 j = r.j0; j < r.j1; j++) {
            const i64 x = (i64)idx[j];
            if (has_pad && x == pad)
                continue;
            const he_row row = he_entry_row<ST>(s, table, tt, x);
            const R w = use_psw ? psw[j] : (R)1;
#pragma unroll
            for (int c = 0; c < EPT; c++) {
                const int i = i0 + c * nw;
                if (i < D) {
                    const uint64_t st = he_start<ST>(s, &row, starts, j, kk[c]);
                    if (!ST && use_keep && jj[c] == 0)
                        keep[j * s->runs + kk[c]] = st;
                    const int sg = he_entry_sign<ST>(s, &row, i);
                    const R v = (R)sg * he_weight(M, he_run_slot(s, st, jj[c]));
                    if (mode == HE_MAX) {
                        if (cnt == 0 || v > acc[c])
                            acc[c] = v;
                    } else if (cnt == 0) {
                        acc[c] = w * v;
                    } else {
                        acc[c] += w * v;
                    }
                }
            }
            cnt++;
        }
#pragma unroll
        for (int c = 0; c < EPT; c++) {
            const int i = i0 + c * nw;
            if (i < D) {
                /* the CPU's sums start from +0 (a lone unweighted entry is
                   copied): a sum of -0 terms is +0 there, -0 here */
                const R a = mode != HE_MAX && (cnt > 1 || use_psw) ? (R)0 + acc[c] : acc[c];
                o[i] = cnt == 0 ? (R)0 : (mode == HE_MEAN && cnt > 1 ? a / (R)cnt : a);
            }
        }
    }
}

/*
 * Forward of one-entry bags, a warp kernel (common.cuh HE_LANES): 2-D input
 * (B, T) with one entry per bag (or (B, 1)), whose entry j = b*T + t is bag
 * (t, b) and whose output row is out[j*D .. j*D + D); or (fm) offsets input
 * whose every bag holds one entry (the pre-launch check says so), entry
 * j = t*B + b, output row b*T + t. Warp w takes entries 32w .. 32w + 31.
 * First each lane reads one entry's index and does that row's once-per-row
 * work, keeping it in the warp's shared memory (he_rows_begin):
 *  - GEN false (unsigned schemes of <= HE_ROW_RUNS runs a row: ROBE-Z with
 *    Z >= D/4, FullTable, SCMA / LMA): its run starts, hashed once (and
 *    written to keep for a backward, if asked), or read from the given ones;
 *  - GEN true (signed schemes, rows of many runs: HashedNet): its row state
 *    (hash bases), from which each element's start and sign follow.
 * Then the warp copies the rows, 32/P at a time, P lanes per row (P: D
 * rounded up to a power of two, at most 32) reading consecutive floats of a
 * run and writing consecutive floats of the output (he_rows_each). Per
 * entry that is one index read and one row hash instead of one per lane,
 * and loads and stores a warp makes contiguous. out = v (max) or w * v
 * (sum, mean; w = psw[j] or 1), v = sign * M[slot]: what bag_forward
 * computes for one entry; 0 for a padding entry.
 */
#define HE_ROW_RUNS 4

/* What the first phase keeps per warp entry e: live[e] (in range and no
 * padding), its weight scale[e] (psw[j], or 1), its output row orow[e], and
 * in st[e * HE_ROW_RUNS ...] its run starts or, GEN, its row state (base,
 * sbase). */
template <typename R>
struct he_row_warp {
    uint64_t st[32 * HE_ROW_RUNS];
    R scale[32];
    int live[32];
    i64 orow[32];
};

/*
 * The first phase of a one-entry warp kernel, then the warp's sync: lane l
 * takes entry j = j0 + l (see he_row_warp), its run starts hashed once from
 * its row or read from the given starts, and written to keep too if asked
 * (a forward keeping them for its backward).
 */
template <bool ST, bool GEN, typename R, typename I>
__device__ __forceinline__ void he_rows_begin(const he_scheme* s, const I* idx, i64 n, i64 B,
                                              i64 T, i64 fm, i64 table0,
                                              const uint64_t* starts, const R* psw,
                                              i64 use_psw, i64 has_pad, i64 pad, i64 j0,
                                              he_row_warp<R>* w, uint64_t* keep, i64 use_keep)
{
    HE_LANES(l) {
        const i64 j = j0 + l;
        w->live[l] = 0;
        w->scale[l] = 0;
        if (j >= n)
            continue;
        /* entry j is bag (t, b): j = b*T + t (2-D input), or j = t*B + b
           (fm: offsets input of one entry per bag); its output row is b*T + t */
        i64 t = 0;
        if (fm) {
            t = T > 1 ? he_div(j, B) : 0;
            w->orow[l] = (j - t * B) * T + t;
        } else {
            t = T > 1 ? j - he_div(j, T) * T : 0;
            w->orow[l] = j;
        }
        const i64 x = (i64)idx[j];
        if (has_pad && x == pad)
            continue;
        w->live[l] = 1;
        w->scale[l] = use_psw ? psw[j] : (R)1;
        const he_row row = ST ? he_row{0, 0} : he_row_begin(s, table0 + t, x);
        uint64_t* st = w->st + l * HE_ROW_RUNS;
        if (GEN) {
            st[0] = row.base;
            st[1] = row.sbase;
            continue;
        }
        const int runs = (int)s->runs;
        for (int k = 0; k < runs; k++) {
            const uint64_t v = he_start<ST>(s, &row, starts, j, k);
            st[k] = v;
            if (!ST && use_keep)
                keep[j * runs + k] = v;
        }
    }
    HE_WARP_SYNC();
}

/*
 * The second phase: element i of every live warp entry e, P lanes per row
 * (lane l: entries l/P, l/P + 32/P, ..., elements l%P, l%P + P, ...), the
 * slot and sign from what the first phase kept (sign 0 and slot 0: a
 * padding entry); P a power of two (the launcher's lanes()), so that the
 * 32 / P entries of a pass cover the warp's once. C entries at a time: v = get(e, i, slot, sign) of all C,
 * then put(e, i, slot, sign, v) of each, so that a lane has C independent
 * loads in flight. One get and put at a time compiled to a load and the store
 * that waits for it (ptxas, sm_90): a lane waited one L2 round trip a row.
 */
template <bool ST, bool GEN, int C, typename R, typename G, typename F>
__device__ __forceinline__ void he_rows_each(const he_scheme* s, const he_row_warp<R>* w,
                                             const uint64_t* starts, i64 n, i64 j0, int p,
                                             G get, F put)
{
    const int D = (int)s->dim, L = (int)s->run;
    const uint64_t m = s->size;         /* read once, not per row */
    const int ne = n - j0 < 32 ? (int)(n - j0) : 32;        /* the warp's entries */
    HE_LANES(l) {
        const int e0 = l / p, g = 32 / p;
        for (int i = l - e0 * p; i < D; i += p) {
            const int k = i / L, jr = i - k * L;
            for (int eb = e0; eb < ne; eb += C * g) {
                uint64_t slot[C];
                int sg[C];
                R v[C];
#pragma unroll
                for (int c = 0; c < C; c++) {
                    const int e = eb + c * g;
                    slot[c] = 0;
                    sg[c] = 0;
                    v[c] = 0;
                    if (e >= ne)
                        continue;
                    if (w->live[e]) {
                        const uint64_t* st = w->st + e * HE_ROW_RUNS;
                        if (GEN) {
                            const he_row row{st[0], st[1]};
                            slot[c] = he_wrap(he_start<ST>(s, &row, starts, j0 + e, k), jr, m);
                            sg[c] = he_entry_sign<ST>(s, &row, i);
                        } else {
                            slot[c] = he_wrap(st[k], jr, m);
                            sg[c] = 1;
                        }
                    }
                    v[c] = get(e, i, slot[c], sg[c]);
                }
#pragma unroll
                for (int c = 0; c < C; c++) {
                    if (eb + c * g < ne)
                        put(eb + c * g, i, slot[c], sg[c], v[c]);
                }
            }
        }
    }
}

template <typename R, typename I, bool ST, bool GEN, int C, typename S = R>
__global__ void HE_WARP_BOUNDS
bag_forward_rows(const he_scheme* __restrict__ s, const I* __restrict__ idx, i64 n, i64 B,
                 i64 T, i64 fm, i64 table0, const uint64_t* __restrict__ starts,
                 const S* __restrict__ M, const R* __restrict__ psw, i64 use_psw,
                 R* __restrict__ out, i64 mode, i64 has_pad, i64 pad, i64 P,
                 uint64_t* __restrict__ keep, i64 use_keep)
{
    HE_WARP_LEAD();
    const i64 j0 = (he_tid() >> 5) << 5;
    if (j0 >= n || (!GEN && s->runs > HE_ROW_RUNS))    /* the launcher never sends more */
        return;
    HE_WARP_SHARED(he_row_warp<R>, w, 1);
    he_rows_begin<ST, GEN>(s, idx, n, B, T, fm, table0, starts, psw, use_psw, has_pad, pad, j0,
                           w, keep, use_keep);
    const i64 D = s->dim;
    he_rows_each<ST, GEN, C>(
        s, w, starts, n, j0, (int)P,
        [&](int e, int i, uint64_t slot, int sg) -> R {
            /* loaded for a padding entry too (slot 0 of the array), so
               that the load does not wait behind a branch */
            const R x = (R)he_weight(M, slot);
            const R v = GEN ? (R)sg * x : x;
            /* + 0 as the CPU's sum of a weighted entry (-0 * w is +0 there) */
            return sg == 0 ? (R)0 : mode == HE_MAX || !use_psw ? v : (R)0 + w->scale[e] * v;
        },
        [&](int e, int i, uint64_t, int, R v) { out[w->orow[e] * D + i] = v; });
}

/*
 * Backward of one-entry bags into target (bag_backward's out_mode 0), the
 * warp kernel of bag_forward_rows' layout: each lane takes one entry's run
 * starts or row state and its weight, then P lanes per row add
 * (a * sign) * grad[j*D + i] to consecutive slots of a run, reading
 * consecutive gradient floats; a = alpha * psw[j] (sum with weights) or
 * alpha * 1 (any mode: a one-entry bag is its own mean and maximum).
 */
template <typename R, typename I, bool ST, bool GEN, int C>
__global__ void HE_WARP_BOUNDS
bag_backward_rows(const he_scheme* __restrict__ s, const I* __restrict__ idx, i64 n, i64 B,
                  i64 T, i64 fm, i64 table0, const uint64_t* __restrict__ starts,
                  const R* __restrict__ psw, i64 use_psw, const R* __restrict__ grad, R alpha,
                  i64 has_pad, i64 pad, i64 P, R* __restrict__ target)
{
    HE_WARP_LEAD();
    const i64 j0 = (he_tid() >> 5) << 5;
    if (j0 >= n || (!GEN && s->runs > HE_ROW_RUNS))    /* the launcher never sends more */
        return;
    HE_WARP_SHARED(he_row_warp<R>, w, 1);
    he_rows_begin<ST, GEN>(s, idx, n, B, T, fm, table0, starts, psw, use_psw, has_pad, pad, j0,
                           w, (uint64_t*)0, 0);
    const i64 D = s->dim;
    he_rows_each<ST, GEN, C>(
        s, w, starts, n, j0, (int)P,
        [&](int e, int i, uint64_t, int sg) -> R {
            const R a = alpha * w->scale[e];
            const R gv = grad[w->orow[e] * D + i];  /* a padding entry's row exists too */
            return sg == 0 ? (R)0 : (GEN ? a * (R)sg : a) * gv;
        },
        [&](int, int, uint64_t slot, int sg, R v) {
            if (sg != 0)
                he_atomic_add(target + slot, v);
        });
}

/*
 * Element i of bag q in max mode: the first entry holding the maximum of
 * s * M[slot] (the CPU's _argmax), as its slot and sign; found = 0 for a bag
 * with no non-padding entry.
 */
template <bool ST, typename R, typename I, typename S>
__device__ __forceinline__ int he_argmax(const he_scheme* s, const I* idx, const he_range& r,
                                         const uint64_t* starts, const S* M, i64 table,
                                         he_tterm tt, i64 has_pad, i64 pad, i64 i, int k, int jr,
                                         uint64_t* slot, int* sign)
{
    int found = 0;
    R best = 0;
    for (i64 j = r.j0; j < r.j1; j++) {
        const i64 x = (i64)idx[j];
        if (has_pad && x == pad)
            continue;
        const he_row row = he_entry_row<ST>(s, table, tt, x);
        const uint64_t sl = he_run_slot(s, he_start<ST>(s, &row, starts, j, k), jr);
        const int sg = he_entry_sign<ST>(s, &row, i);
        const R v = (R)sg * (R)he_weight(M, sl);
        if (!found || v > best) {
            best = v;
            *slot = sl;
            *sign = sg;
            found = 1;
        }
    }
    return found;
}

/*
 * The scale of a bag's entries in backward before their per-sample weights:
 * alpha over the count of live (non-padding) entries of a mean bag of more
 * than one, else alpha (the CPU's _pair_scale).
 */
template <typename R, typename I>
__device__ __forceinline__ R he_bag_scale(const I* __restrict__ idx, he_range r, i64 mode,
                                          i64 has_pad, i64 pad, R alpha)
{
    if (mode != HE_MEAN)
        return alpha;
    i64 cnt = r.j1 - r.j0;
    if (has_pad) {
        cnt = 0;
        for (i64 j = r.j0; j < r.j1; j++)
            cnt += (i64)idx[j] != pad;
    }
    return cnt > 1 ? alpha / (R)cnt : alpha;
}

/*
 * Backward, one bag per W lanes. out_mode 0: atomicAdd of every contribution
 * into target (the gradient, SGD's weight, or Adagrad's scratch);
 * out_mode 1: write each contribution as (keys[pos*D + i], vals[pos*D + i])
 * for the deterministic path (pos: the entry's CPU position; in max mode the
 * bag's q), leaving keys at HE_NO_SLOT where nothing is contributed.
 *
 * A contribution is (a * s) * g[i], a = alpha * psw[j] (sum), alpha / count
 * (mean over > 1 entries) or alpha; max sends alpha * s * g[i] to the
 * element's first maximum only. (The CPU's _backward_part.)
 */
template <typename R, typename I, bool ST, typename S = R>
__global__ void bag_backward(const he_scheme* __restrict__ s, const I* __restrict__ idx,
                             const int64_t* __restrict__ off, i64 use_off, i64 rowlen, i64 nper,
                             const uint64_t* __restrict__ starts, const R* __restrict__ psw,
                             i64 use_psw,
                             const R* __restrict__ grad, i64 B, i64 T, i64 table0, i64 mode,
                             i64 has_pad, i64 pad, i64 W, const S* __restrict__ M, R alpha,
                             i64 out_mode, R* __restrict__ target, int64_t* __restrict__ keys,
                             R* __restrict__ vals)
{
    he_bag_thread h;
    if (!he_bag_thread_of(W, B, T, table0, off, use_off, rowlen, nper, &h))
        return;
    const i64 q = h.q, table = h.table, lane = h.lane;
    const he_tterm tt = he_thread_term<ST>(s, table);
    const he_range r = h.r;
    const int D = (int)s->dim, L = (int)s->run, nw = (int)W;     /* D < 2^20 */
    const R* go = grad + h.b * (T * D) + h.t * D;

    if (mode == HE_MAX) {
        for (int i = (int)lane; i < D; i += nw) {
            const int k = i / L, jr = i - k * L;
            uint64_t slot = 0;
            int sg = 1;
            const int found = he_argmax<ST, R>(s, idx, r, starts, M, table, tt, has_pad, pad, i,
                                               k, jr, &slot, &sg);
            const R c = (alpha * (R)sg) * go[i];
            if (out_mode == 0) {
                if (found)
                    he_atomic_add(target + slot, c);
            } else {
                keys[q * D + i] = found ? (int64_t)slot : HE_NO_SLOT;
                vals[q * D + i] = found ? c : (R)0;
            }
        }
        return;
    }

    const R w = he_bag_scale(idx, r, mode, has_pad, pad, alpha);
    for (int i0 = (int)lane; i0 < D; i0 += HE_EPT * nw) {
        R gv[HE_EPT];
        int kk[HE_EPT], jj[HE_EPT];
        he_lane_runs<HE_EPT>(i0, nw, L, kk, jj);
#pragma unroll
        for (int c = 0; c < HE_EPT; c++)
            gv[c] = i0 + c * nw < D ? go[i0 + c * nw] : (R)0;
        for (i64 j = r.j0; j < r.j1; j++) {
            const i64 x = (i64)idx[j];
            const i64 pos = r.pos0 + (j - r.j0);
            const int skip = has_pad && x == pad;
            if (skip) {
                if (out_mode == 1) {
#pragma unroll
                    for (int c = 0; c < HE_EPT; c++) {
                        const int i = i0 + c * nw;
                        if (i < D) {
                            keys[pos * D + i] = HE_NO_SLOT;
                            vals[pos * D + i] = 0;
                        }
                    }
                }
                continue;
            }
            const he_row row = he_entry_row<ST>(s, table, tt, x);
            const R a = use_psw ? w * psw[j] : w;
#pragma unroll
            for (int c = 0; c < HE_EPT; c++) {
                const int i = i0 + c * nw;
                if (i < D) {
                    const uint64_t slot =
                        he_run_slot(s, he_start<ST>(s, &row, starts, j, kk[c]), jj[c]);
                    const int sg = he_entry_sign<ST>(s, &row, i);
                    const R v = (a * (R)sg) * gv[c];
                    if (out_mode == 0) {
                        he_atomic_add(target + slot, v);
                    } else {
                        keys[pos * D + i] = (int64_t)slot;
                        vals[pos * D + i] = v;
                    }
                }
            }
        }
    }
}

/*
 * The apply pass of a two-phase update (Adagrad; SGD of float16 weights:
 * he_apply's rule and seed) by walking the batch again (when the array is
 * large next to the batch): every slot an entry touches is claimed with an
 * atomic exchange of its scratch gradient for 0, so each slot is updated
 * exactly once, and only where its gradient is non-zero (the CPU's
 * ACT_ADAGRAD). S: the weight's storage (R, or he_u16 for float16).
 */
template <typename R, typename I, bool ST, typename S = R>
__global__ void bag_adagrad_walk(const he_scheme* __restrict__ s, const I* __restrict__ idx,
                                 const int64_t* __restrict__ off, i64 use_off, i64 rowlen,
                                 i64 nper, const uint64_t* __restrict__ starts, i64 B, i64 T,
                                 i64 table0, i64 has_pad, i64 pad, i64 W,
                                 S* __restrict__ w, R* __restrict__ scratch,
                                 R* __restrict__ state, R lr, R eps, i64 rule, i64 seed)
{
    he_bag_thread h;
    if (!he_bag_thread_of(W, B, T, table0, off, use_off, rowlen, nper, &h))
        return;
    const i64 D = s->dim, table = h.table, lane = h.lane;
    const he_tterm tt = he_thread_term<ST>(s, table);
    const int L = (int)s->run;
    const he_range r = h.r;
    for (i64 j = r.j0; j < r.j1; j++) {
        const i64 x = (i64)idx[j];
        if (has_pad && x == pad)
            continue;
        const he_row row = he_entry_row<ST>(s, table, tt, x);
        for (i64 i = lane; i < D; i += W) {
            const int k = (int)i / L;
            const uint64_t slot =
                he_run_slot(s, he_start<ST>(s, &row, starts, j, k), (int)i - k * L);
            const R gs = he_take(scratch + slot);
            if (gs != (R)0)
                he_apply(w, state, (i64)slot, gs, lr, eps, rule, seed);
        }
    }
}

/*
 * A full table's two-phase step, summed per row (seg_rows, segment.cu), first
 * pass: a thread per bag writes, for each entry at its CPU position pos,
 * keys[pos] = its row's start (HE_NO_SLOT for padding), vals[pos] = its
 * scale (1, over the count of a mean bag, times its per-sample weight: the
 * CPU's _pair_scale) and grow[pos] = the offset of its bag's gradient row in
 * grad. One key per entry, not per element: the sort that groups the rows
 * is D times smaller than the deterministic backward's.
 */
template <typename R, typename I, bool ST>
__global__ void bag_row_keys(const he_scheme* __restrict__ s, const I* __restrict__ idx,
                             const int64_t* __restrict__ off, i64 use_off, i64 rowlen,
                             i64 nper, const uint64_t* __restrict__ starts,
                             const R* __restrict__ psw, i64 use_psw, i64 B, i64 T, i64 table0,
                             i64 mode, i64 has_pad, i64 pad, int64_t* __restrict__ keys,
                             R* __restrict__ vals, int64_t* __restrict__ grow)
{
    he_bag_thread h;
    if (!he_bag_thread_of(1, B, T, table0, off, use_off, rowlen, nper, &h))
        return;
    const i64 table = h.table, D = s->dim;
    const he_tterm tt = he_thread_term<ST>(s, table);
    const he_range r = h.r;
    const R w = he_bag_scale(idx, r, mode, has_pad, pad, (R)1);
    for (i64 j = r.j0; j < r.j1; j++) {
        const i64 x = (i64)idx[j];
        const i64 pos = r.pos0 + (j - r.j0);
        if (has_pad && x == pad) {
            keys[pos] = HE_NO_SLOT;
            continue;
        }
        const he_row row = he_entry_row<ST>(s, table, tt, x);
        keys[pos] = (int64_t)he_start<ST>(s, &row, starts, j, 0);
        vals[pos] = use_psw ? w * psw[j] : w;
        grow[pos] = h.b * (T * D) + h.t * D;
    }
}

/*
 * The checks the CPU makes before its kernels, in one pass (one reduction):
 *   res[0] = first p >= 1 with off[p] < off[p-1] (else ~0), res[2] = off[0],
 *   res[3] = off[noff-1]  (use_off only);
 *   res[1] = CPU position of the first entry whose token lies outside
 *            [0, bounds[t]) of its table (padding exempt; use_bounds only);
 *   res[4] = first p >= 1 with off[p] - off[p-1] != 1: ~0 when every bag
 *            holds one entry (use_off only; the one-entry warp kernels).
 * res[0], res[1] and res[4] start at ~0 (all ones); one thread per offset /
 * entry.
 */
template <typename I>
__global__ void bag_check(const I* __restrict__ idx, i64 n, const int64_t* __restrict__ off,
                          i64 noff, i64 use_off, const int64_t* __restrict__ bounds,
                          i64 use_bounds, i64 B, i64 T, i64 rowlen, i64 has_pad, i64 pad,
                          unsigned long long* __restrict__ res)
{
    const i64 g = he_tid();
    if (use_off && g < noff) {
        if (g == 0) {
            res[2] = (unsigned long long)off[0];
            res[3] = (unsigned long long)off[noff - 1];
        } else {
            if (off[g] < off[g - 1])
                atomicMin(res, (unsigned long long)g);
            if ((unsigned long long)off[g] - (unsigned long long)off[g - 1] != 1ULL)
                atomicMin(res + 4, (unsigned long long)g);
        }
    }
    if (use_bounds && g < n) {
        const i64 t = he_entry_table(off, use_off, g, B, T, rowlen);
        if (t >= 0) {
            const i64 x = (i64)idx[g];
            // unsigned: a negative x is past every bound, and a bound of
            // -2**63 reads as 2**63 (reference maps: any x >= 0)
            if ((unsigned long long)x >= (unsigned long long)bounds[t] && !(has_pad && x == pad))
                atomicMin(res + 1, (unsigned long long)he_entry_pos(use_off, g, t, B, T, rowlen));
        }
    }
}

HE_KERNEL(bag_starts<int>)
HE_KERNEL(bag_starts<long long>)
HE_KERNEL(bag_forward<float, int, false, 4>)
HE_KERNEL(bag_forward<float, int, true, 4>)
HE_KERNEL(bag_forward<float, long long, false, 4>)
HE_KERNEL(bag_forward<float, long long, true, 4>)
HE_KERNEL(bag_forward<double, int, false, 4>)
HE_KERNEL(bag_forward<double, int, true, 4>)
HE_KERNEL(bag_forward<double, long long, false, 4>)
HE_KERNEL(bag_forward<double, long long, true, 4>)
HE_KERNEL(bag_forward<float, int, false, 16>)
HE_KERNEL(bag_forward<float, int, true, 16>)
HE_KERNEL(bag_forward<float, long long, false, 16>)
HE_KERNEL(bag_forward<float, long long, true, 16>)
HE_KERNEL(bag_forward<double, int, false, 16>)
HE_KERNEL(bag_forward<double, int, true, 16>)
HE_KERNEL(bag_forward<double, long long, false, 16>)
HE_KERNEL(bag_forward<double, long long, true, 16>)
HE_KERNEL(bag_forward_rows<float, int, false, false, 4>)
HE_KERNEL(bag_forward_rows<float, int, false, true, 4>)
HE_KERNEL(bag_forward_rows<float, int, true, false, 4>)
HE_KERNEL(bag_forward_rows<float, int, true, true, 4>)
HE_KERNEL(bag_forward_rows<float, long long, false, false, 4>)
HE_KERNEL(bag_forward_rows<float, long long, false, true, 4>)
HE_KERNEL(bag_forward_rows<float, long long, true, false, 4>)
HE_KERNEL(bag_forward_rows<float, long long, true, true, 4>)
HE_KERNEL(bag_forward_rows<double, int, false, false, 4>)
HE_KERNEL(bag_forward_rows<double, int, false, true, 4>)
HE_KERNEL(bag_forward_rows<double, int, true, false, 4>)
HE_KERNEL(bag_forward_rows<double, int, true, true, 4>)
HE_KERNEL(bag_forward_rows<double, long long, false, false, 4>)
HE_KERNEL(bag_forward_rows<double, long long, false, true, 4>)
HE_KERNEL(bag_forward_rows<double, long long, true, false, 4>)
HE_KERNEL(bag_forward_rows<double, long long, true, true, 4>)
HE_KERNEL(bag_backward_rows<float, int, false, false, 4>)
HE_KERNEL(bag_backward_rows<float, int, false, true, 4>)
HE_KERNEL(bag_backward_rows<float, int, true, false, 4>)
HE_KERNEL(bag_backward_rows<float, int, true, true, 4>)
HE_KERNEL(bag_backward_rows<float, long long, false, false, 4>)
HE_KERNEL(bag_backward_rows<float, long long, false, true, 4>)
HE_KERNEL(bag_backward_rows<float, long long, true, false, 4>)
HE_KERNEL(bag_backward_rows<float, long long, true, true, 4>)
HE_KERNEL(bag_backward_rows<double, int, false, false, 4>)
HE_KERNEL(bag_backward_rows<double, int, false, true, 4>)
HE_KERNEL(bag_backward_rows<double, int, true, false, 4>)
HE_KERNEL(bag_backward_rows<double, int, true, true, 4>)
HE_KERNEL(bag_backward_rows<double, long long, false, false, 4>)
HE_KERNEL(bag_backward_rows<double, long long, false, true, 4>)
HE_KERNEL(bag_backward_rows<double, long long, true, false, 4>)
HE_KERNEL(bag_backward_rows<double, long long, true, true, 4>)
/* gpu_profile's sweep of the rows kernels' loads in flight (bag.py ROWS_CHUNK) */
HE_KERNEL(bag_forward_rows<float, long long, false, false, 1>)
HE_KERNEL(bag_forward_rows<float, long long, true, false, 1>)
HE_KERNEL(bag_backward_rows<float, long long, false, false, 1>)
HE_KERNEL(bag_backward_rows<float, long long, true, false, 1>)
HE_KERNEL(bag_forward_rows<float, long long, false, false, 2>)
HE_KERNEL(bag_forward_rows<float, long long, true, false, 2>)
HE_KERNEL(bag_backward_rows<float, long long, false, false, 2>)
HE_KERNEL(bag_backward_rows<float, long long, true, false, 2>)
HE_KERNEL(bag_forward_rows<float, long long, false, false, 8>)
HE_KERNEL(bag_forward_rows<float, long long, true, false, 8>)
HE_KERNEL(bag_backward_rows<float, long long, false, false, 8>)
HE_KERNEL(bag_backward_rows<float, long long, true, false, 8>)
HE_KERNEL(bag_backward<float, int, false>)
HE_KERNEL(bag_backward<float, int, true>)
HE_KERNEL(bag_backward<float, long long, false>)
HE_KERNEL(bag_backward<float, long long, true>)
HE_KERNEL(bag_backward<double, int, false>)
HE_KERNEL(bag_backward<double, int, true>)
HE_KERNEL(bag_backward<double, long long, false>)
HE_KERNEL(bag_backward<double, long long, true>)
HE_KERNEL(bag_adagrad_walk<float, int, false>)
HE_KERNEL(bag_adagrad_walk<float, int, true>)
HE_KERNEL(bag_adagrad_walk<float, long long, false>)
HE_KERNEL(bag_adagrad_walk<float, long long, true>)
HE_KERNEL(bag_adagrad_walk<double, int, false>)
HE_KERNEL(bag_adagrad_walk<double, int, true>)
HE_KERNEL(bag_adagrad_walk<double, long long, false>)
HE_KERNEL(bag_adagrad_walk<double, long long, true>)
/* float16 storage (he_u16 bits, float arithmetic) */
HE_KERNEL(bag_forward<float, int, false, 4, unsigned short>)
HE_KERNEL(bag_forward<float, int, false, 16, unsigned short>)
HE_KERNEL(bag_forward<float, int, true, 4, unsigned short>)
HE_KERNEL(bag_forward<float, int, true, 16, unsigned short>)
HE_KERNEL(bag_forward<float, long long, false, 4, unsigned short>)
HE_KERNEL(bag_forward<float, long long, false, 16, unsigned short>)
HE_KERNEL(bag_forward<float, long long, true, 4, unsigned short>)
HE_KERNEL(bag_forward<float, long long, true, 16, unsigned short>)
HE_KERNEL(bag_forward_rows<float, int, false, false, 4, unsigned short>)
HE_KERNEL(bag_forward_rows<float, int, false, true, 4, unsigned short>)
HE_KERNEL(bag_forward_rows<float, int, true, false, 4, unsigned short>)
HE_KERNEL(bag_forward_rows<float, int, true, true, 4, unsigned short>)
HE_KERNEL(bag_forward_rows<float, long long, false, false, 4, unsigned short>)
HE_KERNEL(bag_forward_rows<float, long long, false, true, 4, unsigned short>)
HE_KERNEL(bag_forward_rows<float, long long, true, false, 4, unsigned short>)
HE_KERNEL(bag_forward_rows<float, long long, true, true, 4, unsigned short>)
HE_KERNEL(bag_backward<float, int, false, unsigned short>)
HE_KERNEL(bag_backward<float, int, true, unsigned short>)
HE_KERNEL(bag_backward<float, long long, false, unsigned short>)
HE_KERNEL(bag_backward<float, long long, true, unsigned short>)
HE_KERNEL(bag_adagrad_walk<float, int, false, unsigned short>)
HE_KERNEL(bag_adagrad_walk<float, int, true, unsigned short>)
HE_KERNEL(bag_adagrad_walk<float, long long, false, unsigned short>)
HE_KERNEL(bag_adagrad_walk<float, long long, true, unsigned short>)
/* bfloat16 storage (he_bf16, float arithmetic) */
HE_KERNEL(bag_forward<float, int, false, 4, he_bf16>)
HE_KERNEL(bag_forward<float, int, false, 16, he_bf16>)
HE_KERNEL(bag_forward<float, int, true, 4, he_bf16>)
HE_KERNEL(bag_forward<float, int, true, 16, he_bf16>)
HE_KERNEL(bag_forward<float, long long, false, 4, he_bf16>)
HE_KERNEL(bag_forward<float, long long, false, 16, he_bf16>)
HE_KERNEL(bag_forward<float, long long, true, 4, he_bf16>)
HE_KERNEL(bag_forward<float, long long, true, 16, he_bf16>)
HE_KERNEL(bag_forward_rows<float, int, false, false, 4, he_bf16>)
HE_KERNEL(bag_forward_rows<float, int, false, true, 4, he_bf16>)
HE_KERNEL(bag_forward_rows<float, int, true, false, 4, he_bf16>)
HE_KERNEL(bag_forward_rows<float, int, true, true, 4, he_bf16>)
HE_KERNEL(bag_forward_rows<float, long long, false, false, 4, he_bf16>)
HE_KERNEL(bag_forward_rows<float, long long, false, true, 4, he_bf16>)
HE_KERNEL(bag_forward_rows<float, long long, true, false, 4, he_bf16>)
HE_KERNEL(bag_forward_rows<float, long long, true, true, 4, he_bf16>)
HE_KERNEL(bag_backward<float, int, false, he_bf16>)
HE_KERNEL(bag_backward<float, int, true, he_bf16>)
HE_KERNEL(bag_backward<float, long long, false, he_bf16>)
HE_KERNEL(bag_backward<float, long long, true, he_bf16>)
HE_KERNEL(bag_adagrad_walk<float, int, false, he_bf16>)
HE_KERNEL(bag_adagrad_walk<float, int, true, he_bf16>)
HE_KERNEL(bag_adagrad_walk<float, long long, false, he_bf16>)
HE_KERNEL(bag_adagrad_walk<float, long long, true, he_bf16>)
HE_KERNEL(bag_row_keys<float, int, false>)
HE_KERNEL(bag_row_keys<float, int, true>)
HE_KERNEL(bag_row_keys<float, long long, false>)
HE_KERNEL(bag_row_keys<float, long long, true>)
HE_KERNEL(bag_row_keys<double, int, false>)
HE_KERNEL(bag_row_keys<double, int, true>)
HE_KERNEL(bag_row_keys<double, long long, false>)
HE_KERNEL(bag_row_keys<double, long long, true>)
HE_KERNEL(bag_check<int>)
HE_KERNEL(bag_check<long long>)
