/* Peak rates of the instructions robuq's integer GEMMs are built on, for benchmarks/roofline.py: many
 * independent accumulator chains, so that throughput, not latency, bounds each loop. Every result feeds the
 * returned value, so the compiler keeps the work. Built with -march=native; a function returns -1 when the
 * CPU (or the build) lacks its instructions. */
#include <stdint.h>
#include <immintrin.h>

#define CHAINS 12

/* `rounds` × CHAINS byte lookups at AVX-512 width (vpermb, then vpaddb): the ternary lookup GEMM's inner pair. */
int64_t lookup_rounds(int64_t rounds) {
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
    __m512i acc[CHAINS], table[CHAINS];
    for (int c = 0; c < CHAINS; c++) {
        acc[c] = _mm512_set1_epi8((char)c);
        table[c] = _mm512_set1_epi8((char)(3 * c + 1));
    }
    for (int64_t r = 0; r < rounds; r++)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_add_epi8(acc[c], _mm512_permutexvar_epi8(acc[c], table[c]));
    int64_t sum = 0;
    for (int c = 0; c < CHAINS; c++) sum += (int8_t)_mm_cvtsi128_si32(_mm512_castsi512_si128(acc[c]));
    return sum;
#else
    (void)rounds;
    return -1;
#endif
}

/* `rounds` × CHAINS AVX-512 VNNI dot products (vpdpbusd: 64 u8·s8 products summed into 16 int32 lanes). */
int64_t vnni_rounds(int64_t rounds) {
#if defined(__AVX512VNNI__)
    __m512i acc[CHAINS];
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-1);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_epi32(c);
    for (int64_t r = 0; r < rounds; r++)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbusd_epi32(acc[c], a, b);
    int64_t sum = 0;
    for (int c = 0; c < CHAINS; c++) sum += _mm_cvtsi128_si32(_mm512_castsi512_si128(acc[c]));
    return sum;
#else
    (void)rounds;
    return -1;
#endif
}

/* `rounds` × CHAINS AVX2 lookups (vpshufb, vpsignb, vpaddb on 32 bytes): the AVX2 lookup GEMM's inner triple. */
int64_t avx2_lookup_rounds(int64_t rounds) {
#if defined(__AVX2__)
    __m256i acc[CHAINS], table[CHAINS];
    const __m256i signs = _mm256_set1_epi8(1);
    for (int c = 0; c < CHAINS; c++) {
        acc[c] = _mm256_set1_epi8((char)c);
        table[c] = _mm256_set1_epi8((char)(3 * c + 1));
    }
    for (int64_t r = 0; r < rounds; r++)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++)
            acc[c] = _mm256_add_epi8(acc[c], _mm256_sign_epi8(_mm256_shuffle_epi8(table[c], acc[c]), signs));
    int64_t sum = 0;
    for (int c = 0; c < CHAINS; c++) sum += (int8_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(acc[c]));
    return sum;
#else
    (void)rounds;
    return -1;
#endif
}

int chains(void) { return CHAINS; }
