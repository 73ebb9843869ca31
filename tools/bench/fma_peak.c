/* One core's f32 FMA peak with AVX-512: 24 independent accumulators, so that neither the FMA
 * latency nor a store limits the loop. Run one copy per core at once to see whether the cores
 * share their FMA units (on a VM, hyperthreads of one core would).
 *
 *   gcc -O2 -mavx512f -o /tmp/fma_peak tools/bench/fma_peak.c
 *   /tmp/fma_peak; (/tmp/fma_peak & /tmp/fma_peak; wait)
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define DECLARE(i) __m512 a##i = _mm512_set1_ps(i);
#define STEP(i) a##i = _mm512_fmadd_ps(a##i, x, y);
#define REDUCE(i) total += _mm512_reduce_add_ps(a##i);
#define EACH(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) \
    M(12) M(13) M(14) M(15) M(16) M(17) M(18) M(19) M(20) M(21) M(22) M(23)

int main(void) {
    const __m512 x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.9999999f);
    EACH(DECLARE)
    const long iters = 200000000;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long it = 0; it < iters; it++) {
        EACH(STEP)
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    float total = 0;
    EACH(REDUCE) /* keeps the loop's results live */
    printf("%.1f GFLOP/s (checksum %g)\n", iters * 24.0 * 16 * 2 / s / 1e9, total);
    return 0;
}
