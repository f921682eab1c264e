/* robuq's CPU kernels: one pass per token where PyTorch needs one pass per operation.
 *
 * Built at first use by robuq/kernels/native.py (cc -O3 -march=native -fopenmp) and called through
 * ctypes on contiguous float32 rows. Each function has a PyTorch twin that defines what it computes;
 * the tests hold the two equal.
 *
 * Hadamard layout: a row of n = m·p values is an (m, p) matrix X with p a power of two; the normalised
 * transform is H_m·X·H_p / √n, H_p applied as a fast Walsh–Hadamard transform (Sylvester order) and
 * H_m, pre-scaled by the caller to H_m/√n, as a dense m×m mix.
 *
 * Rows are processed LANES at a time, transposed into a tile t[i][lane]: every butterfly, multiply-add
 * and statistic then runs across lanes, one full vector register, whatever its stride within the row.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RULE_MINMAX 0
#define RULE_GAUSSIAN 1
#define RULE_MAX_ONLY 2 /* softmax probabilities: the grid runs from 0 to the row's maximum */
#define LANES 16

/* One tile row: a value per lane. GCC's vector extensions make every lane loop one SIMD operation
 * (AVX-512: one register) instead of leaving it to the auto-vectorizer. Tiles are 64-byte aligned. */
typedef float lanes_f __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t lanes_i __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef int8_t lanes_b __attribute__((vector_size(LANES)));

static inline lanes_f lanes_min(lanes_f a, lanes_f b) {
    const lanes_i less = a < b;
    return (lanes_f)(((lanes_i)a & less) | ((lanes_i)b & ~less));
}
static inline lanes_f lanes_max(lanes_f a, lanes_f b) { return -lanes_min(-a, -b); }
static inline lanes_f lanes_splat(float v) { return (lanes_f){0} + v; }

/* aligned_alloc wants a size that is a multiple of the alignment. */
static void *aligned_buffer(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }
static float *tile_buffer(int64_t n) { return aligned_buffer((size_t)(n * LANES) * sizeof(float)); }

/* Rows [0, count) of x (row length n) into the tile, times signs if given; unused lanes hold zeros. */
static void load_tile(const float *restrict x, int64_t count, int64_t n, const float *restrict signs, float *restrict t) {
    for (int64_t i = 0; i < n; i++) {
        const float sign = signs ? signs[i] : 1.0f;
        for (int l = 0; l < LANES; l++) t[i * LANES + l] = l < count ? x[l * n + i] * sign : 0.0f;
    }
}

/* Scalar on purpose: vectorized, GCC emits scatters, which are several times slower here. */
__attribute__((optimize("no-tree-vectorize")))
static void store_tile(const float *restrict t, int64_t count, int64_t n, float *restrict y) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t l = 0; l < count; l++) y[l * n + i] = t[i * LANES + l];
}

#ifdef __SSE2__
#include <emmintrin.h>
/* 16×16 bytes: rows in[0..15] (stride 16) → columns, written as 16 rows of 16 bytes at out (stride n). */
static void transpose_16x16_int8(const int8_t *in, int8_t *out, int64_t n) {
    __m128i a[16], b[16];
    for (int r = 0; r < 16; r++) a[r] = _mm_loadu_si128((const __m128i *)(in + r * 16));
    for (int r = 0; r < 8; r++) {
        b[2 * r] = _mm_unpacklo_epi8(a[2 * r], a[2 * r + 1]);
        b[2 * r + 1] = _mm_unpackhi_epi8(a[2 * r], a[2 * r + 1]);
    }
    for (int r = 0; r < 4; r++)
        for (int h = 0; h < 2; h++) {
            a[4 * r + 2 * h] = _mm_unpacklo_epi16(b[4 * r + h], b[4 * r + h + 2]);
            a[4 * r + 2 * h + 1] = _mm_unpackhi_epi16(b[4 * r + h], b[4 * r + h + 2]);
        }
    for (int r = 0; r < 2; r++)
        for (int h = 0; h < 4; h++) {
            b[8 * r + 2 * h] = _mm_unpacklo_epi32(a[8 * r + h], a[8 * r + h + 4]);
            b[8 * r + 2 * h + 1] = _mm_unpackhi_epi32(a[8 * r + h], a[8 * r + h + 4]);
        }
    for (int h = 0; h < 8; h++) {
        a[2 * h] = _mm_unpacklo_epi64(b[h], b[h + 8]);
        a[2 * h + 1] = _mm_unpackhi_epi64(b[h], b[h + 8]);
    }
    for (int r = 0; r < 16; r++) _mm_storeu_si128((__m128i *)(out + r * n), a[r]);
}
#endif

static void store_tile_int8(const int8_t *restrict t, int64_t count, int64_t n, int8_t *restrict y) {
    int64_t i = 0;
#ifdef __SSE2__
    if (count == LANES)
        for (; i + 16 <= n; i += 16) transpose_16x16_int8(t + i * LANES, y + i, n);
#endif
    for (; i < n; i++)
        for (int64_t l = 0; l < count; l++) y[l * n + i] = t[i * LANES + l];
}

static void fwht_tile(float *restrict t, int64_t p) {
    lanes_f *v = (lanes_f *)t;
    for (int64_t h = 1; h < p; h *= 2)
        for (int64_t i = 0; i < p; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                const lanes_f a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
}

/* Rows [i0, i0 + IB) of out = H_m · t, column by column with the IB sums held in registers: each source
 * value is loaded once per IB outputs and nothing but the result is stored. Fused multiply-adds are
 * allowed here only: the transform's rounding is no more fixed than PyTorch's matmul, unlike the
 * quantizer's arithmetic. */
#define DEFINE_MIX_ROWS(IB)                                                                                   \
    __attribute__((optimize("fp-contract=fast"))) static void mix_rows_##IB(                                  \
        const lanes_f *restrict src, lanes_f *restrict dst, int64_t m, int64_t p, const float *restrict hm,    \
        int64_t i0) {                                                                                          \
        for (int64_t j = 0; j < p; j++) {                                                                      \
            lanes_f acc[IB];                                                                                   \
            for (int b = 0; b < IB; b++) acc[b] = (lanes_f){0};                                                \
            for (int64_t k = 0; k < m; k++) {                                                                  \
                const lanes_f v = src[k * p + j];                                                              \
                for (int b = 0; b < IB; b++) acc[b] += hm[(i0 + b) * m + k] * v;                               \
            }                                                                                                  \
            for (int b = 0; b < IB; b++) dst[(i0 + b) * p + j] = acc[b];                                       \
        }                                                                                                      \
    }
DEFINE_MIX_ROWS(12)
DEFINE_MIX_ROWS(4)
DEFINE_MIX_ROWS(1)

/* out = H_m · t over the (m, p) layout of each lane; hm is row-major m×m. */
static void mix_tile(const float *restrict t, float *restrict out, int64_t m, int64_t p, const float *restrict hm) {
    const lanes_f *src = (const lanes_f *)t;
    lanes_f *dst = (lanes_f *)out;
    int64_t i = 0;
    for (; i + 12 <= m; i += 12) mix_rows_12(src, dst, m, p, hm, i);
    for (; i + 4 <= m; i += 4) mix_rows_4(src, dst, m, p, hm, i);
    for (; i < m; i++) mix_rows_1(src, dst, m, p, hm, i);
}

/* The tile `t` (signs already applied for the forward transform) rotated into `out`. */
static void rotate_tile(float *restrict t, float *restrict out, int64_t n, int64_t m, const float *restrict hm,
                        const float *restrict signs_after) {
    const int64_t p = n / m;
    for (int64_t k = 0; k < m; k++) fwht_tile(t + k * p * LANES, p);
    mix_tile(t, out, m, p, hm);
    if (signs_after)
        for (int64_t i = 0; i < n; i++)
            for (int l = 0; l < LANES; l++) out[i * LANES + l] *= signs_after[i];
}

/* Functions that allocate return 0, or −1 when memory ran out (nothing is then written reliably). */
static void note_failure(int ok, int *failed) {
    if (!ok) {
#pragma omp atomic write
        *failed = 1;
    }
}

int robuq_hadamard(const float *x, float *y, int64_t rows, int64_t n, int64_t m, const float *hm,
                   const float *signs, int inverse, int threads) {
    const int64_t tiles = (rows + LANES - 1) / LANES;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *t = tile_buffer(n), *out = tile_buffer(n);
        const int ok = t && out;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < tiles; g++) {
            if (!ok) continue;
            const int64_t first = g * LANES, count = rows - first < LANES ? rows - first : LANES;
            load_tile(x + first * n, count, n, inverse ? NULL : signs, t);
            rotate_tile(t, out, n, m, hm, inverse ? signs : NULL);
            store_tile(out, count, n, y + first * n);
        }
        note_failure(ok, &failed);
        free(t);
        free(out);
    }
    return failed ? -1 : 0;
}

/* Scale and offset from a row's statistics, in the order robuq.quant.activation computes them. */
static void finish_scale_offset(float lo, float hi, float mean, float std, int bits, int rule, float step_factor,
                                float ratio, float *scale, float *offset) {
    const float top = (float)((1 << bits) - 1);
    if (rule == RULE_GAUSSIAN) {
        float s = step_factor * std * ratio;
        s = s > 1e-8f ? s : 1e-8f;
        *scale = s;
        *offset = mean - s * (top / 2);
    } else if (rule == RULE_MAX_ONLY) {
        const float s = hi / top;
        *scale = s > 1e-12f ? s : 1e-12f;
        *offset = 0.0f;
    } else {
        const float center = (lo + hi) / 2, half = (hi - lo) / 2 * ratio;
        const float s = 2 * half / top;
        *scale = s > 1e-8f ? s : 1e-8f;
        *offset = center - half;
    }
}

/* Per-lane scale and offset of a tile whose n entries per lane are one row each. */
static void tile_scale_offset(const float *restrict t, int64_t n, int bits, int rule, float step_factor, float ratio,
                              float *restrict scale, float *restrict offset) {
    const lanes_f *v = (const lanes_f *)t;
    lanes_f lo = v[0], hi = v[0], mean = {0}, std = {0};
    if (rule == RULE_GAUSSIAN) {
        double sum[LANES] = {0}, squares[LANES] = {0};
        for (int64_t i = 0; i < n; i++)
            for (int l = 0; l < LANES; l++) sum[l] += t[i * LANES + l];
        for (int l = 0; l < LANES; l++) mean[l] = (float)(sum[l] / (double)n);
        for (int64_t i = 0; i < n; i++)
            for (int l = 0; l < LANES; l++) {
                const double d = (double)(t[i * LANES + l] - mean[l]);
                squares[l] += d * d;
            }
        for (int l = 0; l < LANES; l++) std[l] = (float)sqrt(squares[l]) / sqrtf((float)n);
    } else {
        for (int64_t i = 1; i < n; i++) {
            lo = lanes_min(v[i], lo);
            hi = lanes_max(v[i], hi);
        }
    }
    for (int l = 0; l < LANES; l++)
        finish_scale_offset(lo[l], hi[l], mean[l], std[l], bits, rule, step_factor, ratio, &scale[l], &offset[l]);
}

/* Levels of one tile row: clamp(round_half_even((v − o)/s), 0, top) − shift. Rounding by adding and
 * subtracting 1.5·2^23 is exact and ties to even for |u| < 2^22, which the pre-clamp to [−1, top + 1]
 * guarantees without changing the clamped result. */
static inline lanes_b lanes_levels(lanes_f v, lanes_f s, lanes_f o, float top, float shift) {
    const lanes_f magic = lanes_splat(12582912.0f);
    lanes_f u = (v - o) / s;
    u = lanes_max(lanes_min(u, lanes_splat(top + 1)), lanes_splat(-1.0f));
    u = (u + magic) - magic;
    u = lanes_max(lanes_min(u, lanes_splat(top)), lanes_splat(0.0f)) - shift;
    return __builtin_convertvector(__builtin_convertvector(u, lanes_i), lanes_b);
}

static inline float level_of(float v, float scale, float offset, float top) {
    /* (v − o)/s rounded half to even, as torch.round; a true division, as PyTorch's div_. */
    float u = rintf((v - offset) / scale);
    return u < 0.0f ? 0.0f : (u > top ? top : u);
}

/* Rotate (if hm) and quantize each row to int8 levels 0 … 2^b − 1 minus `shift`, with per-row scale and
 * offset; y (optional) gets the rotated rows. */
int robuq_hadamard_quantize(const float *x, float *y, int8_t *levels, float *scale, float *offset, int64_t rows,
                            int64_t n, int64_t m, const float *hm, const float *signs, int bits, int rule,
                            float step_factor, float ratio, int shift, int threads) {
    const float top = (float)((1 << bits) - 1);
    const int64_t tiles = (rows + LANES - 1) / LANES;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *t = tile_buffer(n), *out = tile_buffer(n);
        int8_t *q = aligned_buffer((size_t)(n * LANES));
        const int ok = t && out && q;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < tiles; g++) {
            if (!ok) continue;
            const int64_t first = g * LANES, count = rows - first < LANES ? rows - first : LANES;
            load_tile(x + first * n, count, n, hm ? signs : NULL, t);
            float *rotated = t;
            if (hm) {
                rotate_tile(t, out, n, m, hm, NULL);
                rotated = out;
            }
            float s[LANES], o[LANES];
            tile_scale_offset(rotated, n, bits, rule, step_factor, ratio, s, o);
            lanes_f sv, ov;
            memcpy(&sv, s, sizeof sv);
            memcpy(&ov, o, sizeof ov);
            const lanes_f *rv = (const lanes_f *)rotated;
            lanes_b *qv = (lanes_b *)q;
            for (int64_t i = 0; i < n; i++) qv[i] = lanes_levels(rv[i], sv, ov, top, (float)shift);
            store_tile_int8(q, count, n, levels + first * n);
            if (y) store_tile(rotated, count, n, y + first * n);
            for (int64_t l = 0; l < count; l++) {
                scale[first + l] = s[l];
                offset[first + l] = o[l];
            }
        }
        note_failure(ok, &failed);
        free(t);
        free(out);
        free(q);
    }
    return failed ? -1 : 0;
}

/* The integer linear's epilogue in one pass: y = acc·s_r·α_c + o_r·w_c + b_c, where acc is the int32
 * product of the levels and w_c = α_c·Σ_k L_kc carries the activation offset. */
void robuq_rescale(const int32_t *acc, float *y, int64_t rows, int64_t cols, const float *s, const float *o,
                   const float *alpha, const float *w, const float *bias, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *restrict a = acc + r * cols;
        float *restrict out = y + r * cols;
        const float sr = s[r], orow = o[r];
        for (int64_t c = 0; c < cols; c++) out[c] = (float)a[c] * sr * alpha[c] + (orow * w[c] + bias[c]);
    }
}

/* ---- Integer attention. A quantized value is s·(l + shift) + o = s·l + c with int8 levels l and
 * c = o + shift·s; products of levels are exact int32 GEMMs, and the affine terms come back through
 * the level sums. ---- */

/* Statistics of one contiguous row, accumulated in LANES interleaved partial results so that they
 * vectorize along the row (the order of a float sum is no more fixed in PyTorch). */
static void row_scale_offset(const float *restrict v, int64_t n, int bits, int rule, float step_factor, float *scale,
                             float *offset) {
    float lo = v[0], hi = v[0], mean = 0.0f, std = 0.0f;
    if (rule == RULE_GAUSSIAN) {
        double part[LANES] = {0}, total = 0.0;
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES)
            for (int l = 0; l < LANES; l++) part[l] += v[i + l];
        for (; i < n; i++) total += v[i];
        for (int l = 0; l < LANES; l++) total += part[l];
        mean = (float)(total / (double)n);
        double squares = 0.0;
        for (i = 0; i < n; i++) squares += (double)(v[i] - mean) * (double)(v[i] - mean);
        std = (float)sqrt(squares) / sqrtf((float)n);
    } else {
        float los[LANES], his[LANES];
        for (int l = 0; l < LANES; l++) los[l] = his[l] = v[0];
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES)
            for (int l = 0; l < LANES; l++) {
                los[l] = v[i + l] < los[l] ? v[i + l] : los[l];
                his[l] = v[i + l] > his[l] ? v[i + l] : his[l];
            }
        for (; i < n; i++) {
            lo = v[i] < lo ? v[i] : lo;
            hi = v[i] > hi ? v[i] : hi;
        }
        for (int l = 0; l < LANES; l++) {
            lo = los[l] < lo ? los[l] : lo;
            hi = his[l] > hi ? his[l] : hi;
        }
    }
    finish_scale_offset(lo, hi, mean, std, bits, rule, step_factor, 1.0f, scale, offset);
}

/* Per-row levels of `rows` contiguous rows of n (rule minmax or max), with scale, c and level sums. */
void robuq_quantize_rows_int8(const float *x, int8_t *levels, float *scale, float *c, int32_t *sums, int64_t rows,
                              int64_t n, int bits, int rule, int shift, int threads) {
    const float top = (float)((1 << bits) - 1);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict v = x + r * n;
        int8_t *restrict l = levels + r * n;
        float s, o;
        row_scale_offset(v, n, bits, rule, 0.0f, &s, &o);
        int32_t total = 0;
        for (int64_t i = 0; i < n; i++) {
            const int32_t q = (int32_t)level_of(v[i], s, o, top) - shift;
            l[i] = (int8_t)q;
            total += q;
        }
        scale[r] = s;
        c[r] = o + (float)shift * s;
        sums[r] = total;
    }
}

/* Per-column min–max levels of `mats` contiguous (rows × cols) matrices: V's scales run along channels,
 * because probs·V sums over tokens. scale, c and sums are (mats × cols). */
int robuq_quantize_columns_int8(const float *x, int8_t *levels, float *scale, float *c, int32_t *sums, int64_t mats,
                                int64_t rows, int64_t cols, int bits, int shift, int threads) {
    const float top = (float)((1 << bits) - 1);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *lo = malloc((size_t)cols * sizeof(float)), *hi = malloc((size_t)cols * sizeof(float));
        float *s = malloc((size_t)cols * sizeof(float)), *o = malloc((size_t)cols * sizeof(float));
        const int ok = lo && hi && s && o;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < mats; m++) {
            if (!ok) continue;
            const float *restrict v = x + m * rows * cols;
            int8_t *restrict l = levels + m * rows * cols;
            for (int64_t j = 0; j < cols; j++) lo[j] = hi[j] = v[j];
            for (int64_t i = 1; i < rows; i++)
                for (int64_t j = 0; j < cols; j++) {
                    const float u = v[i * cols + j];
                    lo[j] = u < lo[j] ? u : lo[j];
                    hi[j] = u > hi[j] ? u : hi[j];
                }
            for (int64_t j = 0; j < cols; j++) {
                finish_scale_offset(lo[j], hi[j], 0.0f, 0.0f, bits, RULE_MINMAX, 0.0f, 1.0f, &s[j], &o[j]);
                scale[m * cols + j] = s[j];
                c[m * cols + j] = o[j] + (float)shift * s[j];
                sums[m * cols + j] = 0;
            }
            for (int64_t i = 0; i < rows; i++)
                for (int64_t j = 0; j < cols; j++) {
                    const int32_t q = (int32_t)level_of(v[i * cols + j], s[j], o[j], top) - shift;
                    l[i * cols + j] = (int8_t)q;
                    sums[m * cols + j] += q;
                }
        }
        note_failure(ok, &failed);
        free(lo);
        free(hi);
        free(s);
        free(o);
    }
    return failed ? -1 : 0;
}

/* scores = (q·k)/√d from the int32 level products: q·k = s_q s_k acc + s_q A_q c_k + c_q s_k A_k + d c_q c_k. */
void robuq_attention_scores(const int32_t *acc, float *out, int64_t mats, int64_t nq, int64_t nk, int64_t d,
                            const float *sq, const float *cq, const int32_t *aq, const float *sk, const float *ck,
                            const int32_t *ak, float inv_sqrt_d, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < mats * nq; row++) {
        const int64_t m = row / nq;
        const float *restrict skm = sk + m * nk, *restrict ckm = ck + m * nk;
        const int32_t *restrict akm = ak + m * nk;
        const int32_t *restrict a = acc + row * nk;
        float *restrict o = out + row * nk;
        const float s = sq[row], sa = sq[row] * (float)aq[row], c = cq[row];
        for (int64_t j = 0; j < nk; j++)
            o[j] = (s * skm[j] * (float)a[j] + sa * ckm[j] + c * (skm[j] * (float)akm[j] + (float)d * ckm[j])) * inv_sqrt_d;
    }
}

/* out = p·v from the int32 level products, written (batch, nq, heads, d) so that the caller's
 * transpose(1, 2) is already contiguous: p·v = s_p [s_v (acc + shift_p B_v) + c_v (A_p + shift_p nk)],
 * the probabilities having offset 0 (their c_p is shift_p·s_p). */
void robuq_attention_output(const int32_t *acc, float *out, int64_t heads, int64_t mats, int64_t nq, int64_t d,
                            int64_t nk, const float *sp, const int32_t *ap, const float *sv, const float *cv,
                            const int32_t *bv, int shift_p, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < mats * nq; row++) {
        const int64_t m = row / nq, i = row % nq, b = m / heads, h = m % heads;
        const float *restrict svm = sv + m * d, *restrict cvm = cv + m * d;
        const int32_t *restrict bvm = bv + m * d;
        const int32_t *restrict a = acc + row * d;
        float *restrict o = out + ((b * nq + i) * heads + h) * d;
        /* The shifted sums in integers, converted once: |acc|, |shift·B_v| ≤ 2^15·nk would not stay exact
         * as separate floats above 2^24, and the two nearly cancel. */
        const float s = sp[row], count = (float)((int64_t)ap[row] + (int64_t)shift_p * nk);
        for (int64_t c = 0; c < d; c++)
            o[c] = s * (svm[c] * (float)((int64_t)a[c] + (int64_t)shift_p * bvm[c]) + cvm[c] * count);
    }
}

/* ---- tanh-GELU, 0.5·x·(1 + tanh(u)) with u = √(2/π)(x + 0.044715x³), = x·e^{2u}/(1 + e^{2u}). PyTorch's CPU tanh is
 * the slow part of its GELU; this exp has ~1 ulp error (Cody–Waite reduction, degree-6 Taylor on
 * |r| ≤ ln2/2), so the result matches PyTorch's to about 1e-7 relative. ---- */
static inline lanes_f lanes_exp(lanes_f x) {
    x = lanes_max(lanes_min(x, lanes_splat(88.0f)), lanes_splat(-87.0f));
    const lanes_f magic = lanes_splat(12582912.0f);
    const lanes_f k = (x * lanes_splat(1.44269504088896341f) + magic) - magic;
    const lanes_f r = (x - k * lanes_splat(0.693145751953125f)) - k * lanes_splat(1.428606765330187e-06f);
    lanes_f p = lanes_splat(1.0f / 720.0f);
    p = p * r + lanes_splat(1.0f / 120.0f);
    p = p * r + lanes_splat(1.0f / 24.0f);
    p = p * r + lanes_splat(1.0f / 6.0f);
    p = p * r + lanes_splat(0.5f);
    p = p * r + lanes_splat(1.0f);
    p = p * r + lanes_splat(1.0f);
    const lanes_i two_k = (__builtin_convertvector(k, lanes_i) + 127) << 23;
    return p * (lanes_f)two_k;
}

static inline lanes_f lanes_gelu_tanh(lanes_f x) {
    const lanes_f u = lanes_splat(0.7978845608028654f) * (x + lanes_splat(0.044715f) * x * x * x);
    const lanes_f e = lanes_exp(u + u);
    return x * (e / (lanes_splat(1.0f) + e)); /* not x − x/(1 + e): that cancels where GELU is small */
}

void robuq_gelu_tanh(const float *x, float *y, int64_t n, int threads) {
    const int64_t full = n / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b <= full; b++) {
        lanes_f v = {0};
        const int64_t count = b < full ? LANES : n - full * LANES;
        if (count == 0) continue;
        memcpy(&v, x + b * LANES, (size_t)count * sizeof(float));
        v = lanes_gelu_tanh(v);
        memcpy(y + b * LANES, &v, (size_t)count * sizeof(float));
    }
}
