/* One core's f32 FMA peak: 24 independent vector accumulators, so that neither the FMA latency
 * nor a store limits the loop. AVX-512 (16 lanes) when compiled with -mavx512f, else AVX2 + FMA
 * (8 lanes). Run one copy per core at once to see whether the cores share their FMA units (on a
 * VM, hyperthreads of one core would).
 *
 *   gcc -O2 -mavx512f -o /tmp/fma_peak tools/bench/fma_peak.c     (Intel Xeon with AVX-512)
 *   gcc -O2 -mavx2 -mfma -o /tmp/fma_peak tools/bench/fma_peak.c  (AVX2 CPUs: AMD EPYC)
 *   /tmp/fma_peak; (/tmp/fma_peak & /tmp/fma_peak; wait)
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#ifdef __AVX512F__
#define LANES 16
typedef __m512 vec;
#define SPLAT _mm512_set1_ps
#define FMADD _mm512_fmadd_ps
#define HSUM _mm512_reduce_add_ps
#else
#define LANES 8
typedef __m256 vec;
#define SPLAT _mm256_set1_ps
#define FMADD _mm256_fmadd_ps
static float HSUM(__m256 v) {
    float s[8], t = 0;
    _mm256_storeu_ps(s, v);
    for (int i = 0; i < 8; i++) t += s[i];
    return t;
}
#endif

#define DECLARE(i) vec a##i = SPLAT(i);
#define STEP(i) a##i = FMADD(a##i, x, y);
#define REDUCE(i) total += HSUM(a##i);
#define EACH(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) \
    M(12) M(13) M(14) M(15) M(16) M(17) M(18) M(19) M(20) M(21) M(22) M(23)

int main(void) {
    const vec x = SPLAT(1.0000001f), y = SPLAT(0.9999999f);
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
    printf("%.1f GFLOP/s, %d lanes (checksum %g)\n", iters * 24.0 * LANES * 2 / s / 1e9, LANES, total);
    return 0;
}
