/* The Hadamard transform of rows: tiles of LANES rows, fast Walsh–Hadamard butterflies, the order-m mix.
 * Part of cpu_kernels.c's single translation unit: it sees what the files before it define.
 *
 * A row of n = m·p values is an (m, p) matrix X with p a power of two; the normalised transform is
 * H_m·X·H_p / √n, H_p applied as a fast Walsh–Hadamard transform (Sylvester order) and H_m, pre-scaled by
 * the caller to H_m/√n, as a dense m×m mix (H_12: as sums of sign patterns, mix12_tile). Rows are processed
 * LANES at a time, transposed into a tile t[i][lane]: every butterfly, multiply-add and statistic then runs
 * across lanes, one full vector register, whatever its stride within the row. */

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

#if LANES == 16 && defined(__AVX512F__)
/* The same at AVX-512 width: 16 rows of 16 floats times 16 signs into 16 tile rows by 64 shuffles, where
 * lane-by-lane loads took 256 strided scalar loads (they were most of the input pass at 16 lanes). Within
 * each 128-bit lane, unpacks and shuffles make 4×4 transposes (b[4g + j], lane q: rows 4g…4g + 3 of
 * column 4q + j); whole-lane shuffles then gather each column's four lanes. */
static inline void load_16x16(const float *restrict x, int64_t n, __m512 sign, float *restrict t) {
    __m512 r[16], a[16], b[16];
    for (int l = 0; l < 16; l++) r[l] = _mm512_mul_ps(_mm512_loadu_ps(x + l * n), sign);
    for (int l = 0; l < 16; l += 2) {
        a[l] = _mm512_unpacklo_ps(r[l], r[l + 1]);
        a[l + 1] = _mm512_unpackhi_ps(r[l], r[l + 1]);
    }
    for (int l = 0; l < 16; l += 4) {
        b[l] = _mm512_shuffle_ps(a[l], a[l + 2], 0x44);
        b[l + 1] = _mm512_shuffle_ps(a[l], a[l + 2], 0xEE);
        b[l + 2] = _mm512_shuffle_ps(a[l + 1], a[l + 3], 0x44);
        b[l + 3] = _mm512_shuffle_ps(a[l + 1], a[l + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        const __m512 low_lanes = _mm512_shuffle_f32x4(b[j], b[4 + j], 0x44), high_lanes = _mm512_shuffle_f32x4(b[j], b[4 + j], 0xEE);
        const __m512 low_rest = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0x44), high_rest = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0xEE);
        _mm512_store_ps(t + j * 16, _mm512_shuffle_f32x4(low_lanes, low_rest, 0x88));
        _mm512_store_ps(t + (4 + j) * 16, _mm512_shuffle_f32x4(low_lanes, low_rest, 0xDD));
        _mm512_store_ps(t + (8 + j) * 16, _mm512_shuffle_f32x4(high_lanes, high_rest, 0x88));
        _mm512_store_ps(t + (12 + j) * 16, _mm512_shuffle_f32x4(high_lanes, high_rest, 0xDD));
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
#if LANES == 16 && defined(__AVX512F__)
    if (count == LANES)
        for (; i + 16 <= n; i += 16) load_16x16(x + i, n, signs ? _mm512_loadu_ps(signs + i) : _mm512_set1_ps(1.0f), t + i * 16);
#endif
    for (; i < n; i++) {
        const float sign = signs ? signs[i] : 1.0f;
        for (int l = 0; l < LANES; l++) t[i * LANES + l] = l < count ? x[l * n + i] * sign : 0.0f;
    }
}

/* Scalar on purpose: vectorized, GCC emits scatters, which are slower. */
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
