/* SNELL's backward on CPU with the weight gradient formed only where the mask keeps it.

   Built by visionpeft/ops/native.py with the machine's C compiler (OpenMP, -ffp-contract=off)
   and called through snell_native.py (`native_sparse_grads`) when compiled kernels are on.

   With the distance kernel T_k[i, j] = |s| ||a_k,i - b_k,j|| over the two halves k of the
   rank, D = T_1 - T_2 (negated when s < 0) and the mask |D| > threshold, the factor
   gradients need only H_k = G_m / T_k, where G_m is dL/dW' = g^T x times the host scale on
   the kept entries and zero elsewhere (times |D| with reweight). The dense product g^T x
   (a host-size GEMM, more than a third of a ViT step at batch 4) is therefore replaced by
   one dot product over the tokens per kept entry: with 90% sparsity a tenth of the
   multiply-adds. Everything else is linear in G_m, so a caller may split the tokens into
   chunks and call once per chunk: `rows` and `cols` are accumulated, never overwritten.

   Per row i and block of columns: T_1, T_2 and D as in snell_math.py's `pointwise_terms`
   (squared differences summed coordinate by coordinate in the same order, one sqrt, the
   scale: the same float operations as the forward, so the mask is the forward's bit for
   bit), W' = W + host_scale * kept (when `W` is given), the kept columns gathered, and for
   each a dot product of gT[i] with xT[j]; then H_k is reduced into
     rows[i] = [sum_j H_1, sum_j H_1 b_1,j (h values), sum_j H_2, sum_j H_2 b_2,j]
     cols[j] = [sum_i H_1, sum_i H_1 a_1,i, sum_i H_2, sum_i H_2 a_2,i]
   (each (2 h + 2) wide, the layout of snell_math.py's `grads_from_sums`). Threads split the
   rows; each keeps its own column sums, added up at the end. Column blocks of `col_block`
   keep the xT rows a block reads in the core's cache while all the thread's rows use them. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* 64 independent lanes: four 16-wide accumulators, so consecutive fused multiply-adds
   do not wait on each other */
static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[64] = {0};
    int64_t t = 0;
    for (; t + 64 <= n; t += 64) {
#pragma omp simd
        for (int l = 0; l < 64; ++l) acc[l] = __builtin_fmaf(a[t + l], b[t + l], acc[l]);
    }
    /* pairwise, so the reduction is four vector adds, not a chain of 64 scalar ones */
    for (int w = 32; w >= 1; w /= 2) {
#pragma omp simd
        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    }
    float s = acc[0];
    for (; t < n; ++t) s = __builtin_fmaf(a[t], b[t], s);
    return s;
}

/* four dot products of `a` with b[0..3] at once: four rows of xT stream in together, which
   the memory system serves in parallel (one row after another waits on each row's start) */
static inline void dot4(const float *restrict a, const float *const b[4], int64_t n, float res[4]) {
    float acc[4][32] = {{0}};
    int64_t t = 0;
    for (; t + 32 <= n; t += 32) {
        for (int m = 0; m < 4; ++m) {
            const float *restrict bm = b[m] + t;
#pragma omp simd
            for (int l = 0; l < 32; ++l) acc[m][l] = __builtin_fmaf(a[t + l], bm[l], acc[m][l]);
        }
    }
    for (int m = 0; m < 4; ++m) {
        for (int w = 16; w >= 1; w /= 2) {
#pragma omp simd
            for (int l = 0; l < w; ++l) acc[m][l] += acc[m][l + w];
        }
        float s = acc[m][0];
        for (int64_t u = t; u < n; ++u) s = __builtin_fmaf(a[u], b[m][u], s);
        res[m] = s;
    }
}

/* dst (cols, rows) = src (rows, cols) transposed, src rows `stride` floats apart: 64 x 64
   tiles through a local buffer, read and written a row at a time (torch's strided copy
   measured 4.5 ms for a (788, 3072) matrix here, this about 2 ms) */
void transpose_f32(const float *src, int64_t rows, int64_t cols, int64_t stride, float *dst, int n_threads) {
    enum { T = 64 };
    const int64_t tiles_r = (rows + T - 1) / T, tiles_c = (cols + T - 1) / T;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t tile = 0; tile < tiles_r * tiles_c; ++tile) {
        const int64_t r0 = tile / tiles_c * T, c0 = tile % tiles_c * T;
        const int64_t nr = rows - r0 < T ? rows - r0 : T, nc = cols - c0 < T ? cols - c0 : T;
        float buf[T * T];
        for (int64_t r = 0; r < nr; ++r)
            for (int64_t c = 0; c < nc; ++c) buf[c * T + r] = src[(r0 + r) * stride + c0 + c];
        for (int64_t c = 0; c < nc; ++c)
            for (int64_t r = 0; r < nr; ++r) dst[(c0 + c) * rows + r0 + r] = buf[c * T + r];
    }
}

/* One row i over n columns: T_1, T_2 (the same float operations as the compiled forward:
   squared differences added coordinate by coordinate, then sqrt, then the scale), |D|, and
   W' = W + host_scale * kept when Wo is given; vectorised over the columns. */
static void row_terms(const float *a, const float *Bt, int64_t in, int64_t h, int64_t n, float scale_abs,
                      int negate, float threshold, int reweight, float host_scale, const float *Wi,
                      float *Wo, float *T1, float *T2, float *aD) {
    for (int64_t j0 = 0; j0 < n; j0 += 64) {  /* 64 columns at a time: the sums stay in registers */
        const int64_t m = n - j0 < 64 ? n - j0 : 64;
        float q1[64], q2[64];
        const float *b = Bt + j0;
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) { float d = a[0] - b[j]; q1[j] = d * d; }
        for (int64_t k = 1; k < h; ++k) {
#pragma omp simd
            for (int64_t j = 0; j < m; ++j) { float d = a[k] - b[k * in + j]; q1[j] = q1[j] + d * d; }
        }
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) { float d = a[h] - b[h * in + j]; q2[j] = d * d; }
        for (int64_t k = h + 1; k < 2 * h; ++k) {
#pragma omp simd
            for (int64_t j = 0; j < m; ++j) { float d = a[k] - b[k * in + j]; q2[j] = q2[j] + d * d; }
        }
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) {
            const float t1 = scale_abs * sqrtf(q1[j]), t2 = scale_abs * sqrtf(q2[j]);
            const float D = negate ? -(t1 - t2) : t1 - t2, aDj = fabsf(D);
            T1[j0 + j] = t1;
            T2[j0 + j] = t2;
            aD[j0 + j] = aDj;
            if (Wo) {
                float kept = aDj > threshold ? D : 0.f;
                if (reweight) kept = kept * aDj;
                Wo[j0 + j] = Wi[j0 + j] + host_scale * kept;
            }
        }
    }
}

int snell_sparse_backward(const float *A, const float *Bt, const float *W, const float *gT,
                          const float *xT, int64_t out, int64_t in, int64_t h, int64_t n_tok,
                          float scale_abs, int negate, float threshold, float host_scale,
                          int reweight, float *w_out, float *rows, float *cols, int64_t col_block,
                          int n_threads) {
    const int64_t C = 2 * (h + 1), r = 2 * h;
    if (h < 1 || h > 31 || col_block < 1 || n_threads < 1) return 1;
    float *parts = calloc((size_t)n_threads * in * C, sizeof(float));
    float *rowbuf = malloc((size_t)n_threads * 3 * col_block * sizeof(float));
    int32_t *idxbuf = malloc((size_t)n_threads * col_block * sizeof(int32_t));
    if (!parts || !rowbuf || !idxbuf) { free(parts); free(rowbuf); free(idxbuf); return 2; }
#pragma omp parallel num_threads(n_threads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        float *part = parts + (int64_t)tid * in * C;
        float *T1 = rowbuf + (int64_t)tid * 3 * col_block, *T2 = T1 + col_block, *aD = T2 + col_block;
        int32_t *idx = idxbuf + (int64_t)tid * col_block;
        const int64_t i_lo = out * tid / nt, i_hi = out * (tid + 1) / nt;
        for (int64_t j0 = 0; j0 < in; j0 += col_block) {
            const int64_t n = in - j0 < col_block ? in - j0 : col_block;
            for (int64_t i = i_lo; i < i_hi; ++i) {
                const float *a = A + i * r;
                row_terms(a, Bt + j0, in, h, n, scale_abs, negate, threshold, reweight, host_scale,
                          W ? W + i * in + j0 : NULL, W ? w_out + i * in + j0 : NULL, T1, T2, aD);
                int64_t nk = 0;  /* the kept columns, without a branch per column */
                for (int64_t j = 0; j < n; ++j) { idx[nk] = (int32_t)j; nk += aD[j] > threshold; }
                const float *g = gT + i * n_tok;
                float racc[64] = {0};
                float G4[4];
                for (int64_t q = 0; q < nk; ++q) {
                    const int64_t jl = idx[q], j = j0 + jl;
                    if (q % 4 == 0 && q + 4 <= nk) {
                        const float *b[4];
                        for (int m = 0; m < 4; ++m) b[m] = xT + (j0 + idx[q + m]) * n_tok;
                        dot4(g, b, n_tok, G4);
                    }
                    float Gm = (q / 4 * 4 + 4 <= nk ? G4[q % 4] : dot(g, xT + j * n_tok, n_tok)) * host_scale;
                    if (reweight) Gm = Gm * aD[jl];
                    const float H1 = T1[jl] > 0.f ? Gm / T1[jl] : 0.f;
                    const float H2 = T2[jl] > 0.f ? Gm / T2[jl] : 0.f;
                    float *pc = part + j * C;
                    racc[0] += H1; pc[0] += H1;
                    racc[h + 1] += H2; pc[h + 1] += H2;
                    for (int64_t k = 0; k < h; ++k) {
                        racc[1 + k] += H1 * Bt[k * in + j];
                        pc[1 + k] += H1 * a[k];
                        racc[h + 2 + k] += H2 * Bt[(h + k) * in + j];
                        pc[h + 2 + k] += H2 * a[h + k];
                    }
                }
                for (int64_t c = 0; c < C; ++c) rows[i * C + c] += racc[c];
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t e = 0; e < in * C; ++e) {
            float s = cols[e];
            for (int t = 0; t < nt; ++t) s += parts[(int64_t)t * in * C + e];
            cols[e] = s;
        }
    }
    free(parts); free(rowbuf); free(idxbuf);
    return 0;
}
