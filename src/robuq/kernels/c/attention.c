/* The 8-bit attention, fused per head and block of queries.
 * Part of cpu_kernels.c's single translation unit: it sees what the files before it define. */

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
 * product's register and copied it back, one vmovdqa per multiply: a third more vector ALU work on a core
 * with three vector ALU ports. */
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
 * madd_into per product GCC 12 copied accumulators through a spare register, 7 vmovdqa per 8 multiplies,
 * which only some cores' renamers drop. */
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
