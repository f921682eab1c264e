/* Fused multiply-add and e^x on lane vectors (attention's softmax, the GELU).
 * Part of cpu_kernels.c's single translation unit: it sees what the files before it define. */

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
