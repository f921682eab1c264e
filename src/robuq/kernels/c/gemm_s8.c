/* The int8 × int8 → int32 GEMM for CPUs without VNNI (vpmaddubsw with int16 sums).
 * Part of cpu_kernels.c's single translation unit: it sees what the files before it define. */

/* ---- Integer GEMM for CPUs without VNNI: out = a·b with a (m, k) and b (k, n) int8, int32 sums, exactly
 * torch._int_mm's result. PyTorch's own int8 GEMM is fast only with VNNI (on an AVX2-only CPU it is far
 * slower than an fp32 matmul), so robuq.deploy.gemm routes such CPUs here.
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
 * and vpmaddubsw's result; 4 × 3 left GCC too few of AVX2's 16 registers and it spilled the accumulators,
 * and so did 6 × 2 and 5 × 2. Tasks are 48 rows × 24 blocks: the rows and a block pair's weights stay in
 * L1/L2 while the tile walks them. */
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
