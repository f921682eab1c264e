/* Per-row statistics, scales and levels (the activation quantizer), with the Hadamard pass and the low-rank branch's first matmul.
 * Part of cpu_kernels.c's single translation unit: it sees what the files before it define. */

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
