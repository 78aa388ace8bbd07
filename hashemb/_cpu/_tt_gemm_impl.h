/* One copy of the kernels of _tt_gemm.h for the element type HE_T (vector type
 * HE_V of HE_W lanes, half vector HE_H); included once per type by
 * _tt_gemm.h, hence no include guard. Tiles are 4 rows x 2 vectors: 8
 * accumulators, 2 operand vectors and a broadcast fit the 16 AVX registers
 * with room to spare (6-row tiles made GCC shuffle registers in the loop). */

#define HE_TILE 4

#if HE_VEC

HE_INLINE HE_V HE_FN(ld)(const HE_T* p) { return *(const HE_V*)p; }
HE_INLINE void HE_FN(st)(HE_T* p, HE_V v) { *(HE_V*)p = v; }

/* The first w values of p in a half vector, zeros after (0 < w < HE_W/2),
 * built lane by lane in registers: the padded tiles of the last columns
 * (a store of w scalars and a vector reload stalled on store forwarding). */
HE_INLINE HE_H HE_FN(part_h)(const HE_T* p, int w)
{
    HE_H v = {0};
    switch (w) {
#if HE_W == 16
    case 7: v[6] = p[6]; /* fall through */
    case 6: v[5] = p[5]; /* fall through */
    case 5: v[4] = p[4]; /* fall through */
    case 4: v[3] = p[3]; /* fall through */
#endif
#if HE_W >= 8
    case 3: v[2] = p[2]; /* fall through */
    case 2: v[1] = p[1]; /* fall through */
#endif
    default: v[0] = p[0];
    }
    return v;
}

/* The first w values of p in a vector, zeros after (0 < w < HE_W). */
HE_INLINE HE_V HE_FN(part_v)(const HE_T* p, int w)
{
    HE_V v = {0};
    switch (w) {
#if HE_W == 16
    case 15: v[14] = p[14]; /* fall through */
    case 14: v[13] = p[13]; /* fall through */
    case 13: v[12] = p[12]; /* fall through */
    case 12: v[11] = p[11]; /* fall through */
    case 11: v[10] = p[10]; /* fall through */
    case 10: v[9] = p[9]; /* fall through */
    case 9: v[8] = p[8]; /* fall through */
    case 8: v[7] = p[7]; /* fall through */
#endif
#if HE_W >= 8
    case 7: v[6] = p[6]; /* fall through */
    case 6: v[5] = p[5]; /* fall through */
    case 5: v[4] = p[4]; /* fall through */
    case 4: v[3] = p[3]; /* fall through */
#endif
    case 3: v[2] = p[2]; /* fall through */
    case 2: v[1] = p[1]; /* fall through */
    default: v[0] = p[0];
    }
    return v;
}

/* nn, one tile: rows A[0..mr), columns j0 .. j0 + nv*HE_W. */
HE_INLINE void HE_FN(nn_tile)(const int mr, const int nv, int64_t K, const HE_T* const* A,
                              const HE_T* B, int64_t ldb, HE_T* const* C, int64_t j0, int add)
{
    HE_V acc[HE_TILE][2];
    const HE_T* a[HE_TILE];
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        a[i] = A[i];
        acc[i][0] = (HE_V){0};
        acc[i][1] = (HE_V){0};
    }
    for (int64_t s = 0; s < K; s++) {
        const HE_T* b = B + s * ldb + j0;
        HE_V b0 = HE_FN(ld)(b);
        HE_V b1 = nv > 1 ? HE_FN(ld)(b + HE_W) : b0;
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            HE_T x = a[i][s];
            acc[i][0] += x * b0;
            if (nv > 1) acc[i][1] += x * b1;
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
#pragma GCC unroll 2
        for (int v = 0; v < nv; v++) {
            HE_T* c = C[i] + j0 + v * HE_W;
            HE_V t = acc[i][v];
            if (add) t += HE_FN(ld)(c);
            HE_FN(st)(c, t);
        }
    }
}

/* nn, one tile of mr rows x one half vector (HE_W/2 columns): the narrow
   products (the chain's last core, N = q) would otherwise run scalar. */
HE_INLINE void HE_FN(nn_tile_h)(const int mr, int64_t K, const HE_T* const* A,
                                const HE_T* B, int64_t ldb, HE_T* const* C, int64_t j0, int add)
{
    HE_H acc[HE_TILE];
    const HE_T* a[HE_TILE];
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        a[i] = A[i];
        acc[i] = (HE_H){0};
    }
    for (int64_t s = 0; s < K; s++) {
        HE_H b = *(const HE_H*)(B + s * ldb + j0);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) acc[i] += a[i][s] * b;
    }
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        HE_H* c = (HE_H*)(C[i] + j0);
        HE_H t = acc[i];
        if (add) t += *c;
        *c = t;
    }
}

HE_INLINE void HE_FN(nn_rows)(const int mr, int64_t N, int64_t K, const HE_T* const* A,
                              const HE_T* B, int64_t ldb, HE_T* const* C, int add)
{
    int64_t j = 0;
    for (; j + 2 * HE_W <= N; j += 2 * HE_W) HE_FN(nn_tile)(mr, 2, K, A, B, ldb, C, j, add);
    if (j + HE_W <= N) {
        HE_FN(nn_tile)(mr, 1, K, A, B, ldb, C, j, add);
        j += HE_W;
    }
    if (j + HE_W / 2 <= N) {
        HE_FN(nn_tile_h)(mr, K, A, B, ldb, C, j, add);
        j += HE_W / 2;
    }
    if (j < N) {
        /* the last < HE_W/2 columns: a half tile on zero-padded columns of B,
         * so they are summed as the tiles' lanes are (a scalar loop was fused
         * into FMAs under one target and not another: other bits) */
        HE_H acc[HE_TILE];
        const int w = (int)(N - j);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) acc[i] = (HE_H){0};
        for (int64_t s = 0; s < K; s++) {
            HE_H b = HE_FN(part_h)(B + s * ldb + j, w);
#pragma GCC unroll 8
            for (int i = 0; i < mr; i++) acc[i] += A[i][s] * b;
        }
        for (int i = 0; i < mr; i++) {
            HE_H t = acc[i];
            if (add) t += HE_FN(part_h)(C[i] + j, w);
            for (int v = 0; v < w; v++) C[i][j + v] = t[v];
        }
    }
}

/* tn, one tile: C rows i0 .. i0+mr, columns j0 .. j0 + nv*HE_W. */
HE_INLINE void HE_FN(tn_tile)(const int mr, const int nv, int64_t K, const HE_T* const* A,
                              const HE_T* const* D, HE_T* C, int64_t ldc, int64_t i0,
                              int64_t j0, int add)
{
    HE_V acc[HE_TILE][2];
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        acc[i][0] = (HE_V){0};
        acc[i][1] = (HE_V){0};
    }
    for (int64_t r = 0; r < K; r++) {
        const HE_T* a = A[r] + i0;
        const HE_T* d = D[r] + j0;
        HE_V b0 = HE_FN(ld)(d);
        HE_V b1 = nv > 1 ? HE_FN(ld)(d + HE_W) : b0;
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            HE_T x = a[i];
            acc[i][0] += x * b0;
            if (nv > 1) acc[i][1] += x * b1;
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
#pragma GCC unroll 2
        for (int v = 0; v < nv; v++) {
            HE_T* c = C + (i0 + i) * ldc + j0 + v * HE_W;
            HE_V t = acc[i][v];
            if (add) t += HE_FN(ld)(c);
            HE_FN(st)(c, t);
        }
    }
}

HE_INLINE void HE_FN(tn_rows)(const int mr, int64_t N, int64_t K, const HE_T* const* A,
                              const HE_T* const* D, HE_T* C, int64_t ldc, int64_t i0, int add)
{
    int64_t j = 0;
    for (; j + 2 * HE_W <= N; j += 2 * HE_W) HE_FN(tn_tile)(mr, 2, K, A, D, C, ldc, i0, j, add);
    if (j + HE_W <= N) {
        HE_FN(tn_tile)(mr, 1, K, A, D, C, ldc, i0, j, add);
        j += HE_W;
    }
    if (j < N) {
        /* the last < HE_W columns: a tile on zero-padded columns of D (see nn_rows) */
        HE_V acc[HE_TILE];
        const int w = (int)(N - j);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) acc[i] = (HE_V){0};
        for (int64_t r = 0; r < K; r++) {
            HE_V b = HE_FN(part_v)(D[r] + j, w);
#pragma GCC unroll 8
            for (int i = 0; i < mr; i++) acc[i] += A[r][i0 + i] * b;
        }
        for (int i = 0; i < mr; i++) {
            HE_T* c = C + (i0 + i) * ldc + j;
            HE_V t = acc[i];
            if (add) t += HE_FN(part_v)(c, w);
            for (int v = 0; v < w; v++) c[v] = t[v];
        }
    }
}

#if HE_W == 8 && (defined(__clang__) || __GNUC__ >= 12)
#define HE_NARROW 1
/* Per 128-bit half: [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]. */
HE_INLINE HE_V HE_FN(hadd)(HE_V a, HE_V b)
{
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

/* The 4 lane sums of acc[0..3] as one half vector. */
HE_INLINE HE_H HE_FN(sum4)(HE_V a0, HE_V a1, HE_V a2, HE_V a3)
{
    HE_V h = HE_FN(hadd)(HE_FN(hadd)(a0, a1), HE_FN(hadd)(a2, a3));
    return __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
}

/* nn for N = 4 (the chain's last core, q = 4), K a multiple of 8: each output
   is a dot product of a row of A with a column of B (Bt = B^T, contiguous), so
   the K loop runs on full vectors; two rows share the Bt loads, and one
   transposing reduction (three horizontal adds) yields a row's 4 outputs. The
   row-broadcast tile would run on half vectors with a broadcast per FMA. */
HE_INLINE void HE_FN(nn_narrow)(int64_t M, int64_t K, const HE_T* const* A, const HE_T* Bt,
                                HE_T* const* C, int add)
{
    int64_t r = 0;
    for (; r + 2 <= M; r += 2) {
        HE_V p0 = {0}, p1 = {0}, p2 = {0}, p3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
        const HE_T* x = A[r];
        const HE_T* y = A[r + 1];
        for (int64_t s = 0; s < K; s += 8) {
            HE_V a = HE_FN(ld)(x + s), b = HE_FN(ld)(y + s), t;
            t = HE_FN(ld)(Bt + s);         p0 += a * t; q0 += b * t;
            t = HE_FN(ld)(Bt + K + s);     p1 += a * t; q1 += b * t;
            t = HE_FN(ld)(Bt + 2 * K + s); p2 += a * t; q2 += b * t;
            t = HE_FN(ld)(Bt + 3 * K + s); p3 += a * t; q3 += b * t;
        }
        HE_H u = HE_FN(sum4)(p0, p1, p2, p3), w = HE_FN(sum4)(q0, q1, q2, q3);
        if (add) {
            u += *(const HE_H*)C[r];
            w += *(const HE_H*)C[r + 1];
        }
        *(HE_H*)C[r] = u;
        *(HE_H*)C[r + 1] = w;
    }
    if (r < M) {
        HE_V p0 = {0}, p1 = {0}, p2 = {0}, p3 = {0};
        const HE_T* x = A[r];
        for (int64_t s = 0; s < K; s += 8) {
            HE_V a = HE_FN(ld)(x + s);
            p0 += a * HE_FN(ld)(Bt + s);
            p1 += a * HE_FN(ld)(Bt + K + s);
            p2 += a * HE_FN(ld)(Bt + 2 * K + s);
            p3 += a * HE_FN(ld)(Bt + 3 * K + s);
        }
        HE_H u = HE_FN(sum4)(p0, p1, p2, p3);
        if (add) u += *(const HE_H*)C[r];
        *(HE_H*)C[r] = u;
    }
}
#else
#define HE_NARROW 0
#endif

/* Whether nn reads B through its transpose for these sizes (the narrow kernel). */
static inline int HE_FN(wants_bt)(int64_t N, int64_t K)
{
    return HE_NARROW && N == 4 && K % 8 == 0 && K <= 256;
}

/* Bt: NULL, or B^T (N x K, contiguous) where wants_bt(N, K): a caller that
   multiplies many small row sets by the same slices transposes them once
   (the copy per call costs as much as a 16-row product). */
HE_TOP static void HE_FN(nn)(int64_t M, int64_t N, int64_t K, const HE_T* const* A,
                                const HE_T* B, int64_t ldb, const HE_T* Bt, HE_T* const* C,
                                int add)
{
#if HE_NARROW
    if (HE_FN(wants_bt)(N, K)) {
        HE_T T[4 * 256];
        if (Bt == NULL) {
            for (int64_t s = 0; s < K; s++)
                for (int j = 0; j < 4; j++) T[j * K + s] = B[s * ldb + j];
            Bt = T;
        }
        HE_FN(nn_narrow)(M, K, A, Bt, C, add);
        return;
    }
#else
    (void)Bt;
#endif
#ifdef HE_WIDER
    if (HE_WIDER_COLS(N) && he_tt_wider()) {
        HE_WIDER(nn)(M, N, K, A, B, ldb, NULL, C, add);
        return;
    }
#endif
    int64_t r = 0;
    for (; r + HE_TILE <= M; r += HE_TILE) HE_FN(nn_rows)(HE_TILE, N, K, A + r, B, ldb, C + r, add);
    switch (M - r) {
    case 3: HE_FN(nn_rows)(3, N, K, A + r, B, ldb, C + r, add); break;
    case 2: HE_FN(nn_rows)(2, N, K, A + r, B, ldb, C + r, add); break;
    case 1: HE_FN(nn_rows)(1, N, K, A + r, B, ldb, C + r, add); break;
    default: break;
    }
}

HE_TOP static void HE_FN(tn)(int64_t M, int64_t N, int64_t K, const HE_T* const* A,
                                const HE_T* const* D, HE_T* C, int64_t ldc, int add)
{
#ifdef HE_WIDER
    if (HE_WIDER_COLS(N) && he_tt_wider()) {
        HE_WIDER(tn)(M, N, K, A, D, C, ldc, add);
        return;
    }
#endif
    int64_t i = 0;
    for (; i + HE_TILE <= M; i += HE_TILE) HE_FN(tn_rows)(HE_TILE, N, K, A, D, C, ldc, i, add);
    switch (M - i) {
    case 3: HE_FN(tn_rows)(3, N, K, A, D, C, ldc, i, add); break;
    case 2: HE_FN(tn_rows)(2, N, K, A, D, C, ldc, i, add); break;
    case 1: HE_FN(tn_rows)(1, N, K, A, D, C, ldc, i, add); break;
    default: break;
    }
}

#else   /* no vector extensions: plain loops, same results up to rounding */

static inline int HE_FN(wants_bt)(int64_t N, int64_t K)
{
    (void)N;
    (void)K;
    return 0;
}

static void HE_FN(nn)(int64_t M, int64_t N, int64_t K, const HE_T* const* A,
                      const HE_T* B, int64_t ldb, const HE_T* Bt, HE_T* const* C, int add)
{
    (void)Bt;
    for (int64_t r = 0; r < M; r++)
        for (int64_t j = 0; j < N; j++) {
            HE_T t = 0;
            for (int64_t s = 0; s < K; s++) t += A[r][s] * B[s * ldb + j];
            C[r][j] = add ? C[r][j] + t : t;
        }
}

static void HE_FN(tn)(int64_t M, int64_t N, int64_t K, const HE_T* const* A,
                      const HE_T* const* D, HE_T* C, int64_t ldc, int add)
{
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            HE_T t = 0;
            for (int64_t r = 0; r < K; r++) t += A[r][i] * D[r][j];
            C[i * ldc + j] = add ? C[i * ldc + j] + t : t;
        }
}

#endif

#undef HE_TILE
#undef HE_NARROW
