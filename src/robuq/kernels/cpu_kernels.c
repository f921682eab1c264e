/* robuq's CPU kernels: one pass per token where PyTorch needs one pass per operation.
 *
 * Built at first use by robuq/kernels/native.py (cc -O3 -march=native -fopenmp) and called through
 * ctypes on contiguous float32 rows. Each function has a PyTorch twin that defines what it computes;
 * the tests hold the two equal.
 *
 * Hadamard layout: a row of n = m·p values is an (m, p) matrix X with p a power of two; the normalised
 * transform is H_m·X·H_p / √n, H_p applied as a fast Walsh–Hadamard transform (Sylvester order) and
 * H_m, pre-scaled by the caller to H_m/√n, as a dense m×m mix (H_12: as sums of sign patterns, mix12_tile).
 *
 * Rows are processed LANES at a time, transposed into a tile t[i][lane]: every butterfly, multiply-add
 * and statistic then runs across lanes, one full vector register, whatever its stride within the row.
 *
 * Parallel loops hand out their tasks dynamically: the threads of a shared or hybrid CPU do not all run
 * at one speed, and with static halves the faster one waited for the slower at every kernel's end (an
 * exported DiT-S/2 forward 1.06× faster with dynamic scheduling, two threads on a shared 2-vCPU VM, A/B
 * in one process). Every task writes its own outputs, so the results do not depend on the schedule.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <immintrin.h> /* the x86 paths below: AVX2 transposes and packs, AVX2/AVX-512 dot products */
#endif

/* The quantizer's constants come from its one definition, robuq/core/quantizer_spec.py, as -D flags
 * that robuq/kernels/native.py generates: scale rule ids and the smallest scales. Level ranges (top =
 * 2^b − 1) and the int8 shift arrive as arguments. */
#if !defined(RULE_MINMAX) || !defined(RULE_GAUSSIAN) || !defined(SCALE_EPS) || !defined(PROBABILITY_SCALE_EPS)
#error "build through robuq/kernels/native.py: it defines the quantizer's constants from robuq/core/quantizer_spec.py"
#endif
#define BAD_ARGUMENT (-2) /* returned for a rule or level range this file does not implement */
#define LANES 16

/* One tile row: a value per lane. GCC's vector extensions make every lane loop one SIMD operation
 * (one register) instead of leaving it to the auto-vectorizer. Tiles are 64-byte aligned. Without
 * AVX-512 a tile is 8 lanes (one AVX2 register): 16 there split every value in two and spilled the
 * register-blocked loops, 2.2–2.6× slower (hadamard_quantize, rescale, attention, measured here). */
#ifndef __AVX512F__
#undef LANES
#define LANES 8
#endif
typedef float lanes_f __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t lanes_i __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef int8_t lanes_b __attribute__((vector_size(LANES)));

static inline lanes_f lanes_min(lanes_f a, lanes_f b) { /* a < b ? a : b, as vminps is defined (NaN, ±0) */
#if LANES == 8 && defined(__AVX__)
    return (lanes_f)__builtin_ia32_minps256((__v8sf)a, (__v8sf)b);
#else
    const lanes_i less = a < b;
    return (lanes_f)(((lanes_i)a & less) | ((lanes_i)b & ~less));
#endif
}
static inline lanes_f lanes_max(lanes_f a, lanes_f b) { /* a > b ? a : b, as vmaxps is defined */
#if LANES == 8 && defined(__AVX__)
    return (lanes_f)__builtin_ia32_maxps256((__v8sf)a, (__v8sf)b);
#else
    return -lanes_min(-a, -b);
#endif
}
static inline lanes_f lanes_splat(float v) { return (lanes_f){0} + v; }
static inline lanes_f lanes_load(const float *p) { /* LANES floats from any address */
    lanes_f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* aligned_alloc wants a size that is a multiple of the alignment. */
static void *aligned_buffer(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }
static float *tile_buffer(int64_t n) { return aligned_buffer((size_t)(n * LANES) * sizeof(float)); }

#if LANES == 8 && defined(__AVX2__)
/* 8 rows of 8 floats (stride n) times 8 signs, transposed into 8 tile rows: 24 shuffles where lane-by-lane
 * loads took 64 scalar loads and inserts (with AVX2's 8 lanes the tile loads were a third of the fused
 * Hadamard–quantize pass). */
static inline void load_8x8(const float *restrict x, int64_t n, __m256 sign, float *restrict t) {
    __m256 r[8], a[8], b[8];
    for (int l = 0; l < 8; l++) r[l] = _mm256_mul_ps(_mm256_loadu_ps(x + l * n), sign);
    for (int l = 0; l < 8; l += 2) {
        a[l] = _mm256_unpacklo_ps(r[l], r[l + 1]);
        a[l + 1] = _mm256_unpackhi_ps(r[l], r[l + 1]);
    }
    for (int l = 0; l < 8; l += 4) {
        b[l] = _mm256_shuffle_ps(a[l], a[l + 2], 0x44);
        b[l + 1] = _mm256_shuffle_ps(a[l], a[l + 2], 0xEE);
        b[l + 2] = _mm256_shuffle_ps(a[l + 1], a[l + 3], 0x44);
        b[l + 3] = _mm256_shuffle_ps(a[l + 1], a[l + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_store_ps(t + i * 8, _mm256_permute2f128_ps(b[i], b[i + 4], 0x20));
        _mm256_store_ps(t + (i + 4) * 8, _mm256_permute2f128_ps(b[i], b[i + 4], 0x31));
    }
}
#endif

/* Rows [0, count) of x (row length n) into the tile, times signs if given; unused lanes hold zeros. */
static void load_tile(const float *restrict x, int64_t count, int64_t n, const float *restrict signs, float *restrict t) {
    int64_t i = 0;
#if LANES == 8 && defined(__AVX2__)
    if (count == LANES)
        for (; i + 8 <= n; i += 8) load_8x8(x + i, n, signs ? _mm256_loadu_ps(signs + i) : _mm256_set1_ps(1.0f), t + i * 8);
#endif
    for (; i < n; i++) {
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

#if LANES == 8 && defined(__AVX2__)
/* 8 tile rows of 8 bytes (one per lane) → 8 bytes of each of the 8 output rows (stride n), by unpacks. */
static inline void store_8x8_int8(const int8_t *restrict t, int8_t *restrict y, int64_t n) {
    __m128i a[8], b[4], c[4];
    for (int i = 0; i < 8; i++) a[i] = _mm_loadl_epi64((const __m128i *)(t + i * 8));
    for (int i = 0; i < 4; i++) b[i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
    c[0] = _mm_unpacklo_epi16(b[0], b[1]), c[1] = _mm_unpackhi_epi16(b[0], b[1]);
    c[2] = _mm_unpacklo_epi16(b[2], b[3]), c[3] = _mm_unpackhi_epi16(b[2], b[3]);
    const __m128i d[4] = {_mm_unpacklo_epi32(c[0], c[2]), _mm_unpackhi_epi32(c[0], c[2]), _mm_unpacklo_epi32(c[1], c[3]),
                          _mm_unpackhi_epi32(c[1], c[3])};
    for (int l = 0; l < 4; l++) {
        _mm_storel_epi64((__m128i *)(y + 2 * l * n), d[l]);
        _mm_storel_epi64((__m128i *)(y + (2 * l + 1) * n), _mm_unpackhi_epi64(d[l], d[l]));
    }
}
#endif

static void store_tile_int8(const int8_t *restrict t, int64_t count, int64_t n, int8_t *restrict y) {
    int64_t i = 0;
#ifdef __SSE2__
    if (count == LANES && LANES == 16)
        for (; i + 16 <= n; i += 16) transpose_16x16_int8(t + i * LANES, y + i, n);
#endif
#if LANES == 8 && defined(__AVX2__)
    if (count == LANES)
        for (; i + 8 <= n; i += 8) store_8x8_int8(t + i * LANES, y + i, n);
#endif
    for (; i < n; i++)
        for (int64_t l = 0; l < count; l++) y[l * n + i] = t[i * LANES + l];
}

/* The butterflies of `stages` consecutive FWHT stages (strides h, 2h, … ) on the 2^stages vectors
 * v[k·h], held in registers: the same additions as stage-by-stage sweeps, with one load and one store per
 * vector instead of one per stage (the sweeps were bound by stores). */
static inline __attribute__((always_inline)) void butterfly_group(lanes_f *restrict v, int64_t h, const int stages) {
    lanes_f x[16];
    const int radix = 1 << stages;
    /* Fully unrolled, so that x lives in registers. */
#pragma GCC unroll 16
    for (int k = 0; k < radix; k++) x[k] = v[k * h];
#pragma GCC unroll 4
    for (int s = 0; s < stages; s++)
#pragma GCC unroll 16
        for (int k = 0; k < radix; k++)
            if (!(k & (1 << s))) {
                const lanes_f a = x[k], b = x[k + (1 << s)];
                x[k] = a + b;
                x[k + (1 << s)] = a - b;
            }
#pragma GCC unroll 16
    for (int k = 0; k < radix; k++) v[k * h] = x[k];
}

static inline __attribute__((always_inline)) void butterfly_groups(lanes_f *restrict v, int64_t p, int64_t h, const int stages) {
    const int64_t span = h << stages;
    for (int64_t base = 0; base < p; base += span)
        for (int64_t j = base; j < base + h; j++) butterfly_group(v + j, h, stages);
}

/* Fast Walsh–Hadamard transform (Sylvester order, unnormalised) of each lane, p a power of two: stages
 * four at a time. */
static void fwht_tile(float *restrict t, int64_t p) {
    lanes_f *v = (lanes_f *)t;
    for (int64_t h = 1; h < p;) {
        int stages = 0;
        int64_t span = h;
        while (stages < 4 && span < p) {
            span *= 2;
            stages++;
        }
        switch (stages) {
        case 4: butterfly_groups(v, p, h, 4); break;
        case 3: butterfly_groups(v, p, h, 3); break;
        case 2: butterfly_groups(v, p, h, 2); break;
        default: butterfly_groups(v, p, h, 1); break;
        }
        h = span;
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

/* H_12, whose entries are ±1 (times 1/√n in hm): each output adds, per triple of inputs (a, b, c), one of
 * a+b+c, a+b−c, a−b+c, a−b−c with a sign. MIX12_PLAN (native.py, from the same hadamard_matrix) gives
 * per output and triple the pattern (bits 0–1: b's, c's sign relative to a's) and a's sign (bit 2). 6 adds
 * per triple and 3 per output: 60 additions and 12 multiplies for 12 outputs where the dense mix takes 144
 * fused multiply-adds. */
#if !defined(MIX12_PLAN)
#error "build through robuq/kernels/native.py: it defines the order-12 Hadamard mix's plan"
#endif
static const unsigned char MIX12[12 * 4] = MIX12_PLAN;

/* c when hm (m × m) is c times the matrix MIX12 describes, else 0 (the dense mix then). */
static float mix12_scale(const float *hm, int64_t m) {
    if (m != 12 || !(hm[0] > 0.0f)) return 0.0f;
    const float c = hm[0];
    for (int i = 0; i < 12; i++)
        for (int g = 0; g < 4; g++) {
            const int code = MIX12[4 * i + g], pattern[3] = {1, code & 2 ? -1 : 1, code & 1 ? -1 : 1};
            for (int t = 0; t < 3; t++)
                if (hm[i * 12 + 3 * g + t] != (code & 4 ? -c : c) * (float)pattern[t]) return 0.0f;
        }
    return c;
}

static void mix12_tile(const lanes_f *restrict src, lanes_f *restrict dst, int64_t p, float c) {
    const lanes_f scale = lanes_splat(c);
    for (int64_t j = 0; j < p; j++) {
        lanes_f sums[4][4];
#pragma GCC unroll 4
        for (int g = 0; g < 4; g++) {
            const lanes_f a = src[3 * g * p + j], b = src[(3 * g + 1) * p + j], e = src[(3 * g + 2) * p + j];
            const lanes_f plus = a + b, minus = a - b;
            sums[g][0] = plus + e, sums[g][1] = plus - e, sums[g][2] = minus + e, sums[g][3] = minus - e;
        }
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) {
            const unsigned char *plan = MIX12 + 4 * i; /* constants once unrolled */
            lanes_f acc = sums[0][plan[0] & 3];
#pragma GCC unroll 3
            for (int g = 1; g < 4; g++) {
                if ((plan[g] ^ plan[0]) & 4)
                    acc -= sums[g][plan[g] & 3];
                else
                    acc += sums[g][plan[g] & 3];
            }
            dst[i * p + j] = acc * (plan[0] & 4 ? -scale : scale);
        }
    }
}

/* out = H_m · t over the (m, p) layout of each lane; hm is row-major m×m, mix12 its mix12_scale. */
static void mix_tile(const float *restrict t, float *restrict out, int64_t m, int64_t p, const float *restrict hm,
                     float mix12) {
    const lanes_f *src = (const lanes_f *)t;
    lanes_f *dst = (lanes_f *)out;
    if (mix12 != 0.0f) {
        mix12_tile(src, dst, p, mix12);
        return;
    }
    int64_t i = 0;
    for (; i + 12 <= m; i += 12) mix_rows_12(src, dst, m, p, hm, i);
    for (; i + 4 <= m; i += 4) mix_rows_4(src, dst, m, p, hm, i);
    for (; i < m; i++) mix_rows_1(src, dst, m, p, hm, i);
}

/* The tile `t` (signs already applied for the forward transform) rotated into `out`. */
static void rotate_tile(float *restrict t, float *restrict out, int64_t n, int64_t m, const float *restrict hm,
                        float mix12, const float *restrict signs_after) {
    const int64_t p = n / m;
    for (int64_t k = 0; k < m; k++) fwht_tile(t + k * p * LANES, p);
    mix_tile(t, out, m, p, hm, mix12);
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
    const float mix12 = mix12_scale(hm, m);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *t = tile_buffer(n), *out = tile_buffer(n);
        const int ok = t && out;
#pragma omp for schedule(dynamic)
        for (int64_t g = 0; g < tiles; g++) {
            if (!ok) continue;
            const int64_t first = g * LANES, count = rows - first < LANES ? rows - first : LANES;
            load_tile(x + first * n, count, n, inverse ? NULL : signs, t);
            rotate_tile(t, out, n, m, hm, mix12, inverse ? signs : NULL);
            store_tile(out, count, n, y + first * n);
        }
        note_failure(ok, &failed);
        free(t);
        free(out);
    }
    return failed ? -1 : 0;
}

/* Scale and offset from a row's statistics, in the order robuq.quant.activation computes them; levels
 * run from 0 to top. */
static void finish_scale_offset(float lo, float hi, float mean, float std, float top, int rule, float step_factor,
                                float ratio, float *scale, float *offset) {
    /* A NaN or infinity among the row's values: its scale is NaN, so the row's outputs are NaN, as PyTorch's
     * path makes them (the clamp to the levels would otherwise hide it; the callers' statistics make lo, hi,
     * mean and std non-finite for such a row). */
    if (!isfinite(lo) || !isfinite(hi) || !isfinite(mean) || !isfinite(std)) {
        *scale = *offset = NAN;
        return;
    }
    if (rule == RULE_GAUSSIAN) {
        float s = step_factor * std * ratio;
        s = s > SCALE_EPS ? s : SCALE_EPS;
        *scale = s;
        *offset = mean - s * (top / 2);
    } else { /* RULE_MINMAX: the entry points accept no other rule */
        const float center = (lo + hi) / 2, half = (hi - lo) / 2 * ratio;
        const float s = 2 * half / top;
        *scale = s > SCALE_EPS ? s : SCALE_EPS;
        *offset = center - half;
    }
}

/* Whether the entry points implement this rule and level range (levels 0 … top must fit a byte). */
static int supported(int rule, int top) {
    return (rule == RULE_MINMAX || rule == RULE_GAUSSIAN) && top >= 1 && top <= 255;
}

/* Per-lane scale and offset of a tile whose n entries per lane are one row each. */
static void tile_scale_offset(const float *restrict t, int64_t n, float top, int rule, float step_factor, float ratio,
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
        lanes_f bad = v[0] - v[0]; /* 0, or NaN once a NaN or infinity came by (min and max would skip a NaN) */
        for (int64_t i = 1; i < n; i++) {
            lo = lanes_min(v[i], lo);
            hi = lanes_max(v[i], hi);
            bad += v[i] - v[i];
        }
        lo += bad;
    }
    for (int l = 0; l < LANES; l++)
        finish_scale_offset(lo[l], hi[l], mean[l], std[l], top, rule, step_factor, ratio, &scale[l], &offset[l]);
}

/* Levels of one tile row: clamp(round_half_even((v − o)/s), 0, top) − shift. Rounding by adding and
 * subtracting 1.5·2^23 is exact and ties to even for |u| < 2^22, which the pre-clamp to [−1, top + 1]
 * guarantees without changing the clamped result. */
static inline lanes_f lanes_level_values(lanes_f v, lanes_f s, lanes_f o, float top, float shift) {
    const lanes_f magic = lanes_splat(12582912.0f);
    lanes_f u = (v - o) / s;
    u = lanes_max(lanes_min(u, lanes_splat(top + 1)), lanes_splat(-1.0f));
    u = (u + magic) - magic;
    return lanes_max(lanes_min(u, lanes_splat(top)), lanes_splat(0.0f)) - shift;
}

/* As bytes: signed levels, or unsigned ones up to 255 (the conversion keeps the low eight bits). */
static inline lanes_b lanes_bytes(lanes_f levels) {
#if LANES == 8 && defined(__AVX2__)
    /* GCC packs 8 lanes with 8 extracts; two packs and a byte shuffle instead (levels fit int16). */
    const __m256i words = _mm256_cvttps_epi32((__m256)levels);
    const __m128i halves = _mm_packs_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    const __m128i low = _mm_shuffle_epi8(halves, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1));
    lanes_b bytes;
    memcpy(&bytes, &low, sizeof bytes);
    return bytes;
#else
    return __builtin_convertvector(__builtin_convertvector(levels, lanes_i), lanes_b);
#endif
}

static inline lanes_b lanes_levels(lanes_f v, lanes_f s, lanes_f o, float top, float shift) {
    return lanes_bytes(lanes_level_values(v, s, o, top, shift));
}

static inline float level_of(float v, float scale, float offset, float top) {
    /* (v − o)/s rounded half to even, as torch.round; a true division, as PyTorch's div_. */
    float u = rintf((v - offset) / scale);
    return u < 0.0f ? 0.0f : (u > top ? top : u);
}

/* branch rows [0, count) = down · (the tile's rows), a low-rank branch's first matmul on values already in
 * cache, with down given transposed, n × rank (down_t[i·rank + k]), so that the LOWRANK_OUTPUTS weights
 * each tile row meets are adjacent. LOWRANK_OUTPUTS outputs at a time stay in registers: 16 with AVX-512's
 * 32 registers, 8 with AVX2's 16 (16 spilled there, and ran at half the FMA rate). Whole groups take a loop
 * without per-output tests (with them, and down row-major, the pass ran at a quarter of the FMA rate on an
 * Intel core). Fused multiply-adds allowed: a matmul. */
#define LOWRANK_OUTPUTS (LANES == 8 ? 8 : 16)
__attribute__((optimize("fp-contract=fast")))
static void tile_lowrank(const float *restrict t, int64_t count, int64_t n, const float *restrict down_t, int64_t rank,
                         float *restrict branch) {
    const lanes_f *v = (const lanes_f *)t;
    for (int64_t k0 = 0; k0 < rank; k0 += LOWRANK_OUTPUTS) {
        const int64_t width = rank - k0 < LOWRANK_OUTPUTS ? rank - k0 : LOWRANK_OUTPUTS;
        lanes_f acc[LOWRANK_OUTPUTS] = {{0}};
        const float *restrict d = down_t + k0;
        if (width == LOWRANK_OUTPUTS) {
            for (int64_t i = 0; i < n; i++) {
                const lanes_f x = v[i];
#pragma GCC unroll 16
                for (int k = 0; k < LOWRANK_OUTPUTS; k++) acc[k] += d[i * rank + k] * x;
            }
        } else {
            for (int64_t i = 0; i < n; i++)
                for (int64_t k = 0; k < width; k++) acc[k] += d[i * rank + k] * v[i];
        }
        for (int64_t k = 0; k < width; k++)
            for (int64_t l = 0; l < count; l++) branch[l * rank + k0 + k] = acc[k][l];
    }
}

/* What one hadamard_quantize call does to every tile of rows: the rotation (if hm), the scale rule and
 * level range, and the low-rank branch (if down_t: down transposed, n × rank, tile_lowrank's layout). */
typedef struct {
    int64_t n, m, rank;
    const float *hm, *signs, *down_t;
    float mix12, top, step_factor, ratio;
    int rule, shift;
} quantize_t;

/* down (rank × n) transposed into a new n × rank buffer (tile_lowrank's layout); NULL when memory ran out. */
static float *transposed_down(const float *down, int64_t rank, int64_t n) {
    float *down_t = malloc((size_t)(n * rank) * sizeof(float));
    if (down_t)
        for (int64_t k = 0; k < rank; k++)
            for (int64_t i = 0; i < n; i++) down_t[i * rank + k] = down[k * n + i];
    return down_t;
}

/* Rows [0, count) of x (count ≤ LANES, row stride n): their levels (row stride n), scales and offsets, and
 * the rotated rows (if y) and branch rows (if qz->down_t). t and out are tile buffers, q n·LANES bytes. */
static void quantize_tile(const quantize_t *qz, const float *x, int64_t count, float *t, float *out, int8_t *q,
                          int8_t *levels, float *y, float *scale, float *offset, float *branch) {
    const int64_t n = qz->n;
    load_tile(x, count, n, qz->hm ? qz->signs : NULL, t);
    float *rotated = t;
    if (qz->hm) {
        rotate_tile(t, out, n, qz->m, qz->hm, qz->mix12, NULL);
        rotated = out;
    }
    float s[LANES], o[LANES];
    tile_scale_offset(rotated, n, qz->top, qz->rule, qz->step_factor, qz->ratio, s, o);
    const lanes_f sv = lanes_load(s), ov = lanes_load(o);
    const lanes_f *rv = (const lanes_f *)rotated;
    lanes_b *qv = (lanes_b *)q;
    for (int64_t i = 0; i < n; i++) qv[i] = lanes_levels(rv[i], sv, ov, qz->top, (float)qz->shift);
    store_tile_int8(q, count, n, levels);
    if (y) store_tile(rotated, count, n, y);
    if (qz->down_t) tile_lowrank(rotated, count, n, qz->down_t, qz->rank, branch);
    for (int64_t l = 0; l < count; l++) {
        scale[l] = s[l];
        offset[l] = o[l];
    }
}

/* Rotate (if hm) and quantize each row to int8 levels 0 … levels_top minus `shift`, with per-row scale
 * and offset; y (optional) gets the rotated rows, branch (if down) down · the rotated rows. Returns 0, −1
 * when memory ran out, BAD_ARGUMENT for a rule or level range it does not implement. */
int robuq_hadamard_quantize(const float *x, float *y, int8_t *levels, float *scale, float *offset, int64_t rows,
                            int64_t n, int64_t m, const float *hm, const float *signs, int levels_top, int rule,
                            float step_factor, float ratio, int shift, const float *down, int64_t rank,
                            float *branch, int threads) {
    if (!supported(rule, levels_top)) return BAD_ARGUMENT;
    const int64_t tiles = (rows + LANES - 1) / LANES;
    float *down_t = NULL;
    if (down && !(down_t = transposed_down(down, rank, n))) return -1;
    const quantize_t qz = {n, m, rank, hm, signs, down_t, hm ? mix12_scale(hm, m) : 0.0f, (float)levels_top,
                           step_factor, ratio, rule, shift};
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *t = tile_buffer(n), *out = tile_buffer(n);
        int8_t *q = aligned_buffer((size_t)(n * LANES));
        const int ok = t && out && q;
#pragma omp for schedule(dynamic)
        for (int64_t g = 0; g < tiles; g++) {
            if (!ok) continue;
            const int64_t first = g * LANES, count = rows - first < LANES ? rows - first : LANES;
            quantize_tile(&qz, x + first * n, count, t, out, q, levels + first * n, y ? y + first * n : NULL,
                          scale + first, offset + first, down_t ? branch + first * rank : NULL);
        }
        note_failure(ok, &failed);
        free(t);
        free(out);
        free(q);
    }
    free(down_t);
    return failed ? -1 : 0;
}

/* a·b + c, fused where the build has FMA (one rounding, one instruction): for code that need not round as
 * PyTorch's elementwise ops do, whatever the file's -ffp-contract=off (which keeps the quantizers' rounding). */
static inline lanes_f lanes_fma(lanes_f a, lanes_f b, lanes_f c) {
#if defined(__AVX512F__) && LANES == 16
    return (lanes_f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && LANES == 8
    return (lanes_f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* ---- e^x for float lanes with ~1 ulp error (Cody–Waite reduction, degree-6 Taylor on |r| ≤ ln2/2), for
 * the attention softmax and the GELU. ---- */
static inline lanes_f lanes_exp(lanes_f x) {
    x = lanes_max(lanes_min(x, lanes_splat(88.0f)), lanes_splat(-87.0f));
    const lanes_f magic = lanes_splat(12582912.0f);
    const lanes_f k = (x * lanes_splat(1.44269504088896341f) + magic) - magic;
    const lanes_f r = lanes_fma(k, lanes_splat(-1.428606765330187e-06f), lanes_fma(k, lanes_splat(-0.693145751953125f), x));
    lanes_f p = lanes_splat(1.0f / 720.0f);
    p = lanes_fma(p, r, lanes_splat(1.0f / 120.0f));
    p = lanes_fma(p, r, lanes_splat(1.0f / 24.0f));
    p = lanes_fma(p, r, lanes_splat(1.0f / 6.0f));
    p = lanes_fma(p, r, lanes_splat(0.5f));
    p = lanes_fma(p, r, lanes_splat(1.0f));
    p = lanes_fma(p, r, lanes_splat(1.0f));
    const lanes_i two_k = (__builtin_convertvector(k, lanes_i) + 127) << 23;
    return p * (lanes_f)two_k;
}


/* ---- Integer attention, fused: one pass per (head, block of queries), scores and probabilities never
 * leave a thread's buffers. A quantized value is s·u + o with unsigned levels u. K and V are stored as
 * int8 l = u − shift (their c = o + shift·s), Q and the probabilities as their unsigned bytes, so both
 * matmuls are u8 × s8 dot products with exact int32 sums (AVX-512 VNNI's vpdpbusd where the build has
 * it, else AVX2's vpmaddwd on levels kept as int16 from the start, else plain C), and the affine terms
 * come back through level sums. ---- */

#define QUERY_BLOCK 16

/* The operands of the dot products: bytes, packed DOT_GROUP = 4 consecutive k per column (VNNI's vpdpbusd
 * takes four, plain C does not care); on AVX2 without VNNI int16 levels, written so where they are
 * quantized (no widening pass, no per-call buffer) and packed 2 k per column, vpmaddwd's pairs. */
#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512F__)) && !defined(ROBUQ_PORTABLE)
#define DOT_WIDE 1
#define DOT_GROUP 2
typedef int16_t dot_row_t;
typedef int16_t dot_weight_t;
#else
#define DOT_GROUP 4
typedef uint8_t dot_row_t;
typedef int8_t dot_weight_t;
#endif

/* Levels (integers that fit int16) as dot_row_t. */
static inline void store_levels(dot_row_t *p, lanes_f levels) {
#if defined(DOT_WIDE) && LANES == 8
    const __m256i words = _mm256_cvttps_epi32((__m256)levels);
    _mm_storeu_si128((__m128i *)p, _mm_packs_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
#elif defined(DOT_WIDE)
    typedef int16_t lanes_w __attribute__((vector_size(LANES * sizeof(int16_t))));
    const lanes_w words = __builtin_convertvector(__builtin_convertvector(levels, lanes_i), lanes_w);
    memcpy(p, &words, sizeof words);
#else
    const lanes_b bytes = lanes_bytes(levels);
    memcpy(p, &bytes, LANES);
#endif
}

/* q, k and v are usually strided views of one qkv tensor, a row every 3·heads·d floats: the hardware
 * prefetchers do not follow that across pages, and the first load of every row waited for memory (most
 * of row_minmax_scale_offset's time, a sixth of the kernel's). Rows are asked for 8 keys or a query block
 * ahead. */
static inline void prefetch_row(const float *v, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(v + i);
    __builtin_prefetch(v + n - 1);
}

/* Min–max scale and offset of one contiguous row (statistics as LANES interleaved partial results). */
static void row_minmax_scale_offset(const float *restrict v, int64_t n, float top, float *scale, float *offset) {
    float lo = v[0], hi = v[0], bad = v[0] - v[0]; /* bad: NaN once a NaN or infinity came by */
    lanes_f los = lanes_splat(v[0]), his = los, bads = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const lanes_f x = lanes_load(v + i);
        los = lanes_min(x, los);
        his = lanes_max(x, his);
        bads += x - x;
    }
    for (; i < n; i++) {
        lo = v[i] < lo ? v[i] : lo;
        hi = v[i] > hi ? v[i] : hi;
        bad += v[i] - v[i];
    }
    for (int l = 0; l < LANES; l++) {
        lo = los[l] < lo ? los[l] : lo;
        hi = his[l] > hi ? his[l] : hi;
        bad += bads[l];
    }
    finish_scale_offset(lo + bad, hi, 0.0f, 0.0f, top, RULE_MINMAX, 0.0f, 1.0f, scale, offset);
}

/* u[i] = clamp(round((v[i] − o)/s), 0, top) − shift as dot_row_t, for a span of n values with one scale
 * and offset for the span (per_value 0) or one per value (per_value 1); returns Σ (u − shift). */
static int32_t span_levels(const float *restrict v, int64_t n, const float *restrict s, const float *restrict o,
                           int per_value, float top, int shift, dot_row_t *restrict u) {
    lanes_f sum = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const lanes_f sv = per_value ? lanes_load(s + i) : lanes_splat(*s);
        const lanes_f ov = per_value ? lanes_load(o + i) : lanes_splat(*o);
        const lanes_f levels = lanes_level_values(lanes_load(v + i), sv, ov, top, (float)shift);
        sum += levels; /* exact: integers far below 2^24 */
        store_levels(u + i, levels);
    }
    int32_t total = 0;
    for (int l = 0; l < LANES; l++) total += (int32_t)sum[l];
    for (; i < n; i++) {
        const int32_t level = (int32_t)level_of(v[i], s[i * per_value], o[i * per_value], top) - shift;
        u[i] = (dot_row_t)(shift ? (int8_t)(uint8_t)level : (uint8_t)level); /* the byte builds' value, NaN's too */
        total += level;
    }
    return total;
}

#if defined(__AVX2__) && !defined(ROBUQ_PORTABLE)
/* acc + MULTIPLY(x, w), the sum written into acc's own register. From intrinsics GCC 12 added into the
 * product's register and copied it back, one vmovdqa per multiply: a third more vector ALU work (the AVX2
 * GEMM 1.26–1.28× slower on an Intel core, with three vector ALU ports; measured here). */
#define ACCUMULATE_INTO(NAME, MULTIPLY, ADD)                                                                   \
    static inline __attribute__((always_inline)) __m256i NAME(__m256i acc, __m256i x, __m256i w) {            \
        __m256i product;                                                                                       \
        __asm__(MULTIPLY " %[w], %[x], %[product]\n\t" ADD " %[product], %[acc], %[acc]"                      \
                : [acc] "+x"(acc), [product] "=&x"(product)                                                    \
                : [x] "x"(x), [w] "x"(w));                                                                     \
        return acc;                                                                                            \
    }
ACCUMULATE_INTO(maddubs_into, "vpmaddubsw", "vpaddw") /* u8 × s8 pair sums, added in int16 */
ACCUMULATE_INTO(madd_into, "vpmaddwd", "vpaddd")      /* s16 × s16 pair sums, added in int32 */
#endif

/* out[r][j] = Σ_k a[r][k]·b[k][j] for `rows` rows of levels a (stride astride, DOT_GROUP·depth of them) and
 * width columns of b (a multiple of 16), packed [depth][width][DOT_GROUP] as signed levels. Every version
 * gives the same exact integer sums. */
#if defined(__AVX512VNNI__) && defined(__AVX512F__) && !defined(ROBUQ_PORTABLE)
#define DEFINE_DOT(RB, CB)                                                                                     \
    static void dot_##RB##x##CB(const uint8_t *restrict a, int64_t astride, const int8_t *restrict b, int64_t k4, \
                                int64_t width, int32_t *restrict out, int64_t ostride) {                        \
        __m512i acc[RB][CB];                                                                                   \
        for (int r = 0; r < RB; r++)                                                                           \
            for (int c = 0; c < CB; c++) acc[r][c] = _mm512_setzero_si512();                                   \
        for (int64_t k = 0; k < k4; k++) {                                                                     \
            __m512i w[CB];                                                                                     \
            for (int c = 0; c < CB; c++) w[c] = _mm512_loadu_si512(b + (k * width + 16 * c) * 4);             \
            for (int r = 0; r < RB; r++) {                                                                     \
                int32_t four;                                                                                  \
                memcpy(&four, a + r * astride + 4 * k, sizeof four);                                           \
                const __m512i x = _mm512_set1_epi32(four);                                                     \
                for (int c = 0; c < CB; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], x, w[c]);              \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < RB; r++)                                                                           \
            for (int c = 0; c < CB; c++) _mm512_storeu_si512(out + r * ostride + 16 * c, acc[r][c]);           \
    }
#elif defined(DOT_WIDE)
/* AVX2 has no u8 × s8 dot product into int32 that cannot saturate (vpmaddubsw's 16-bit pair sums overflow
 * at 8-bit levels), so both sides are int16 and vpmaddwd multiplies them: exact, a quarter of vpdpbusd's
 * work per instruction. A row's pair of k, broadcast, against b's 8 columns × 2 k gives those 8 columns'
 * sums in lane order: no horizontal finish, and twice the loop trips of 4 k per lane (d = 64 left only 16,
 * each strip then ending in hadds and permutes). 4 rows × 16 columns: 8 accumulators, 2 weight vectors,
 * a broadcast and a product (4 × 3 would need 17 of AVX2's 16 registers). One asm statement per k: with
 * madd_into per product GCC 12 copied accumulators through a spare register, 7 vmovdqa per 8 multiplies
 * (measured no slower on the Intel core here, whose renamer drops such copies; not all cores do). */
typedef int32_t __attribute__((may_alias)) pair_t; /* two int16 levels, read as one broadcast */
#define MADD_ROW(R) "vpbroadcastd %[a" #R "], %[x]\n\t"                                                      \
                    "vpmaddwd %[w0], %[x], %[t]\n\t"                                                          \
                    "vpaddd %[t], %[c" #R "0], %[c" #R "0]\n\t"                                              \
                    "vpmaddwd %[w1], %[x], %[t]\n\t"                                                          \
                    "vpaddd %[t], %[c" #R "1], %[c" #R "1]\n\t"
static inline __attribute__((always_inline)) void dot_4x2(const int16_t *restrict a, int64_t astride,
                                                          const int16_t *restrict b, int64_t depth, int64_t width,
                                                          int32_t *restrict out, int64_t ostride) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    for (int64_t k = 0; k < depth; k++) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(b + k * width * 2));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(b + k * width * 2 + 16));
        const int16_t *p = a + 2 * k;
        __m256i x, t;
        __asm__(MADD_ROW(0) MADD_ROW(1) MADD_ROW(2) MADD_ROW(3)
                : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20), [c21] "+x"(c21),
                  [c30] "+x"(c30), [c31] "+x"(c31), [x] "=&x"(x), [t] "=&x"(t)
                : [w0] "x"(w0), [w1] "x"(w1), [a0] "m"(*(const pair_t *)p), [a1] "m"(*(const pair_t *)(p + astride)),
                  [a2] "m"(*(const pair_t *)(p + 2 * astride)), [a3] "m"(*(const pair_t *)(p + 3 * astride)));
    }
    const __m256i sums[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 2; c++) _mm256_storeu_si256((__m256i *)(out + r * ostride + 8 * c), sums[r][c]);
}
static inline __attribute__((always_inline)) void dot_1x2(const int16_t *restrict a, int64_t astride,
                                                          const int16_t *restrict b, int64_t depth, int64_t width,
                                                          int32_t *restrict out, int64_t ostride) {
    (void)astride;
    (void)ostride;
    __m256i c00 = _mm256_setzero_si256(), c01 = c00;
    for (int64_t k = 0; k < depth; k++) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(b + k * width * 2));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(b + k * width * 2 + 16));
        __m256i x, t;
        __asm__(MADD_ROW(0) : [c00] "+x"(c00), [c01] "+x"(c01), [x] "=&x"(x), [t] "=&x"(t)
                : [w0] "x"(w0), [w1] "x"(w1), [a0] "m"(*(const pair_t *)(a + 2 * k)));
    }
    _mm256_storeu_si256((__m256i *)out, c00);
    _mm256_storeu_si256((__m256i *)(out + 8), c01);
}
#else
#define DEFINE_DOT(RB, CB)                                                                                     \
    static void dot_##RB##x##CB(const uint8_t *restrict a, int64_t astride, const int8_t *restrict b, int64_t k4, \
                                int64_t width, int32_t *restrict out, int64_t ostride) {                        \
        for (int r = 0; r < RB; r++)                                                                           \
            for (int64_t j = 0; j < 16 * CB; j++) {                                                            \
                int32_t sum = 0;                                                                               \
                for (int64_t k = 0; k < 4 * k4; k++)                                                           \
                    sum += (int32_t)a[r * astride + k] * (int32_t)b[((k / 4) * width + j) * 4 + k % 4];        \
                out[r * ostride + j] = sum;                                                                    \
            }                                                                                                  \
    }
#endif

#ifdef DOT_WIDE
static void dot_tiles(const dot_row_t *a, int64_t astride, int64_t rows, const dot_weight_t *b, int64_t depth,
                      int64_t width, int32_t *out, int64_t ostride) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
        for (int64_t j = 0; j < width; j += 16)
            dot_4x2(a + r * astride, astride, b + 2 * j, depth, width, out + r * ostride + j, ostride);
    for (; r < rows; r++)
        for (int64_t j = 0; j < width; j += 16)
            dot_1x2(a + r * astride, astride, b + 2 * j, depth, width, out + r * ostride + j, ostride);
}
#else
DEFINE_DOT(4, 4)
DEFINE_DOT(4, 1)
DEFINE_DOT(1, 4)
DEFINE_DOT(1, 1)

static void dot_tiles(const dot_row_t *a, int64_t astride, int64_t rows, const dot_weight_t *b, int64_t k4, int64_t width,
                      int32_t *out, int64_t ostride) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        int64_t j = 0;
        for (; j + 64 <= width; j += 64) dot_4x4(a + r * astride, astride, b + 4 * j, k4, width, out + r * ostride + j, ostride);
        for (; j < width; j += 16) dot_4x1(a + r * astride, astride, b + 4 * j, k4, width, out + r * ostride + j, ostride);
    }
    for (; r < rows; r++) {
        int64_t j = 0;
        for (; j + 64 <= width; j += 64) dot_1x4(a + r * astride, astride, b + 4 * j, k4, width, out + r * ostride + j, ostride);
        for (; j < width; j += 16) dot_1x1(a + r * astride, astride, b + 4 * j, k4, width, out + r * ostride + j, ostride);
    }
}
#endif

/* Per key, what a score needs besides the level products: s_k, c_k = o + shift·s_k, shift·A_k and
 * s_k·A_k + d·c_k (A_k = Σ levels); nk16 entries per head, zero past the keys. */
typedef struct {
    float *scale, *c, *term;
    int32_t *shifted_sum;
} key_terms_t;

/* One query row's scores from its int32 level products with the keys (acc): score_j = q̂·k̂_j/√d into e
 * (an aligned nk16-float row, −∞ past nk); returns their maximum. */
static float row_scores(const int32_t *restrict acc, int64_t nk, int64_t nk16, key_terms_t keys, float s, float sa,
                        float c, float inv_sqrt_d, float *restrict e) {
    const int64_t vectors = nk16 / LANES;
    lanes_i lane = {0}; /* lane indices, for the masks of keys past nk (no lane indexing of v:
                           that would keep the vectors in memory) */
    for (int l = 0; l < LANES; l++) lane[l] = l;
    const int64_t first_padded = nk / LANES; /* vectors from here on hold padding (nk16 − nk may exceed LANES) */
    lanes_f *v = (lanes_f *)e, largest = lanes_splat(-INFINITY);
    const lanes_f s_scaled = lanes_splat(s * inv_sqrt_d), sa_scaled = lanes_splat(sa * inv_sqrt_d);
    const lanes_f c_scaled = lanes_splat(c * inv_sqrt_d);
    for (int64_t i = 0; i < vectors; i++) {
        const lanes_f ks = lanes_load(keys.scale + i * LANES), kc = lanes_load(keys.c + i * LANES);
        const lanes_f kt = lanes_load(keys.term + i * LANES);
        lanes_i a, shifted;
        memcpy(&a, acc + i * LANES, sizeof a);
        memcpy(&shifted, keys.shifted_sum + i * LANES, sizeof shifted);
        /* q̂·k̂ = s_q s_k Σl_q l_k + s_q A_q c_k + c_q (s_k A_k + d c_k) with l_q = u_q − shift: the signed
         * form keeps the float terms as small as the level products allow. 1/√d goes into the row's
         * constants, and the sum into fused multiply-adds: 6 vector operations where there were 9. */
        v[i] = lanes_fma(ks * s_scaled, __builtin_convertvector(a - shifted, lanes_f), lanes_fma(kc, sa_scaled, kt * c_scaled));
        if (i >= first_padded) { /* padding keys have no scores */
            const lanes_i real = lane + (int32_t)(i * LANES) < (lanes_i){0} + (int32_t)nk;
            v[i] = (lanes_f)(((lanes_i)v[i] & real) | ((lanes_i)lanes_splat(-INFINITY) & ~real));
        }
        largest = lanes_max(v[i], largest);
    }
    float top_score = largest[0];
    for (int l = 1; l < LANES; l++) top_score = largest[l] > top_score ? largest[l] : top_score;
    return top_score;
}

/* Probability levels as the byte builds keep them, zero-extended: lanes_bytes' low byte, the level for
 * 0 … top and 0 where a row without finite scores made cvttps2dq answer 0x80000000. */
static inline void store_probability_levels(dot_row_t *p, lanes_f u) {
#ifdef DOT_WIDE
    const lanes_b bytes = lanes_bytes(u);
    for (int l = 0; l < LANES; l++) p[l] = (uint8_t)bytes[l];
#else
    store_levels(p, u);
#endif
}

/* e_j = exp(score_j − max) for key j (zero past nk: e^−87 from the clamp, not e^−∞), its sum and level. */
static inline lanes_f key_weights(const lanes_f *v, int64_t i, float top_score, int64_t nk, lanes_f *sum,
                                  lanes_i *nan) {
    *nan |= (lanes_i)(v[i] != v[i]); /* lanes_exp clamps its input: a NaN score would come out a finite weight */
    lanes_f x = lanes_exp(v[i] - top_score);
    if (i >= nk / LANES) {
        lanes_i lane = {0};
        for (int l = 0; l < LANES; l++) lane[l] = l;
        x = (lanes_f)((lanes_i)x & (lane + (int32_t)(i * LANES) < (lanes_i){0} + (int32_t)nk));
    }
    *sum += x;
    return x;
}

/* A row's probability levels from its scores e (row_scores) and their maximum: e_j = exp(score_j − max) and
 * levels round(e_j·top). Those are the levels p_j/s_p of the softmax p_j = e_j/Σe on the grid
 * s_p = max_j p_j/top = 1/(top·Σe): the largest e is exactly 1 (lanes_exp(0) = 1), so the division by Σe
 * cancels. Writes nk16 levels (zero past nk), returns Σ levels and sets *scale = s_p. Two vectors a step:
 * one pack and one permute store 16 int16 levels. The scores of a whole query block come first, so these
 * long exp chains of one row overlap the next row's instead of waiting for its maximum. */
static int32_t probability_levels(const float *restrict e, float top_score, int64_t nk, int64_t nk16, float top,
                                  dot_row_t *restrict levels, float *scale) {
    const int64_t vectors = nk16 / LANES;
    const lanes_f *v = (const lanes_f *)e;
    const lanes_f magic = lanes_splat(12582912.0f);
    lanes_f sum = {0}, level_sum = {0};
    lanes_i nan = {0};
    int64_t i = 0;
#if defined(DOT_WIDE) && LANES == 8
    for (; i + 2 <= vectors; i += 2) {
        const lanes_f x0 = key_weights(v, i, top_score, nk, &sum, &nan), x1 = key_weights(v, i + 1, top_score, nk, &sum, &nan);
        const lanes_f u0 = (x0 * top + magic) - magic, u1 = (x1 * top + magic) - magic; /* round half to even; e ≤ 1 keeps it in [0, top] */
        level_sum += u0;
        level_sum += u1;
        const __m256i words = _mm256_packs_epi32(_mm256_cvttps_epi32((__m256)u0), _mm256_cvttps_epi32((__m256)u1));
        const __m256i bytes = _mm256_and_si256(_mm256_permute4x64_epi64(words, 0xD8), _mm256_set1_epi16(0xFF)); /* as store_probability_levels */
        _mm256_storeu_si256((__m256i *)(levels + i * LANES), bytes);
    }
#endif
    for (; i < vectors; i++) {
        const lanes_f x = key_weights(v, i, top_score, nk, &sum, &nan);
        const lanes_f u = (x * top + magic) - magic; /* round half to even; e ≤ 1 keeps it in [0, top] */
        level_sum += u;
        store_probability_levels(levels + i * LANES, u);
    }
    float total = 0.0f, count = 0.0f;
    int any_nan = 0;
    for (int l = 0; l < LANES; l++) {
        total += sum[l];
        count += level_sum[l];
        any_nan |= nan[l];
    }
    const float s_p = 1.0f / total / top;
    /* A row whose scores hold a NaN (from a non-finite query or key: their scales are NaN) gets a NaN scale, so
     * its outputs are NaN, as PyTorch's softmax makes them. */
    *scale = any_nan ? NAN : (s_p > PROBABILITY_SCALE_EPS ? s_p : PROBABILITY_SCALE_EPS);
    return (int32_t)count;
}

/* Strides (in floats) of a (batch, heads, tokens, d) tensor whose channels are contiguous. */
typedef struct {
    int64_t batch, head, token;
} strides_t;

static const float *head_rows(const float *x, strides_t st, int64_t m, int64_t heads) {
    return x + (m / heads) * st.batch + (m % heads) * st.head;
}

/* Per-channel minimum and maximum of nk rows of d floats (the scalar comparisons' order and ties); bad[c]
 * becomes NaN where a NaN or infinity came by in channel c (min and max would skip a NaN), else 0. */
static void channel_minmax(const float *restrict x, strides_t st, int64_t nk, int64_t d, float *restrict lo,
                           float *restrict hi, float *restrict bad) {
    for (int64_t c = 0; c < d; c++) {
        lo[c] = hi[c] = x[c];
        bad[c] = x[c] - x[c];
    }
    for (int64_t j = 1; j < nk; j++) {
        const float *v = x + j * st.token;
        if (j + 8 < nk) prefetch_row(v + 8 * st.token, d);
        int64_t c = 0;
        for (; c + LANES <= d; c += LANES) {
            const lanes_f value = lanes_load(v + c), l = lanes_min(value, lanes_load(lo + c));
            const lanes_f h = lanes_max(value, lanes_load(hi + c)), b = lanes_load(bad + c) + (value - value);
            memcpy(lo + c, &l, sizeof l);
            memcpy(hi + c, &h, sizeof h);
            memcpy(bad + c, &b, sizeof b);
        }
        for (; c < d; c++) {
            lo[c] = v[c] < lo[c] ? v[c] : lo[c];
            hi[c] = v[c] > hi[c] ? v[c] : hi[c];
            bad[c] += v[c] - v[c];
        }
    }
}

/* V's per-channel min–max scale vs, offset and vc = offset + shift·vs (lo, hi: d-long scratch). */
static void value_scales(const float *restrict x, strides_t st, int64_t nk, int64_t d, float top, int shift,
                         float *restrict lo, float *restrict hi, float *restrict offset, float *restrict vs,
                         float *restrict vc) {
    channel_minmax(x, st, nk, d, lo, hi, offset); /* offset holds the channels' NaN marks until it is computed */
    for (int64_t c = 0; c < d; c++) {
        finish_scale_offset(lo[c] + offset[c], hi[c], 0.0f, 0.0f, top, RULE_MINMAX, 0.0f, 1.0f, &vs[c], &offset[c]);
        vc[c] = offset[c] + (float)shift * vs[c];
    }
}

/* One key row's levels − shift into row, and its key terms. */
static void key_row(const float *v, int64_t j, int64_t d, float top, int shift, dot_row_t *row, key_terms_t terms) {
    float s, o;
    row_minmax_scale_offset(v, d, top, &s, &o);
    const int32_t sum = span_levels(v, d, &s, &o, 0, top, shift, row);
    terms.scale[j] = s;
    terms.c[j] = o + (float)shift * s;
    terms.shifted_sum[j] = shift * sum;
    terms.term[j] = s * (float)sum + (float)d * terms.c[j];
}

#ifdef DOT_WIDE
/* 8 rows of 8 int32 (stride sstride int32) → 8 rows of 8 (stride dstride): a k pair of 8 keys is one int32
 * each, so this moves 8 keys' rows into 8 pairs' columns with 24 shuffles instead of 64 scalar stores. */
static inline void transpose_8x8_epi32(const int16_t *src, int64_t sstride, int16_t *dst, int64_t dstride) {
    __m256i r[8], a[8], b[8];
    for (int l = 0; l < 8; l++) r[l] = _mm256_loadu_si256((const __m256i *)(src + 2 * l * sstride));
    for (int l = 0; l < 8; l += 2) {
        a[l] = _mm256_unpacklo_epi32(r[l], r[l + 1]);
        a[l + 1] = _mm256_unpackhi_epi32(r[l], r[l + 1]);
    }
    for (int l = 0; l < 8; l += 4) {
        b[l] = _mm256_unpacklo_epi64(a[l], a[l + 2]);
        b[l + 1] = _mm256_unpackhi_epi64(a[l], a[l + 2]);
        b[l + 2] = _mm256_unpacklo_epi64(a[l + 1], a[l + 3]);
        b[l + 3] = _mm256_unpackhi_epi64(a[l + 1], a[l + 3]);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_si256((__m256i *)(dst + 2 * i * dstride), _mm256_permute2x128_si256(b[i], b[i + 4], 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 2 * (i + 4) * dstride), _mm256_permute2x128_si256(b[i], b[i + 4], 0x31));
    }
}

/* K of one head: per-token min–max levels − shift, packed [dp][nk16][2] (dp = ⌈d/2⌉ pairs), and its key
 * terms. Eight keys at a time into rows (8 × 2·dp, zero at d when d is odd), then transposed. */
static void pack_keys(const float *k, strides_t st, int64_t nk, int64_t d, int64_t nk16, float top, int shift,
                      int16_t *restrict rows, int16_t *restrict packed, key_terms_t terms) {
    const int64_t pairs = (d + 1) / 2;
    for (int64_t j0 = 0; j0 < nk; j0 += 8) {
        const int64_t count = nk - j0 < 8 ? nk - j0 : 8;
        for (int64_t t = 0; t < count; t++) {
            const float *v = k + (j0 + t) * st.token;
            if (j0 + t + 8 < nk) prefetch_row(v + 8 * st.token, d);
            key_row(v, j0 + t, d, top, shift, rows + 2 * t * pairs, terms);
        }
        int64_t p = 0;
        if (count == 8)
            for (; p + 8 <= pairs; p += 8) transpose_8x8_epi32(rows + 2 * p, pairs, packed + 2 * (p * nk16 + j0), nk16);
        for (; p < pairs; p++)
            for (int64_t t = 0; t < count; t++)
                memcpy(packed + 2 * (p * nk16 + j0 + t), rows + 2 * (t * pairs + p), 2 * sizeof(int16_t));
    }
}

/* V of one head: per-channel min–max levels over the tokens (probs·V sums over tokens) − shift, packed
 * [⌈nk/2⌉][d16][2]; vs, vc = o + shift·s per channel. lo, hi and offset are d-long scratch, rows 2 × d16
 * (zero past d): two tokens' levels, interleaved. */
static void pack_values(const float *restrict x, strides_t st, int64_t nk, int64_t d, int64_t d16, float top, int shift,
                        float *restrict lo, float *restrict hi, float *restrict offset, int16_t *restrict rows,
                        int16_t *restrict packed, float *restrict vs, float *restrict vc) {
    value_scales(x, st, nk, d, top, shift, lo, hi, offset, vs, vc);
    for (int64_t j = 0; j < nk; j += 2) {
        span_levels(x + j * st.token, d, vs, offset, 1, top, shift, rows);
        if (j + 1 < nk)
            span_levels(x + (j + 1) * st.token, d, vs, offset, 1, top, shift, rows + d16);
        else
            memset(rows + d16, 0, (size_t)d * sizeof(int16_t));
        int16_t *dst = packed + j * d16;
        for (int64_t c = 0; c < d16; c += 8) {
            const __m128i a = _mm_loadu_si128((const __m128i *)(rows + c));
            const __m128i b = _mm_loadu_si128((const __m128i *)(rows + d16 + c));
            _mm_storeu_si128((__m128i *)(dst + 2 * c), _mm_unpacklo_epi16(a, b));
            _mm_storeu_si128((__m128i *)(dst + 2 * c + 8), _mm_unpackhi_epi16(a, b));
        }
    }
}
#else
/* K of one head: per-token min–max levels − shift, packed [d4][nk16][4], and its key terms. row: d bytes. */
static void pack_keys(const float *k, strides_t st, int64_t nk, int64_t d, int64_t nk16, float top, int shift,
                      uint8_t *restrict row, int8_t *restrict packed, key_terms_t terms) {
    for (int64_t j = 0; j < nk; j++) {
        const float *v = k + j * st.token;
        if (j + 8 < nk) prefetch_row(v + 8 * st.token, d);
        key_row(v, j, d, top, shift, row, terms);
        for (int64_t c = 0; c < d; c++) packed[((c / 4) * nk16 + j) * 4 + c % 4] = (int8_t)row[c];
    }
}

/* V of one head: per-channel min–max levels over the tokens (probs·V sums over tokens) − shift, packed
 * [nk4][d16][4]; vs, vc = o + shift·s per channel. lo, hi, offset and row are d-long scratch. */
static void pack_values(const float *restrict x, strides_t st, int64_t nk, int64_t d, int64_t d16, float top, int shift,
                        float *restrict lo, float *restrict hi, float *restrict offset, uint8_t *restrict row,
                        int8_t *restrict packed, float *restrict vs, float *restrict vc) {
    value_scales(x, st, nk, d, top, shift, lo, hi, offset, vs, vc);
    for (int64_t j = 0; j < nk; j++) {
        span_levels(x + j * st.token, d, vs, offset, 1, top, shift, row);
        for (int64_t c = 0; c < d; c++) packed[((j / 4) * d16 + c) * 4 + j % 4] = (int8_t)row[c];
    }
}
#endif

/* The shapes and inputs of one call. */
typedef struct {
    const float *q, *k, *v;
    strides_t qs, ks, vs;
    int64_t heads, nq, nk, d, d16, nk16, key_levels, value_levels, qstride;
    float top, ptop, inv_sqrt_d;
    int shift;
    float *out;
} attention_t;

/* A head's packed K and V with their terms, and a thread's scratch. */
typedef struct {
    dot_weight_t *keys, *values;
    key_terms_t terms;
    float *vscale, *vc;
} head_t;

typedef struct {
    float *lo, *hi, *offset, *e;
    dot_row_t *krows, *vrows, *qlevels, *plevels;
    int32_t *scores, *out;
} scratch_t;

static void pack_head(const attention_t *at, int64_t m, head_t h, const scratch_t *t) {
#ifdef DOT_WIDE
    dot_row_t *krows = t->krows, *vrows = t->vrows;
#else
    dot_row_t *krows = t->krows, *vrows = t->krows;
#endif
    pack_keys(head_rows(at->k, at->ks, m, at->heads), at->ks, at->nk, at->d, at->nk16, at->top, at->shift, krows, h.keys,
              h.terms);
    pack_values(head_rows(at->v, at->vs, m, at->heads), at->vs, at->nk, at->d, at->d16, at->top, at->shift, t->lo, t->hi,
                t->offset, vrows, h.values, h.vscale, h.vc);
}

/* Output rows [i0, i0 + rows) of head m, from its packed K and V. */
static void attend_block(const attention_t *at, int64_t m, int64_t i0, head_t h, const scratch_t *t) {
    const int64_t rows = at->nq - i0 < QUERY_BLOCK ? at->nq - i0 : QUERY_BLOCK, d = at->d, nk16 = at->nk16;
    const float *qm = head_rows(at->q, at->qs, m, at->heads);
    const float top = at->top;
    const int shift = at->shift;
    float sq[QUERY_BLOCK], oq[QUERY_BLOCK];
    int32_t uq[QUERY_BLOCK];
    for (int64_t r = 0; r < rows; r++) {
        const float *x = qm + (i0 + r) * at->qs.token;
        if (i0 + r + QUERY_BLOCK < at->nq) prefetch_row(x + QUERY_BLOCK * at->qs.token, d); /* the next block's */
        row_minmax_scale_offset(x, d, top, &sq[r], &oq[r]);
        uq[r] = span_levels(x, d, &sq[r], &oq[r], 0, top, 0, t->qlevels + r * at->qstride);
    }
    dot_tiles(t->qlevels, at->qstride, rows, h.keys, at->qstride / DOT_GROUP, nk16, t->scores, nk16);
    float sp[QUERY_BLOCK];
    int32_t up[QUERY_BLOCK];
    float top_score[QUERY_BLOCK];
    for (int64_t r = 0; r < rows; r++) {
        const float sa = sq[r] * (float)(uq[r] - (int32_t)(shift * d)), c = oq[r] + (float)shift * sq[r];
        top_score[r] = row_scores(t->scores + r * nk16, at->nk, nk16, h.terms, sq[r], sa, c, at->inv_sqrt_d, t->e + r * nk16);
    }
    for (int64_t r = 0; r < rows; r++)
        up[r] = probability_levels(t->e + r * nk16, top_score[r], at->nk, nk16, at->ptop, t->plevels + r * nk16, &sp[r]);
    dot_tiles(t->plevels, nk16, rows, h.values, (at->nk + DOT_GROUP - 1) / DOT_GROUP, at->d16, t->out, at->d16);
    const int64_t b = m / at->heads, hd = m % at->heads;
    const float *restrict svm = h.vscale, *restrict cvm = h.vc;
    for (int64_t r = 0; r < rows; r++) {
        /* p̂·v̂ = s_p (s_v Σu_p l_v + c_v Σu_p): the probabilities' offset is 0. */
        const int32_t *restrict a = t->out + r * at->d16;
        float *restrict o = at->out + ((b * at->nq + i0 + r) * at->heads + hd) * d;
        const float s = sp[r], count = (float)up[r];
        for (int64_t c = 0; c < d; c++) o[c] = s * (svm[c] * (float)a[c] + cvm[c] * count);
    }
}

/* Buffers for `count` heads (calloc: padding stays zero, packing never writes it); 0 when memory ran out. */
static int alloc_heads(const attention_t *at, int64_t count, head_t *h) {
    *h = (head_t){calloc((size_t)(count * at->key_levels), sizeof(dot_weight_t)),
                  calloc((size_t)(count * at->value_levels), sizeof(dot_weight_t)),
                  {calloc((size_t)(count * at->nk16), sizeof(float)), calloc((size_t)(count * at->nk16), sizeof(float)),
                   calloc((size_t)(count * at->nk16), sizeof(float)), calloc((size_t)(count * at->nk16), sizeof(int32_t))},
                  malloc((size_t)(count * at->d) * sizeof(float)), malloc((size_t)(count * at->d) * sizeof(float))};
    return h->keys && h->values && h->terms.scale && h->terms.c && h->terms.term && h->terms.shifted_sum && h->vscale && h->vc;
}

static void free_heads(head_t h) {
    free(h.keys);
    free(h.values);
    free(h.terms.scale);
    free(h.terms.c);
    free(h.terms.term);
    free(h.terms.shifted_sum);
    free(h.vscale);
    free(h.vc);
}

static head_t head_at(const attention_t *at, head_t all, int64_t m) {
    const int64_t n = at->nk16;
    return (head_t){all.keys + m * at->key_levels, all.values + m * at->value_levels,
                    {all.terms.scale + m * n, all.terms.c + m * n, all.terms.term + m * n, all.terms.shifted_sum + m * n},
                    all.vscale + m * at->d, all.vc + m * at->d};
}

/* out (batch, nq, heads, d) = softmax(Q̂K̂ᵀ/√d)̂·V̂ for (batch, heads, tokens, d) inputs with the strides
 * given, as QuantAttentionCore: Q, K per token and V per channel on levels 0 … levels_top (min–max),
 * probabilities per row from 0 to its maximum on levels 0 … probs_top. Returns 0, −1 when memory ran out,
 * BAD_ARGUMENT for a level range that does not fit a byte.
 *
 * Where the heads share out evenly (or are many), a thread packs each of its heads into its own buffers
 * right before that head's query blocks, so K and V stay in its cache and the buffers are a head's size,
 * not all heads'; else all heads are packed first and the (head, block) tasks shared. */
int robuq_attention_int8(const float *q, strides_t qs, const float *k, strides_t kst, const float *v, strides_t vst,
                         int64_t batch, int64_t heads, int64_t nq, int64_t nk, int64_t d, int levels_top, int probs_top,
                         int shift, float inv_sqrt_d, float *out, int threads) {
    if (!supported(RULE_MINMAX, levels_top) || !supported(RULE_MINMAX, probs_top)) return BAD_ARGUMENT;
    const int64_t mats = batch * heads, dg = (d + DOT_GROUP - 1) / DOT_GROUP, d16 = (d + 15) / 16 * 16;
    const int64_t kg = (nk + DOT_GROUP - 1) / DOT_GROUP, nk16 = (nk + 15) / 16 * 16;
    const attention_t at = {q, k, v, qs, kst, vst, heads, nq, nk, d, d16, nk16, dg * nk16 * DOT_GROUP, kg * d16 * DOT_GROUP,
                            dg * DOT_GROUP, (float)levels_top, (float)probs_top, inv_sqrt_d, shift, out};
    const int per_thread = threads < 1 || mats % threads == 0 || mats >= 4 * (int64_t)threads;
    const int64_t blocks = (nq + QUERY_BLOCK - 1) / QUERY_BLOCK;
    head_t shared = {0};
    int failed = per_thread ? 0 : !alloc_heads(&at, mats, &shared);
    if (!failed) {
#pragma omp parallel num_threads(threads)
        {
            scratch_t t = {malloc((size_t)d * sizeof(float)), malloc((size_t)d * sizeof(float)),
                           malloc((size_t)d * sizeof(float)), aligned_buffer((size_t)(QUERY_BLOCK * nk16) * sizeof(float)),
                           calloc((size_t)(8 * dg * DOT_GROUP), sizeof(dot_row_t)), calloc((size_t)(2 * d16), sizeof(dot_row_t)),
                           calloc((size_t)(QUERY_BLOCK * dg * DOT_GROUP), sizeof(dot_row_t)),
                           malloc((size_t)(QUERY_BLOCK * nk16) * sizeof(dot_row_t)),
                           aligned_buffer((size_t)(QUERY_BLOCK * nk16) * sizeof(int32_t)),
                           aligned_buffer((size_t)(QUERY_BLOCK * d16) * sizeof(int32_t))};
            head_t own = {0};
            const int ok = t.lo && t.hi && t.offset && t.e && t.krows && t.vrows && t.qlevels && t.plevels && t.scores &&
                           t.out && (!per_thread || alloc_heads(&at, 1, &own));
            if (per_thread) {
#pragma omp for schedule(dynamic)
                for (int64_t m = 0; m < mats; m++) {
                    if (!ok) continue;
                    pack_head(&at, m, own, &t);
                    for (int64_t i0 = 0; i0 < nq; i0 += QUERY_BLOCK) attend_block(&at, m, i0, own, &t);
                }
            } else {
#pragma omp for schedule(dynamic)
                for (int64_t m = 0; m < mats; m++)
                    if (ok) pack_head(&at, m, head_at(&at, shared, m), &t);
#pragma omp for schedule(dynamic)
                for (int64_t task = 0; task < mats * blocks; task++)
                    if (ok) attend_block(&at, task / blocks, task % blocks * QUERY_BLOCK, head_at(&at, shared, task / blocks), &t);
            }
            note_failure(ok, &failed);
            free_heads(own);
            free(t.lo);
            free(t.hi);
            free(t.offset);
            free(t.e);
            free(t.krows);
            free(t.vrows);
            free(t.qlevels);
            free(t.plevels);
            free(t.scores);
            free(t.out);
        }
    }
    free_heads(shared);
    return failed ? -1 : 0;
}

/* ---- tanh-GELU, 0.5·x·(1 + tanh(u)) with u = √(2/π)(x + 0.044715x³), = x·e^{2u}/(1 + e^{2u}). PyTorch's CPU tanh is
 * the slow part of its GELU; with lanes_exp the result matches PyTorch's to about 1e-7 relative. ---- */
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

/* tanh-GELU in place over n contiguous values: the epilogue's second pass over the rows it has just written,
 * still in cache. Inside its column loop, beside the branch sums, the GELU's constants did not fit AVX2's
 * 16 registers (spilled: the fused epilogue of fc1 1.37× slower on one Intel core, 1.18× with AVX-512).
 * Compiled as the epilogue is, with fused multiply-adds, whether inlined or not. */
__attribute__((optimize("fp-contract=fast"))) static void gelu_span(float *y, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        lanes_f v = lanes_load(y + i);
        v = lanes_gelu_tanh(v);
        memcpy(y + i, &v, sizeof v);
    }
    for (; i < n; i++) y[i] = lanes_gelu_tanh(lanes_splat(y[i]))[0];
}

/* ---- The integer linear's epilogue, one pass per block of rows (and a second one for the GELU):
 *   y = acc·s_r·α_c + o_r·w_c + b_c [+ Σ_k branch_rk·up_kc] [then tanh-GELU],
 * where acc is the int32 product of the levels, w_c = α_c·Σ_k L_kc carries the activation offset, and
 * branch·up is the low-rank branch's second matmul (up given as rank × cols). Rows go RESCALE_ROWS at a
 * time, so each vector of `up` is loaded once per block of rows. Fused multiply-adds allowed: this
 * rounds like PyTorch's matmul, not bit for bit like its elementwise code. ---- */
#define RESCALE_ROWS 8

/* Columns [c, c + LANES) of rows row[0, count): full vectors only (the caller pads the tail). */
__attribute__((optimize("fp-contract=fast"), always_inline)) static inline void rescale_columns(
    const int32_t *acc, float *y, int64_t cols, int64_t c, const int64_t *row, int count, const float *s,
    const float *o, lanes_f alpha, lanes_f w, lanes_f bias, const float *branch, const float *up, int64_t rank) {
    /* Loops of constant trip count, unrolled: low stays in registers (with a count-long loop GCC kept it
     * on the stack and cleared it with rep stos on every call, the pass's largest cost). */
    lanes_f low[RESCALE_ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < RESCALE_ROWS; r++) low[r] = lanes_splat(0.0f);
    for (int64_t k = 0; k < rank; k++) {
        const lanes_f u = lanes_load(up + k * cols + c);
#pragma GCC unroll 8
        for (int r = 0; r < RESCALE_ROWS; r++) low[r] += branch[row[r] * rank + k] * u;
    }
#pragma GCC unroll 8
    for (int r = 0; r < RESCALE_ROWS; r++) {
        if (r >= count) break;
        lanes_i a;
        memcpy(&a, acc + row[r] * cols + c, sizeof a);
        const lanes_f v = __builtin_convertvector(a, lanes_f) * s[row[r]] * alpha + (o[row[r]] * w + bias) + low[r];
        memcpy(y + row[r] * cols + c, &v, sizeof v);
    }
}

/* The epilogue (above) of `count` ≤ RESCALE_ROWS rows, the GELU over them right after; acc, y, s, o and
 * branch start at the block's first row. Not inlined: an inlined function is compiled with its caller's
 * fp-contract setting, and this one rounds with fused multiply-adds wherever it is called from. */
__attribute__((optimize("fp-contract=fast"), noinline))
static void rescale_block(const int32_t *acc, float *y, int count, int64_t cols, const float *s, const float *o,
                          const float *alpha, const float *w, const float *bias, const float *branch, const float *up,
                          int64_t rank, int gelu) {
    const int64_t full = cols / LANES * LANES;
    int64_t row[RESCALE_ROWS]; /* rows past the end repeat the last one: computed, never stored */
    for (int r = 0; r < RESCALE_ROWS; r++) row[r] = r < count ? r : count - 1;
    for (int64_t c = 0; c < full; c += LANES)
        rescale_columns(acc, y, cols, c, row, count, s, o, lanes_load(alpha + c), lanes_load(w + c),
                        lanes_load(bias + c), branch, up, rank);
    for (int r = 0; r < count; r++) /* the ragged last columns, one at a time */
        for (int64_t c = full; c < cols; c++) {
            float v = (float)acc[r * cols + c] * s[r] * alpha[c] + (o[r] * w[c] + bias[c]), low = 0.0f;
            for (int64_t k = 0; k < rank; k++) low += branch[r * rank + k] * up[k * cols + c];
            v += low;
            y[r * cols + c] = v;
        }
    if (gelu)
        for (int r = 0; r < count; r++) gelu_span(y + r * cols, cols);
}

/* The epilogue over all rows, RESCALE_ROWS at a time (rescale_block). */
void robuq_rescale(const int32_t *acc, float *y, int64_t rows, int64_t cols, const float *s, const float *o,
                   const float *alpha, const float *w, const float *bias, const float *branch, const float *up,
                   int64_t rank, int gelu, int threads) {
    const int64_t blocks = (rows + RESCALE_ROWS - 1) / RESCALE_ROWS;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t r0 = blk * RESCALE_ROWS;
        const int count = rows - r0 < RESCALE_ROWS ? (int)(rows - r0) : RESCALE_ROWS;
        rescale_block(acc + r0 * cols, y + r0 * cols, count, cols, s + r0, o + r0, alpha, w, bias,
                      branch ? branch + r0 * rank : NULL, up, rank, gelu);
    }
}

/* ---- The adaLN block's elementwise work, one pass each where PyTorch takes two or three. Rows belong to
 * samples `tokens` at a time; shift, scale and gate hold one n-vector per sample. ---- */

/* A contiguous row's mean, returned through `mean`, and Σ(v − mean)², in double with LANES interleaved
 * partial sums so that they vectorize along the row (the order of a float sum is no more fixed in PyTorch). */
static double row_moments(const float *restrict v, int64_t n, float *mean) {
    double part[LANES] = {0}, total = 0.0;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) part[l] += v[i + l];
    for (; i < n; i++) total += v[i];
    for (int l = 0; l < LANES; l++) total += part[l];
    const float m = (float)(total / (double)n);
    double squares[LANES] = {0}, sum = 0.0;
    for (i = 0; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) squares[l] += (double)(v[i + l] - m) * (double)(v[i + l] - m);
    for (; i < n; i++) sum += (double)(v[i] - m) * (double)(v[i] - m);
    for (int l = 0; l < LANES; l++) sum += squares[l];
    *mean = m;
    return sum;
}

/* y = LayerNorm(x)·(1 + scale) + shift (no affine LayerNorm weights: DiT's norms have none), the order of
 * operations of modulate(norm(x), shift, scale). */
void robuq_layer_norm_modulate(const float *x, const float *shift, const float *scale, float *y, int64_t rows,
                               int64_t tokens, int64_t n, float eps, int threads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict v = x + r * n, *restrict sh = shift + (r / tokens) * n, *restrict sc = scale + (r / tokens) * n;
        float *restrict out = y + r * n;
        float mean;
        const double squares = row_moments(v, n, &mean);
        const float rstd = 1.0f / sqrtf((float)(squares / (double)n) + eps);
        for (int64_t i = 0; i < n; i++) out[i] = ((v[i] - mean) * rstd) * (1.0f + sc[i]) + sh[i];
    }
}

/* out = x + gate·y: the gated residual update. */
void robuq_gated_residual(const float *x, const float *gate, const float *y, float *out, int64_t rows, int64_t tokens,
                          int64_t n, int threads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict a = x + r * n, *restrict b = y + r * n, *restrict g = gate + (r / tokens) * n;
        float *restrict o = out + r * n;
        for (int64_t i = 0; i < n; i++) o[i] = a[i] + g[i] * b[i];
    }
}

/* ---- Integer GEMM for CPUs without VNNI: out = a·b with a (m, k) and b (k, n) int8, int32 sums, exactly
 * torch._int_mm's result. PyTorch's own int8 GEMM is fast only with VNNI (on an AVX2-only CPU it took 33×
 * an fp32 matmul's time), so robuq.deploy.gemm routes such CPUs here.
 *
 * AVX2's vpmaddubsw multiplies unsigned by signed bytes and adds pairs into saturating int16. The caller
 * says a's levels are u − shift with u in 0…top: shift 0 for activations of up to 7 bits (their levels are
 * already unsigned, and read in place), 128 for 8-bit ones or any int8 (the rows are copied as u = a + 128
 * and shift·Σ_k b[k][j] is taken off at the end). b is packed once per layer (native.pack_gemm_weights):
 * blocks of GEMM_PACK_COLUMNS columns, within a block GEMM_PACK_DEPTH consecutive k of one column side by
 * side, zero-padded to whole blocks. A row's GEMM_PACK_DEPTH bytes are broadcast as one int32 (a load, no
 * shuffle), vpmaddubsw against a block gives each column two pair sums, and those add up in int16 — one
 * multiply and one add per 32 products, where a general int8 GEMM (fbgemm) must widen every product
 * pair with a second multiply, vpmaddwd. Low-bit levels keep the int16 sums small: `flush` quads of pair
 * sums (the caller's bound, 32767 // (2·top·max|b|), at least 1, so max|b| ≤ 64) add up before vpmaddwd
 * against ones widens them and adds each column's two sums. ---- */
#if GEMM_PACK_COLUMNS != 8 || GEMM_PACK_DEPTH != 4
#error "the AVX2 GEMM tile is one register of 8 columns × 4 bytes: native.py's packing must match"
#endif
/* A register tile: 4 rows × 2 blocks of 8 columns, 8 int16 accumulators beside 2 weight vectors, a broadcast
 * and vpmaddubsw's result; 4 × 3 left GCC too few of AVX2's 16 registers and it spilled the accumulators
 * (1.7× slower), and so did 6 × 2 and 5 × 2. Tasks are 48 rows × 24 blocks: the rows and a block pair's
 * weights stay in L1/L2 while the tile walks them (24 or 96 rows were slower, measured here). */
#define GEMM_ROWS 4
#define GEMM_BLOCKS 2
#define GEMM_CHUNK_ROWS 48
#define GEMM_PANEL 24

/* What this build's integer kernels use: 2 AVX-512 VNNI (the attention's dot products; the GEMM below is
 * AVX2), 1 AVX2 (both), 0 plain C. */
int robuq_integer_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__) && !defined(ROBUQ_PORTABLE)
    return 2;
#elif defined(__AVX2__) && !defined(ROBUQ_PORTABLE)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX2__) && !defined(ROBUQ_PORTABLE)
/* out rows [0, rows) × blocks·8 columns from c0 = Σ_k u·b − shift·col_sums, for ROWS ≤ GEMM_ROWS and
 * BLOCKS ≤ GEMM_BLOCKS known when inlined, so that the accumulators stay in registers. */
static inline __attribute__((always_inline)) void gemm_tile(const uint8_t *restrict u, int64_t ustride,
                                                            const int8_t *restrict w, int64_t wstride, int64_t k4,
                                                            int64_t flush, int32_t shift, const int32_t *restrict col_sums,
                                                            int32_t *restrict out, int64_t n, int64_t c0,
                                                            const int ROWS, const int BLOCKS) {
    __m256i wide[GEMM_ROWS][GEMM_BLOCKS];
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < BLOCKS; b++) wide[r][b] = _mm256_setzero_si256();
    for (int64_t q0 = 0; q0 < k4; q0 += flush) {
        const int64_t q1 = k4 < q0 + flush ? k4 : q0 + flush;
        __m256i sums[GEMM_ROWS][GEMM_BLOCKS];
        for (int r = 0; r < ROWS; r++)
            for (int b = 0; b < BLOCKS; b++) sums[r][b] = _mm256_setzero_si256();
        for (int64_t q = q0; q < q1; q++) {
            __m256i wv[GEMM_BLOCKS];
            for (int b = 0; b < BLOCKS; b++) wv[b] = _mm256_loadu_si256((const __m256i *)(w + b * wstride + 32 * q));
            for (int r = 0; r < ROWS; r++) {
                int32_t quad;
                memcpy(&quad, u + r * ustride + 4 * q, sizeof quad);
                const __m256i x = _mm256_set1_epi32(quad);
                for (int b = 0; b < BLOCKS; b++) sums[r][b] = maddubs_into(sums[r][b], x, wv[b]);
            }
        }
        for (int r = 0; r < ROWS; r++)
            for (int b = 0; b < BLOCKS; b++) wide[r][b] = _mm256_add_epi32(wide[r][b], _mm256_madd_epi16(sums[r][b], ones));
    }
    for (int b = 0; b < BLOCKS; b++) {
        const int64_t c = c0 + 8 * b, width = n - c < 8 ? n - c : 8;
        int32_t correction[8] = {0};
        for (int j = 0; j < width; j++) correction[j] = shift * col_sums[c + j];
        const __m256i fix = _mm256_loadu_si256((const __m256i *)correction);
        for (int r = 0; r < ROWS; r++) {
            const __m256i v = _mm256_sub_epi32(wide[r][b], fix);
            if (width == 8) {
                _mm256_storeu_si256((__m256i *)(out + r * n + c), v);
            } else {
                int32_t lanes[8];
                _mm256_storeu_si256((__m256i *)lanes, v);
                memcpy(out + r * n + c, lanes, (size_t)width * sizeof(int32_t));
            }
        }
    }
}

#define GEMM_TILE(R, B)                                                                                                 \
    static void gemm_tile_##R##_##B(const uint8_t *u, int64_t ustride, const int8_t *w, int64_t wstride, int64_t k4,    \
                                    int64_t flush, int32_t shift, const int32_t *col_sums, int32_t *out, int64_t n,     \
                                    int64_t c0) {                                                                       \
        gemm_tile(u, ustride, w, wstride, k4, flush, shift, col_sums, out, n, c0, R, B);                                \
    }
#define GEMM_TILES_OF(R) GEMM_TILE(R, 1) GEMM_TILE(R, 2)
GEMM_TILES_OF(1) GEMM_TILES_OF(2) GEMM_TILES_OF(3) GEMM_TILES_OF(4)
typedef void (*gemm_tile_fn)(const uint8_t *, int64_t, const int8_t *, int64_t, int64_t, int64_t, int32_t, const int32_t *,
                             int32_t *, int64_t, int64_t);
static const gemm_tile_fn GEMM_TILES[GEMM_ROWS][GEMM_BLOCKS] = {
    {gemm_tile_1_1, gemm_tile_1_2}, {gemm_tile_2_1, gemm_tile_2_2}, {gemm_tile_3_1, gemm_tile_3_2}, {gemm_tile_4_1, gemm_tile_4_2}};
#endif

#if !defined(__AVX2__) || defined(ROBUQ_PORTABLE)
/* The same sums one at a time, for a build without AVX2: column c's k-th weight is at block c / 8,
 * quad k / 4, lane c % 8, byte k % 4 of the packing. */
static void gemm_plain(const uint8_t *restrict u, int64_t ustride, int64_t rows, const int8_t *restrict w, int64_t k4,
                       int32_t shift, const int32_t *restrict col_sums, int32_t *restrict out, int64_t n, int64_t c0,
                       int64_t c1) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = c0; c < c1; c++) {
            const int8_t *col = w + (c / 8) * k4 * 32 + (c % 8) * 4;
            int32_t sum = 0;
            for (int64_t q = 0; q < k4; q++)
                for (int i = 0; i < 4; i++) sum += (int32_t)u[r * ustride + 4 * q + i] * (int32_t)col[32 * q + i];
            out[r * n + c] = sum - shift * col_sums[c];
        }
}
#endif

/* out (m, n) = a (m, k) · b (k, n), exact int32, with b packed by native.pack_gemm_weights; shift, top and
 * flush as above. Returns 0, or −1 when memory ran out. */
int robuq_gemm_s8(const int8_t *a, int32_t shift, const int8_t *packed, int32_t *out, int64_t m, int64_t k, int64_t n,
                  const int32_t *col_sums, int64_t flush, int threads) {
    const int64_t k4 = (k + 3) / 4, blocks = (n + 7) / 8;
    const int64_t chunks = (m + GEMM_CHUNK_ROWS - 1) / GEMM_CHUNK_ROWS, panels = (blocks + GEMM_PANEL - 1) / GEMM_PANEL;
    /* Rows are read in place when they need no shift and whole quads end them; else copied, zero-padded. */
    const int in_place = shift == 0 && k % 4 == 0;
    const int64_t ustride = in_place ? k : 4 * k4;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        uint8_t *copy = in_place ? NULL : aligned_buffer((size_t)(GEMM_CHUNK_ROWS * ustride));
        const int ok = in_place || copy;
        int64_t copied = -1; /* the chunk the buffer holds */
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < chunks * panels; task++) {
            if (!ok) continue;
            const int64_t chunk = task / panels, r0 = chunk * GEMM_CHUNK_ROWS;
            const int64_t rows = m - r0 < GEMM_CHUNK_ROWS ? m - r0 : GEMM_CHUNK_ROWS;
            const int64_t b0 = task % panels * GEMM_PANEL, b1 = blocks < b0 + GEMM_PANEL ? blocks : b0 + GEMM_PANEL;
            const uint8_t *u = (const uint8_t *)a + r0 * k;
            if (!in_place) {
                if (copied != chunk) {
                    memset(copy, 0, (size_t)(GEMM_CHUNK_ROWS * ustride));
                    for (int64_t r = 0; r < rows; r++)
                        for (int64_t i = 0; i < k; i++) copy[r * ustride + i] = (uint8_t)(a[(r0 + r) * k + i] + shift);
                    copied = chunk;
                }
                u = copy;
            }
#if defined(__AVX2__) && !defined(ROBUQ_PORTABLE)
            const int64_t wstride = k4 * 32; /* bytes from one packed block to the next */
            for (int64_t b = b0; b < b1; b += GEMM_BLOCKS) {
                const int width = b1 - b < GEMM_BLOCKS ? (int)(b1 - b) : GEMM_BLOCKS;
                for (int64_t t = 0; t < rows; t += GEMM_ROWS) {
                    const int height = rows - t < GEMM_ROWS ? (int)(rows - t) : GEMM_ROWS;
                    GEMM_TILES[height - 1][width - 1](u + t * ustride, ustride, packed + b * wstride, wstride, k4, flush,
                                                      shift, col_sums, out + (r0 + t) * n, n, 8 * b);
                }
            }
#else
            gemm_plain(u, ustride, rows, packed, k4, shift, col_sums, out + r0 * n, n, 8 * b0, n < 8 * b1 ? n : 8 * b1);
#endif
        }
        note_failure(ok, &failed);
        free(copy);
    }
    return failed ? -1 : 0;
}


/* ---- Ternary lookup GEMM for CPUs without VNNI: out = a·w, exact int32, for weights in {−1, 0, 1} and
 * activation levels u in 0…top with top ≤ TERNARY_MAX_TOP (4-bit and narrower; shift 0).
 *
 * With ternary weights a product needs no multiply: three consecutive k (a group) of one column hold one
 * of 27 weight patterns, 14 up to sign. Each row's centered levels c = u − zero, zero = ⌈top/2⌉, give
 * per group a 16-entry table T[slot] = c·pattern(slot) (TERNARY_PATTERN_* from native.py: slot 0 is
 * all-zero, every other pattern's first nonzero weight is +1). A column's group is stored as its slot and
 * the sign that makes its pattern canonical (0 for all-zero weights), so 32 columns of one group are one
 * vpshufb of the row's table, one vpsignb and one vpaddb into int8 sums: 96 products per three
 * instructions where vpmaddubsw needs four (one multiply and one add per 32), measured 1.1–1.4× the
 * multiply-add kernel above on DiT-S/2's shapes. |T| ≤ 3·max|c|, so 127 / that many groups add up in int8
 * before their even and odd bytes are widened into int16 sums (vpmaddubsw by byte masks, no cross-lane shuffle), and
 * 32767 / that many groups before those are added into the int32 output; zero·Σ_k w_kj, from the
 * caller's column sums, puts the centering back. Packing (native.pack_ternary_weights): blocks of
 * TERNARY_COLUMNS columns, per group the 32 slots then the 32 signs. ---- */
#if !defined(TERNARY_GROUP) || !defined(TERNARY_COLUMNS) || !defined(TERNARY_MAX_TOP) || !defined(TERNARY_PATTERN_FIRST)
#error "build through robuq/kernels/native.py: it defines the ternary GEMM's patterns and packing"
#endif
#if TERNARY_GROUP != 3 || TERNARY_COLUMNS != 32
#error "the ternary GEMM's tables are three weights wide and its vectors 32 columns: native.py's packing must match"
#endif
static const int8_t TERNARY_PATTERNS[TERNARY_GROUP][16] = {TERNARY_PATTERN_FIRST, TERNARY_PATTERN_SECOND,
                                                           TERNARY_PATTERN_THIRD};
/* Rows per register tile (three int8 sums, six int16 ones, the slots, signs, a table and a lookup fill
 * AVX2's 16 registers; 4–6 rows were 3–12% slower, measured here) and per task (a multiple of the tile:
 * the chunk's tables stay in L2 while every column block walks them). */
#define TERNARY_ROWS 3
#define TERNARY_CHUNK_ROWS 36

static int ternary_zero(int top) { return (top + 1) / 2; }

/* Centered levels of rows [0, rows) of a (row stride k) into c (row stride cstride, zero past k: a
 * partial group's missing weights meet a zero level). */
static void ternary_center(const int8_t *restrict a, int64_t k, int64_t rows, int zero, int8_t *restrict c,
                           int64_t cstride) {
    memset(c, 0, (size_t)(rows * cstride));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < k; i++) c[r * cstride + i] = (int8_t)(a[r * k + i] - zero);
}

#if defined(__AVX2__) && !defined(ROBUQ_PORTABLE)
/* acc + sign(table[slots], signs) in acc's own register (as ACCUMULATE_INTO: GCC otherwise copies every sum). */
static inline __attribute__((always_inline)) __m256i lookup_into(__m256i acc, __m256i table, __m256i slots,
                                                                 __m256i signs) {
    __m256i entry;
    __asm__("vpshufb %[slots], %[table], %[entry]\n\t"
            "vpsignb %[signs], %[entry], %[entry]\n\t"
            "vpaddb %[entry], %[acc], %[acc]"
            : [acc] "+x"(acc), [entry] "=&x"(entry)
            : [table] "x"(table), [slots] "x"(slots), [signs] "x"(signs));
    return acc;
}

/* Each row's tables, two groups per vector: both lanes hold the same 16 levels from the group's first, and
 * a shuffle spreads each of the three (lane 0: group g, lane 1: group g + 1) across the lane. c needs 16
 * readable bytes past its last group. */
static void ternary_tables(const int8_t *restrict c, int64_t cstride, int64_t rows, int64_t groups,
                           int8_t *restrict tables) {
    __m256i pattern[TERNARY_GROUP], spread[TERNARY_GROUP];
    for (int i = 0; i < TERNARY_GROUP; i++) {
        pattern[i] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)TERNARY_PATTERNS[i]));
        spread[i] = _mm256_setr_m128i(_mm_set1_epi8((char)i), _mm_set1_epi8((char)(TERNARY_GROUP + i)));
    }
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *row = c + r * cstride;
        int8_t *t = tables + r * groups * 16;
        for (int64_t g = 0; g < groups; g += 2) {
            const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(row + TERNARY_GROUP * g)));
            __m256i entry = _mm256_setzero_si256();
            for (int i = 0; i < TERNARY_GROUP; i++)
                entry = _mm256_add_epi8(entry, _mm256_sign_epi8(_mm256_shuffle_epi8(levels, spread[i]), pattern[i]));
            if (g + 1 < groups)
                _mm256_storeu_si256((__m256i *)(t + 16 * g), entry);
            else
                _mm_storeu_si128((__m128i *)(t + 16 * g), _mm256_castsi256_si128(entry));
        }
    }
}

/* out rows [0, ROWS) × 32 columns from c0: groups [g0, g1) of the rows' tables against one column block's
 * slots and signs, plus `fix` (the first int16 span), or added into out where fix is NULL (the later ones). */
static inline __attribute__((always_inline)) void ternary_tile(const int8_t *restrict tables, int64_t groups,
                                                               const int8_t *restrict code, int64_t g0, int64_t g1,
                                                               int64_t flush, const int32_t *restrict fix,
                                                               int32_t *restrict out, int64_t n, int64_t c0,
                                                               const int ROWS) {
    __m256i even[TERNARY_ROWS], odd[TERNARY_ROWS];
    for (int r = 0; r < ROWS; r++) even[r] = odd[r] = _mm256_setzero_si256();
    /* vpmaddubsw by (1, 0) and (0, 1) byte pairs sign-extends the even and the odd bytes into int16 words:
     * one instruction each, where shifts took one and two. */
    const __m256i even_bytes = _mm256_set1_epi16(0x0001), odd_bytes = _mm256_set1_epi16(0x0100);
    for (int64_t q0 = g0; q0 < g1; q0 += flush) {
        const int64_t q1 = g1 < q0 + flush ? g1 : q0 + flush;
        __m256i sums[TERNARY_ROWS];
        for (int r = 0; r < ROWS; r++) sums[r] = _mm256_setzero_si256();
        for (int64_t g = q0; g < q1; g++) {
            const __m256i slots = _mm256_loadu_si256((const __m256i *)(code + 2 * TERNARY_COLUMNS * g));
            const __m256i signs = _mm256_loadu_si256((const __m256i *)(code + 2 * TERNARY_COLUMNS * g + TERNARY_COLUMNS));
            for (int r = 0; r < ROWS; r++) {
                const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(tables + (r * groups + g) * 16)));
                sums[r] = lookup_into(sums[r], table, slots, signs);
            }
        }
        for (int r = 0; r < ROWS; r++) { /* the int16 words' high bytes are the odd columns, their low bytes the even */
            odd[r] = _mm256_add_epi16(odd[r], _mm256_maddubs_epi16(odd_bytes, sums[r]));
            even[r] = _mm256_add_epi16(even[r], _mm256_maddubs_epi16(even_bytes, sums[r]));
        }
    }
    for (int r = 0; r < ROWS; r++) {
        const __m256i lo = _mm256_unpacklo_epi16(even[r], odd[r]); /* columns 0–7 | 16–23 */
        const __m256i hi = _mm256_unpackhi_epi16(even[r], odd[r]); /* columns 8–15 | 24–31 */
        const __m256i eight[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo)),
                                  _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi)),
                                  _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1)),
                                  _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1))};
        for (int e = 0; e < 4; e++) {
            const int64_t c = c0 + 8 * e;
            if (c >= n) break;
            int32_t *o = out + r * n + c;
            const __m256i v = fix ? _mm256_add_epi32(eight[e], _mm256_loadu_si256((const __m256i *)(fix + 8 * e))) : eight[e];
            if (c + 8 <= n) { /* whole vectors stored as such: element by element cost a tenth of the kernel */
                _mm256_storeu_si256((__m256i *)o, fix ? v : _mm256_add_epi32(v, _mm256_loadu_si256((const __m256i *)o)));
                continue;
            }
            int32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, v);
            for (int j = 0; j < n - c; j++) o[j] = fix ? lanes[j] : o[j] + lanes[j];
        }
    }
}

#define TERNARY_TILE(R)                                                                                              \
    static void ternary_tile_##R(const int8_t *tables, int64_t groups, const int8_t *code, int64_t g0, int64_t g1,     \
                                 int64_t flush, const int32_t *fix, int32_t *out, int64_t n, int64_t c0) {             \
        ternary_tile(tables, groups, code, g0, g1, flush, fix, out, n, c0, R);                                         \
    }
TERNARY_TILE(1) TERNARY_TILE(2) TERNARY_TILE(3)
typedef void (*ternary_tile_fn)(const int8_t *, int64_t, const int8_t *, int64_t, int64_t, int64_t, const int32_t *,
                                int32_t *, int64_t, int64_t);
static const ternary_tile_fn TERNARY_TILES[TERNARY_ROWS] = {ternary_tile_1, ternary_tile_2, ternary_tile_3};
#else
/* The same sums one at a time, for a build without AVX2: the weight of column j, k = 3g + i is
 * sign·pattern_i(slot) (the sums are exact whatever their order). */
static void ternary_plain(const int8_t *restrict c, int64_t cstride, int64_t rows, int64_t groups,
                          const int8_t *restrict code, const int32_t *restrict fix, int32_t *restrict out, int64_t n,
                          int64_t c0) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = c0; j < n && j < c0 + TERNARY_COLUMNS; j++) {
            int32_t sum = fix[j - c0];
            for (int64_t g = 0; g < groups; g++) {
                const int8_t *group = code + 2 * TERNARY_COLUMNS * g;
                const int slot = group[j - c0], sign = group[TERNARY_COLUMNS + j - c0];
                for (int i = 0; i < TERNARY_GROUP; i++)
                    sum += sign * TERNARY_PATTERNS[i][slot] * c[r * cstride + TERNARY_GROUP * g + i];
            }
            out[r * n + j] = sum;
        }
}
#endif

/* The shapes of one ternary GEMM: k = TERNARY_GROUP·groups (padded), n columns in `blocks` packed blocks,
 * and (AVX2) how many groups add up in int8 (flush) and in int16 (span) before their sums are widened. */
typedef struct {
    const int8_t *code;
    const int32_t *col_sums;
    int64_t k, n, groups, blocks, cstride, flush, span;
    int zero;
} ternary_t;

static ternary_t ternary_shapes(const int8_t *code, const int32_t *col_sums, int64_t k, int64_t n, int top) {
    ternary_t tg = {code, col_sums, k, n, (k + TERNARY_GROUP - 1) / TERNARY_GROUP, (n + TERNARY_COLUMNS - 1) / TERNARY_COLUMNS,
                    0, 1, 1, ternary_zero(top)};
    tg.cstride = (TERNARY_GROUP * tg.groups + 16 + 63) / 64 * 64; /* 16 bytes past the last group: see ternary_tables */
#if defined(__AVX2__) && !defined(ROBUQ_PORTABLE)
    const int largest = TERNARY_GROUP * (tg.zero > top - tg.zero ? tg.zero : top - tg.zero); /* max |table entry| */
    tg.flush = 127 / largest;
    tg.span = 32767 / largest / tg.flush * tg.flush;
#endif
    return tg;
}

/* A chunk's scratch: its centered levels and (AVX2) tables, for up to `rows` rows; NULL members when
 * memory ran out. */
typedef struct {
    int8_t *c, *tables;
} ternary_scratch_t;

static ternary_scratch_t ternary_scratch(const ternary_t *tg, int64_t rows) {
#if defined(__AVX2__) && !defined(ROBUQ_PORTABLE)
    return (ternary_scratch_t){aligned_buffer((size_t)(rows * tg->cstride)), aligned_buffer((size_t)(rows * tg->groups * 16))};
#else
    /* the plain sums read the centered levels themselves; tables is c again, so that the checks hold */
    int8_t *c = aligned_buffer((size_t)(rows * tg->cstride));
    return (ternary_scratch_t){c, c};
#endif
}

static void free_ternary_scratch(ternary_scratch_t t) {
    if (t.tables != t.c) free(t.tables);
    free(t.c);
}

/* out (rows, n) = a (rows, k) · w, for one chunk of rows that fits the scratch. */
static void ternary_chunk(const ternary_t *tg, const int8_t *a, int64_t rows, ternary_scratch_t scratch, int32_t *out) {
    const int64_t groups = tg->groups, n = tg->n;
    int32_t fix[TERNARY_COLUMNS];
    ternary_center(a, tg->k, rows, tg->zero, scratch.c, tg->cstride);
#if defined(__AVX2__) && !defined(ROBUQ_PORTABLE)
    ternary_tables(scratch.c, tg->cstride, rows, groups, scratch.tables);
#endif
    for (int64_t b = 0; b < tg->blocks; b++) {
        for (int j = 0; j < TERNARY_COLUMNS; j++) {
            const int64_t column = b * TERNARY_COLUMNS + j;
            fix[j] = column < n ? tg->zero * tg->col_sums[column] : 0;
        }
        const int8_t *block = tg->code + b * groups * 2 * TERNARY_COLUMNS;
#if defined(__AVX2__) && !defined(ROBUQ_PORTABLE)
        for (int64_t g0 = 0; g0 < groups; g0 += tg->span) {
            const int64_t g1 = groups < g0 + tg->span ? groups : g0 + tg->span;
            for (int64_t t = 0; t < rows; t += TERNARY_ROWS) {
                const int height = rows - t < TERNARY_ROWS ? (int)(rows - t) : TERNARY_ROWS;
                TERNARY_TILES[height - 1](scratch.tables + t * groups * 16, groups, block, g0, g1, tg->flush,
                                          g0 ? NULL : fix, out + t * n, n, b * TERNARY_COLUMNS);
            }
        }
#else
        ternary_plain(scratch.c, tg->cstride, rows, groups, block, fix, out, n, b * TERNARY_COLUMNS);
#endif
    }
}

/* out (m, n) = a (m, k) · w (k, n), exact int32, with w ternary and packed by native.pack_ternary_weights,
 * a's levels in 0…top (top ≤ TERNARY_MAX_TOP), col_sums = Σ_k w. Returns 0, −1 when memory ran out,
 * BAD_ARGUMENT for a level range above TERNARY_MAX_TOP. */
int robuq_gemm_ternary(const int8_t *a, int32_t top, const int8_t *code, int32_t *out, int64_t m, int64_t k, int64_t n,
                       const int32_t *col_sums, int threads) {
    if (top < 1 || top > TERNARY_MAX_TOP) return BAD_ARGUMENT;
    const ternary_t tg = ternary_shapes(code, col_sums, k, n, top);
    const int64_t chunks = (m + TERNARY_CHUNK_ROWS - 1) / TERNARY_CHUNK_ROWS;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const ternary_scratch_t scratch = ternary_scratch(&tg, TERNARY_CHUNK_ROWS);
        const int ok = scratch.c && scratch.tables;
#pragma omp for schedule(dynamic)
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            if (!ok) continue;
            const int64_t r0 = chunk * TERNARY_CHUNK_ROWS;
            const int64_t rows = m - r0 < TERNARY_CHUNK_ROWS ? m - r0 : TERNARY_CHUNK_ROWS;
            ternary_chunk(&tg, a + r0 * k, rows, scratch, out + r0 * n);
        }
        note_failure(ok, &failed);
        free_ternary_scratch(scratch);
    }
    return failed ? -1 : 0;
}

/* ---- A whole ternary integer linear in one parallel pass over chunks of rows: each chunk's input pass
 * (robuq_hadamard_quantize), its lookup GEMM (robuq_gemm_ternary) and its epilogue (robuq_rescale) run
 * back to back on one thread, so the chunk's levels and int32 sums stay in that core's cache instead of
 * going out to memory between three kernels (DiT-S/2's qkv: 9 MiB of sums per call), and one parallel
 * region replaces three: the exported DiT-S/2 forward 1.07–1.11× faster (AVX2 build, one and two threads,
 * A/B in one process), bit for bit the same. Activation levels are unsigned (shift 0), as the lookup GEMM
 * takes them. 24 rows per chunk were 2% slower, 96 no faster. ---- */
#define LINEAR_CHUNK_ROWS 48 /* whole tiles of LANES rows and of TERNARY_ROWS */

int robuq_linear_ternary(const float *x, int64_t rows, int64_t k, int64_t m, const float *hm, const float *signs,
                         int levels_top, int rule, float step_factor, float ratio, const float *down, int64_t rank,
                         const int8_t *code, int64_t n, const int32_t *col_sums, const float *alpha, const float *w,
                         const float *bias, const float *up, int gelu, float *y, int threads) {
    if (!supported(rule, levels_top) || levels_top > TERNARY_MAX_TOP) return BAD_ARGUMENT;
    float *down_t = NULL;
    if (down && !(down_t = transposed_down(down, rank, k))) return -1;
    const quantize_t qz = {k, m, rank, hm, signs, down_t, hm ? mix12_scale(hm, m) : 0.0f, (float)levels_top,
                           step_factor, ratio, rule, 0};
    const ternary_t tg = ternary_shapes(code, col_sums, k, n, levels_top);
    const int64_t chunks = (rows + LINEAR_CHUNK_ROWS - 1) / LINEAR_CHUNK_ROWS;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *t = tile_buffer(k), *out = tile_buffer(k), *scale = malloc(LINEAR_CHUNK_ROWS * sizeof(float));
        float *offset = malloc(LINEAR_CHUNK_ROWS * sizeof(float));
        float *branch = rank ? malloc((size_t)(LINEAR_CHUNK_ROWS * rank) * sizeof(float)) : NULL;
        int8_t *q = aligned_buffer((size_t)(k * LANES)), *levels = aligned_buffer((size_t)(LINEAR_CHUNK_ROWS * k));
        int32_t *acc = aligned_buffer((size_t)(LINEAR_CHUNK_ROWS * n) * sizeof(int32_t));
        const ternary_scratch_t scratch = ternary_scratch(&tg, LINEAR_CHUNK_ROWS);
        const int ok = t && out && scale && offset && (branch || !rank) && q && levels && acc && scratch.c && scratch.tables;
#pragma omp for schedule(dynamic)
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            if (!ok) continue;
            const int64_t r0 = chunk * LINEAR_CHUNK_ROWS;
            const int64_t count = rows - r0 < LINEAR_CHUNK_ROWS ? rows - r0 : LINEAR_CHUNK_ROWS;
            for (int64_t i = 0; i < count; i += LANES)
                quantize_tile(&qz, x + (r0 + i) * k, count - i < LANES ? count - i : LANES, t, out, q, levels + i * k, NULL,
                              scale + i, offset + i, down_t ? branch + i * rank : NULL);
            ternary_chunk(&tg, levels, count, scratch, acc);
            for (int64_t i = 0; i < count; i += RESCALE_ROWS)
                rescale_block(acc + i * n, y + (r0 + i) * n, count - i < RESCALE_ROWS ? (int)(count - i) : RESCALE_ROWS, n,
                              scale + i, offset + i, alpha, w, bias, branch ? branch + i * rank : NULL, up, rank, gelu);
        }
        note_failure(ok, &failed);
        free(t);
        free(out);
        free(scale);
        free(offset);
        free(branch);
        free(q);
        free(levels);
        free(acc);
        free_ternary_scratch(scratch);
    }
    free(down_t);
    return failed ? -1 : 0;
}
