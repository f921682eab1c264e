/* A ternary integer linear in one pass: quantize, lookup GEMM, epilogue per block of rows.
 * Part of cpu_kernels.c's single translation unit: it sees what the files before it define. */

/* ---- A whole ternary integer linear in one parallel pass over chunks of rows: each chunk's input pass
 * (robuq_hadamard_quantize), its lookup GEMM (robuq_gemm_ternary) and its epilogue (robuq_rescale) run
 * back to back on one thread, so the chunk's levels and int32 sums stay in that core's cache instead of
 * going out to memory between three kernels, and one parallel region replaces three; the result is bit
 * for bit the three kernels'. Activation levels are unsigned (shift 0), as the lookup GEMM takes them.
 * ---- */
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
