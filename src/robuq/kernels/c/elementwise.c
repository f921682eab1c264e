/* The integer linear's epilogue, tanh-GELU, the adaLN block's LayerNorm + modulation and gated residual.
 * Part of cpu_kernels.c's single translation unit: it sees what the files before it define. */

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
 * 16 registers and spilled, slowing the fused epilogue of fc1.
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
