/* The ternary table-lookup GEMM for CPUs without VNNI.
 * Part of cpu_kernels.c's single translation unit: it sees what the files before it define. */

/* ---- Ternary lookup GEMM for CPUs without VNNI: out = a·w, exact int32, for weights in {−1, 0, 1} and
 * activation levels u in 0…top with top ≤ TERNARY_MAX_TOP (4-bit and narrower; shift 0).
 *
 * With ternary weights a product needs no multiply: three consecutive k (a group) of one column hold one
 * of 27 weight patterns, 14 up to sign. Each row's centered levels c = u − zero, zero = ⌈top/2⌉, give
 * per group a 16-entry table T[slot] = c·pattern(slot) (TERNARY_PATTERN_* from native.py: slot 0 is
 * all-zero, every other pattern's first nonzero weight is +1). A column's group is stored as its slot and
 * the sign that makes its pattern canonical (0 for all-zero weights), so 32 columns of one group are one
 * vpshufb of the row's table, one vpsignb and one vpaddb into int8 sums: 96 products per three
 * instructions where vpmaddubsw needs four (one multiply and one add per 32). |T| ≤ 3·max|c|, so 127 / that many groups add up in int8
 * before their even and odd bytes are widened into int16 sums (vpmaddubsw by byte masks, no cross-lane shuffle), and
 * 32767 / that many groups before those are added into the int32 output; zero·Σ_k w_kj, from the
 * caller's column sums, puts the centering back. Packing (native.pack_ternary_weights): blocks of
 * TERNARY_COLUMNS columns, per group the 32 slots then the 32 signs. ---- */
#if !defined(TERNARY_GROUP) || !defined(TERNARY_COLUMNS) || !defined(TERNARY_MAX_TOP) || !defined(TERNARY_PATTERN_FIRST)
#error "build through robuq/kernels/native.py: it defines the ternary GEMM's patterns and packing"
#endif
#if TERNARY_GROUP != 3 || TERNARY_COLUMNS != 32 || TERNARY_WIDE_COLUMNS != 64
#error "the ternary GEMM's tables are three weights wide and its vectors 32 or 64 columns: native.py's packing must match"
#endif

/* Which lookup this build runs, fixed at compile time (native.ternary_columns tells Python, which packs for it):
 * TERNARY_WIDE where AVX-512 VBMI gives a 64-byte lookup (vpermb), else AVX2's 16-byte one, else plain C. */
#if defined(__AVX512VBMI__) && defined(__AVX512BW__) && !defined(ROBUQ_PORTABLE)
#define TERNARY_WIDE 1
#define TERNARY_AVX2 0
#define TERNARY_BLOCK TERNARY_WIDE_COLUMNS
#elif defined(__AVX2__) && !defined(ROBUQ_PORTABLE)
#define TERNARY_WIDE 0
#define TERNARY_AVX2 1
#define TERNARY_BLOCK TERNARY_COLUMNS
#else
#define TERNARY_WIDE 0
#define TERNARY_AVX2 0
#define TERNARY_BLOCK TERNARY_COLUMNS
#endif

/* Columns per packed block, what native.pack_ternary_weights must lay out for this build. */
int robuq_ternary_columns(void) { return TERNARY_BLOCK; }
static const int8_t TERNARY_PATTERNS[TERNARY_GROUP][16] = {TERNARY_PATTERN_FIRST, TERNARY_PATTERN_SECOND,
                                                           TERNARY_PATTERN_THIRD};
/* Rows per register tile (three int8 sums, six int16 ones, the slots, signs, a table and a lookup fill
 * AVX2's 16 registers; more rows spill) and per task (a multiple of the tile:
 * the chunk's tables stay in L2 while every column block walks them). */
#if TERNARY_WIDE
#define TERNARY_ROWS 6 /* a sum and two int16 halves per row: 18 of AVX-512's 32 registers */
#else
#define TERNARY_ROWS 3
#endif
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

#if TERNARY_AVX2
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
static inline __attribute__((always_inline)) void ternary_tile(const int8_t *restrict tables, int64_t stride,
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
                const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(tables + r * stride + g * 16)));
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

#elif TERNARY_WIDE
/* The same GEMM at AVX-512 width, where VBMI's vpermb looks up 64 bytes by six-bit indices: a column's group
 * is stored as its full pattern's base-3 number Σ (w_i + 1)·3^(2−i) (0…26; 13 is all-zero), plus 32 in odd
 * groups, and a row's table for a pair of groups holds the 27 sums c·pattern of the even group in bytes 0–26
 * and of the odd one in 32–58. 64 columns of one group are then one vpermb and one vpaddb: no sign to apply,
 * 192 products per two instructions. Packing (native.pack_ternary_weights): blocks of TERNARY_WIDE_COLUMNS
 * columns, per group the 64 numbers. */
static void ternary_tables(const int8_t *restrict c, int64_t cstride, int64_t rows, int64_t groups,
                           int8_t *restrict tables) {
    const int64_t pairs = (groups + 1) / 2;
    int8_t spread_bytes[TERNARY_GROUP][64];
    __m512i spread[TERNARY_GROUP];
    __mmask64 plus[TERNARY_GROUP] = {0}, minus[TERNARY_GROUP] = {0};
    for (int i = 0; i < TERNARY_GROUP; i++) {
        for (int j = 0; j < 64; j++) spread_bytes[i][j] = (int8_t)(j < 32 ? i : TERNARY_GROUP + i);
        spread[i] = _mm512_loadu_si512(spread_bytes[i]);
        for (int number = 0, power = i == 0 ? 9 : i == 1 ? 3 : 1; number < 27; number++) {
            const int w = number / power % 3 - 1;
            const __mmask64 both = (__mmask64)1 << number | (__mmask64)1 << (number + 32);
            if (w > 0) plus[i] |= both;
            if (w < 0) minus[i] |= both;
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *row = c + r * cstride;
        for (int64_t p = 0; p < pairs; p++) {
            const __m512i levels = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(row + 2 * TERNARY_GROUP * p)));
            __m512i entry = _mm512_setzero_si512();
            for (int i = 0; i < TERNARY_GROUP; i++) {
                const __m512i level = _mm512_permutexvar_epi8(spread[i], levels);
                entry = _mm512_mask_add_epi8(entry, plus[i], entry, level);
                entry = _mm512_mask_sub_epi8(entry, minus[i], entry, level);
            }
            _mm512_store_si512(tables + (r * pairs + p) * 64, entry);
        }
    }
}

/* As the AVX2 tile, 64 columns wide: int8 sums widened in column order into two int16 halves. */
static inline __attribute__((always_inline)) void ternary_tile(const int8_t *restrict tables, int64_t stride,
                                                               const int8_t *restrict code, int64_t g0, int64_t g1,
                                                               int64_t flush, const int32_t *restrict fix,
                                                               int32_t *restrict out, int64_t n, int64_t c0,
                                                               const int ROWS) {
    __m512i low[TERNARY_ROWS], high[TERNARY_ROWS];
    for (int r = 0; r < ROWS; r++) low[r] = high[r] = _mm512_setzero_si512();
    for (int64_t q0 = g0; q0 < g1; q0 += flush) {
        const int64_t q1 = g1 < q0 + flush ? g1 : q0 + flush;
        __m512i sums[TERNARY_ROWS];
        for (int r = 0; r < ROWS; r++) sums[r] = _mm512_setzero_si512();
        for (int64_t g = q0; g < q1; g++) {
            const __m512i numbers = _mm512_loadu_si512(code + TERNARY_WIDE_COLUMNS * g);
            const int8_t *pair = tables + g / 2 * 64;
            for (int r = 0; r < ROWS; r++)
                sums[r] = _mm512_add_epi8(sums[r], _mm512_permutexvar_epi8(numbers, _mm512_load_si512(pair + r * stride)));
        }
        for (int r = 0; r < ROWS; r++) {
            low[r] = _mm512_add_epi16(low[r], _mm512_cvtepi8_epi16(_mm512_castsi512_si256(sums[r])));
            high[r] = _mm512_add_epi16(high[r], _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(sums[r], 1)));
        }
    }
    for (int r = 0; r < ROWS; r++) {
        const __m512i sixteen[4] = {_mm512_cvtepi16_epi32(_mm512_castsi512_si256(low[r])),
                                    _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(low[r], 1)),
                                    _mm512_cvtepi16_epi32(_mm512_castsi512_si256(high[r])),
                                    _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(high[r], 1))};
        for (int e = 0; e < 4; e++) {
            const int64_t c = c0 + 16 * e;
            if (c >= n) break;
            const __mmask16 inside = n - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c)) - 1);
            int32_t *o = out + r * n + c;
            const __m512i before = fix ? _mm512_loadu_si512(fix + 16 * e) : _mm512_maskz_loadu_epi32(inside, o);
            _mm512_mask_storeu_epi32(o, inside, _mm512_add_epi32(sixteen[e], before));
        }
    }
}

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

#if TERNARY_AVX2 || TERNARY_WIDE
/* One function per tile height, each with ROWS known when ternary_tile is inlined: its sums stay in registers. */
#define TERNARY_TILE(R)                                                                                              \
    static void ternary_tile_##R(const int8_t *tables, int64_t stride, const int8_t *code, int64_t g0, int64_t g1,     \
                                 int64_t flush, const int32_t *fix, int32_t *out, int64_t n, int64_t c0) {             \
        ternary_tile(tables, stride, code, g0, g1, flush, fix, out, n, c0, R);                                         \
    }
typedef void (*ternary_tile_fn)(const int8_t *, int64_t, const int8_t *, int64_t, int64_t, int64_t, const int32_t *,
                                int32_t *, int64_t, int64_t);
TERNARY_TILE(1) TERNARY_TILE(2) TERNARY_TILE(3)
#if TERNARY_ROWS == 6
TERNARY_TILE(4) TERNARY_TILE(5) TERNARY_TILE(6)
static const ternary_tile_fn TERNARY_TILES[TERNARY_ROWS] = {ternary_tile_1, ternary_tile_2, ternary_tile_3,
                                                            ternary_tile_4, ternary_tile_5, ternary_tile_6};
#else
static const ternary_tile_fn TERNARY_TILES[TERNARY_ROWS] = {ternary_tile_1, ternary_tile_2, ternary_tile_3};
#endif
#endif

/* The shapes of one ternary GEMM: k = TERNARY_GROUP·groups (padded), n columns in `blocks` packed blocks,
 * and (AVX2) how many groups add up in int8 (flush) and in int16 (span) before their sums are widened. */
typedef struct {
    const int8_t *code;
    const int32_t *col_sums;
    int64_t k, n, groups, blocks, cstride, stride, flush, span; /* stride: bytes of one row's tables */
    int zero;
} ternary_t;

static ternary_t ternary_shapes(const int8_t *code, const int32_t *col_sums, int64_t k, int64_t n, int top) {
    ternary_t tg = {code, col_sums, k, n, (k + TERNARY_GROUP - 1) / TERNARY_GROUP, (n + TERNARY_BLOCK - 1) / TERNARY_BLOCK,
                    0, 0, 1, 1, ternary_zero(top)};
    tg.cstride = (TERNARY_GROUP * tg.groups + 16 + 63) / 64 * 64; /* 16 bytes past the last group: see ternary_tables */
    tg.stride = TERNARY_WIDE ? (tg.groups + 1) / 2 * 64 : tg.groups * 16;
#if TERNARY_AVX2 || TERNARY_WIDE
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
#if TERNARY_AVX2 || TERNARY_WIDE
    return (ternary_scratch_t){aligned_buffer((size_t)(rows * tg->cstride)), aligned_buffer((size_t)(rows * tg->stride))};
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
    int32_t fix[TERNARY_BLOCK];
    ternary_center(a, tg->k, rows, tg->zero, scratch.c, tg->cstride);
#if TERNARY_AVX2 || TERNARY_WIDE
    ternary_tables(scratch.c, tg->cstride, rows, groups, scratch.tables);
#endif
    for (int64_t b = 0; b < tg->blocks; b++) {
        for (int j = 0; j < TERNARY_BLOCK; j++) {
            const int64_t column = b * TERNARY_BLOCK + j;
            fix[j] = column < n ? tg->zero * tg->col_sums[column] : 0;
        }
        const int8_t *block = tg->code + b * groups * 2 * TERNARY_COLUMNS; /* a block's groups: 64 bytes each */
#if TERNARY_AVX2 || TERNARY_WIDE
        for (int64_t g0 = 0; g0 < groups; g0 += tg->span) {
            const int64_t g1 = groups < g0 + tg->span ? groups : g0 + tg->span;
            for (int64_t t = 0; t < rows; t += TERNARY_ROWS) {
                const int height = rows - t < TERNARY_ROWS ? (int)(rows - t) : TERNARY_ROWS;
                TERNARY_TILES[height - 1](scratch.tables + t * tg->stride, tg->stride, block, g0, g1, tg->flush,
                                          g0 ? NULL : fix, out + t * n, n, b * TERNARY_BLOCK);
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
