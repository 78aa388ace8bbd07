/*
 * hashemb/_gpu/embed.cu -- plain lookups over packed tables of mixed widths
 * (he.embedding / he.multi_embedding), the CUDA twins of
 * hashemb/_cpu/_embed.pyx. Layout: table t's rows of dims[t] floats start at
 * float base[t] of one flat array and fill output columns cols[t] ..
 * cols[t] + dims[t] of a row of `total` floats; ctab[c] is the table of
 * output column c. One thread per output float: consecutive threads write
 * consecutive floats and read consecutive floats of one row.
 */
#ifndef HASHEMB_GPU_COMMON_H
#include "common.cuh"
#endif

/* Flat array position of output float (n, c). */
template <typename I>
__device__ __forceinline__ i64 he_packed_pos(const I* idx, i64 n, i64 c, i64 T,
                                             const int64_t* base, const int64_t* dims,
                                             const int64_t* cols, const int* ctab)
{
    const int t = ctab[c];
    return base[t] + (i64)idx[n * T + t] * dims[t] + (c - cols[t]);
}

/* out[n, c] = W[row idx[n, t] of table t = ctab[c], column c - cols[t]]. */
template <typename R, typename I>
__global__ void embed_gather(const R* __restrict__ W, const I* __restrict__ idx, i64 N, i64 T,
                             const int64_t* __restrict__ base, const int64_t* __restrict__ dims,
                             const int64_t* __restrict__ cols, const int* __restrict__ ctab,
                             i64 total, R* __restrict__ out)
{
    const i64 g = he_tid();
    if (g >= N * total)
        return;
    const i64 n = he_div(g, total), c = g - n * total;     /* 32-bit where it fits */
    out[g] = W[he_packed_pos(idx, n, c, T, base, dims, cols, ctab)];
}

/*
 * Backward: out_mode 0 atomically adds grad[n, c] at its array position;
 * out_mode 1 writes that position as keys[g] (values: grad itself, already
 * in the CPU's order) for the sorted deterministic path.
 */
template <typename R, typename I>
__global__ void embed_scatter(const R* __restrict__ grad, const I* __restrict__ idx, i64 N,
                              i64 T, const int64_t* __restrict__ base,
                              const int64_t* __restrict__ dims, const int64_t* __restrict__ cols,
                              const int* __restrict__ ctab, i64 total, i64 out_mode,
                              R* __restrict__ out, int64_t* __restrict__ keys)
{
    const i64 g = he_tid();
    if (g >= N * total)
        return;
    const i64 n = he_div(g, total), c = g - n * total;     /* 32-bit where it fits */
    const i64 pos = he_packed_pos(idx, n, c, T, base, dims, cols, ctab);
    if (out_mode == 0)
        he_atomic_add(out + pos, grad[g]);
    else
        keys[g] = pos;
}

/* res[0] = first n * T + t with idx[n, t] outside [0, sizes[t]) (starts at ~0). */
template <typename I>
__global__ void embed_check(const I* __restrict__ idx, i64 N, i64 T,
                            const int64_t* __restrict__ sizes, unsigned long long* __restrict__ res)
{
    const i64 g = he_tid();
    if (g >= N * T)
        return;
    const i64 x = (i64)idx[g], t = g - he_div(g, T) * T;
    if (x < 0 || x >= sizes[t])
        atomicMin(res, (unsigned long long)g);
}

HE_KERNEL(embed_gather<float, int>)
HE_KERNEL(embed_gather<float, long long>)
HE_KERNEL(embed_gather<double, int>)
HE_KERNEL(embed_gather<double, long long>)
HE_KERNEL(embed_scatter<float, int>)
HE_KERNEL(embed_scatter<float, long long>)
HE_KERNEL(embed_scatter<double, int>)
HE_KERNEL(embed_scatter<double, long long>)
HE_KERNEL(embed_check<int>)
HE_KERNEL(embed_check<long long>)
