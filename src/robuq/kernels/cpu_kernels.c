/* robuq's CPU kernels: one pass per token where PyTorch needs one pass per operation.
 *
 * Built at first use by robuq/kernels/native.py (cc -O3 -march=native -fopenmp) and called through
 * ctypes on contiguous float32 rows. Each function has a PyTorch twin that defines what it computes;
 * the tests hold the two equal.
 *
 * Parallel loops hand out their tasks dynamically: the threads of a shared or hybrid CPU do not all run
 * at one speed, and with static halves the faster one would wait for the slower at every kernel's end.
 * Every task writes its own outputs, so the results do not depend on the schedule.
 */

/* One library, one translation unit: the kernel families live in c/, included in this order (each
 * file uses helpers the files before it define), so the compiler inlines across them as before. */
#include "c/common.h"
#include "c/hadamard.c"
#include "c/quantize.c"
#include "c/vector_math.c"
#include "c/attention.c"
#include "c/elementwise.c"
#include "c/gemm_s8.c"
#include "c/gemm_ternary.c"
#include "c/linear_ternary.c"
