/* Shared by every family: the quantizer's constants, lane vectors and their helpers, aligned buffers. */
#pragma once
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
 * register-blocked loops (hadamard_quantize, rescale, attention). */
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
