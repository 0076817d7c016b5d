// y = x W^T for float32 on x86 CPUs with AVX2 and FMA: the matrix-vector products that
// decoding and verification steps are made of (mtpd/model/cpu_linear.py says why).
//
// Y[M, N] = X[M, K] @ W[N, K]^T, all row-major and contiguous, K a multiple of 8.
// Threads split the output columns: each reads its own weight rows once, from memory,
// and multiplies them with every input row while they sit in L1. Every output is one
// dot product summed in the same order whatever M and the thread count are, so a row
// gets bit-identical results alone or in a verification step of several rows.

#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

// R weight rows from n0 against G input rows from m0: R * G accumulators, R + G loads
// per 8 columns. Called with constant R and G, so the loops unroll into registers.
static inline __attribute__((always_inline)) void tile(
    const int R, const int G, const float* X, const float* W, float* Y,
    int64_t m0, int64_t n0, int64_t N, int64_t K) {
    __m256 acc[3][4];
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++) acc[g][r] = _mm256_setzero_ps();
    const float* w = W + n0 * K;
    for (int64_t k = 0; k < K; k += 8) {
        __m256 xv[3];
        for (int g = 0; g < G; g++) xv[g] = _mm256_loadu_ps(X + (m0 + g) * K + k);
        for (int r = 0; r < R; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * K + k);
            for (int g = 0; g < G; g++) acc[g][r] = _mm256_fmadd_ps(wv, xv[g], acc[g][r]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++) Y[(m0 + g) * N + n0 + r] = hsum(acc[g][r]);
}

// All input rows against R weight rows from n0, three input rows at a time.
static inline __attribute__((always_inline)) void rows(
    const int R, const float* X, const float* W, float* Y, int64_t n0, int64_t M, int64_t N,
    int64_t K) {
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) tile(R, 3, X, W, Y, m, n0, N, K);
    if (M - m == 2) tile(R, 2, X, W, Y, m, n0, N, K);
    if (M - m == 1) tile(R, 1, X, W, Y, m, n0, N, K);
}

void mtpd_linear_f32(const float* X, const float* W, float* Y, int64_t M, int64_t N,
                     int64_t K, int threads) {
    const int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) rows(4, X, W, Y, 4 * b, M, N, K);
    for (int64_t n = 4 * blocks; n < N; n++) rows(1, X, W, Y, n, M, N, K);
}
