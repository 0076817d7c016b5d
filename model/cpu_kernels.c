// float32 kernels for decoding and verification steps on x86 CPUs with AVX2 and FMA
// (mtpd/model/cpu_kernels.py says why): the linear layers, and the small operations
// between them, each of which costs more in PyTorch's dispatch than in arithmetic at a
// few rows. Every result a row gets is computed in the same order whatever else the step
// holds and however many threads run, so a row gets bit-identical results alone or in a
// verification step of several rows.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

// ---- linear: Y[M, N] = X[M, K] @ W[N, K]^T, row-major and contiguous, K a multiple of 8.
// Threads split the output columns: each reads its own weight rows once, from memory,
// and multiplies them with every input row while they sit in L1. Every output is one
// dot product summed in the same order whatever M and the thread count are.

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

// ---- int4 linear: Y[M, N] = X[M, K] @ W[N, K]^T with W in groups of 32 inputs,
// W[n, 32 b + j] = q * S[n, b] + Z[n, b], q in 0..15 (GGUF's Q4_1 form). Q[n] holds a
// group in 16 bytes, byte j carrying q of input j in its low nibble and of input j + 16
// in its high one, as GGUF stores them. Each group's four vectors of weights are unpacked
// once and multiplied with up to three input rows. Z's share, Z[n, b] * sum(X[m, group
// b]), rides in the same accumulator through XS[m, b], each group's inputs summed to 8
// lanes once per call. K is a multiple of 32.
static inline __attribute__((always_inline)) void q4_tile(
    const int G, const float* X, const float* XS, const uint8_t* Q, const float* S,
    const float* Z, float* Y, int64_t m0, int64_t n, int64_t N, int64_t K) {
    const int64_t groups = K / 32;
    const uint8_t* q = Q + n * (K / 2);
    const float* s = S + n * groups;
    const float* z = Z + n * groups;
    const __m128i low_nibbles = _mm_set1_epi8(0x0F);
    __m256 acc[3];
    for (int g = 0; g < G; g++) acc[g] = _mm256_setzero_ps();
    for (int64_t b = 0; b < groups; b++) {
        const __m128i bytes = _mm_loadu_si128((const __m128i*)(q + 16 * b));
        const __m128i lo = _mm_and_si128(bytes, low_nibbles);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        const __m256 scale = _mm256_broadcast_ss(s + b), zero = _mm256_broadcast_ss(z + b);
        for (int g = 0; g < G; g++) {
            const float* x = X + (m0 + g) * K + 32 * b;
            __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(x));
            t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), t);
            t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + 16), t);
            t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + 24), t);
            acc[g] = _mm256_fmadd_ps(scale, t, acc[g]);
            acc[g] = _mm256_fmadd_ps(zero, _mm256_loadu_ps(XS + ((m0 + g) * groups + b) * 8), acc[g]);
        }
    }
    for (int g = 0; g < G; g++) Y[(m0 + g) * N + n] = hsum(acc[g]);
}

void mtpd_linear_q4_f32(const float* X, const uint8_t* Q, const float* S, const float* Z,
                        float* Y, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t groups = K / 32;
    float* xs = malloc(sizeof(float) * M * K / 4);
    for (int64_t i = 0; i < M * groups; i++) {
        const float* x = X + 32 * i;
        __m256 v = _mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8));
        v = _mm256_add_ps(v, _mm256_loadu_ps(x + 16));
        _mm256_storeu_ps(xs + 8 * i, _mm256_add_ps(v, _mm256_loadu_ps(x + 24)));
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        int64_t m = 0;
        for (; m + 3 <= M; m += 3) q4_tile(3, X, xs, Q, S, Z, Y, m, n, N, K);
        if (M - m == 2) q4_tile(2, X, xs, Q, S, Z, Y, m, n, N, K);
        if (M - m == 1) q4_tile(1, X, xs, Q, S, Z, Y, m, n, N, K);
    }
    free(xs);
}

// ---- int8 linear: Y[M, N] = X[M, K] @ W[N, K]^T with W[n, k] = Q[n, k] * S[n] (one scale
// per output, as PyTorch's int8 operator takes); K a multiple of 8.
static inline __attribute__((always_inline)) void q8_tile(
    const int G, const float* X, const int8_t* Q, const float* S, float* Y, int64_t m0,
    int64_t n, int64_t N, int64_t K) {
    const int8_t* q = Q + n * K;
    __m256 acc[3];
    for (int g = 0; g < G; g++) acc[g] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        const __m128i bytes = _mm_loadl_epi64((const __m128i*)(q + k));
        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        for (int g = 0; g < G; g++)
            acc[g] = _mm256_fmadd_ps(w, _mm256_loadu_ps(X + (m0 + g) * K + k), acc[g]);
    }
    for (int g = 0; g < G; g++) Y[(m0 + g) * N + n] = hsum(acc[g]) * S[n];
}

void mtpd_linear_q8_f32(const float* X, const int8_t* Q, const float* S, float* Y,
                        int64_t M, int64_t N, int64_t K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        int64_t m = 0;
        for (; m + 3 <= M; m += 3) q8_tile(3, X, Q, S, Y, m, n, N, K);
        if (M - m == 2) q8_tile(2, X, Q, S, Y, m, n, N, K);
        if (M - m == 1) q8_tile(1, X, Q, S, Y, m, n, N, K);
    }
}

// ---- Elementwise exp, 8 lanes at a time through glibc's vector math library (libmvec),
// or lane by lane where it does not link (built with MTPD_SCALAR_EXP); a tail shorter
// than 8 goes through the same function, padded.
#ifdef MTPD_SCALAR_EXP
static __m256 exp8(__m256 x) {
    float v[8];
    _mm256_storeu_ps(v, x);
    for (int i = 0; i < 8; i++) v[i] = expf(v[i]);
    return _mm256_loadu_ps(v);
}
#else
__m256 _ZGVdN8v_expf(__m256 x);
#define exp8 _ZGVdN8v_expf
#endif

static void exp_all(float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float tail[8] = {0};
        for (int64_t j = i; j < n; j++) tail[j - i] = x[j];
        _mm256_storeu_ps(tail, exp8(_mm256_loadu_ps(tail)));
        for (int64_t j = i; j < n; j++) x[j] = tail[j - i];
    }
}

// Dot product of n floats, n a multiple of 8.
static float dot(const float* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum(acc);
}

// ---- RMSNorm: Y[m] = X[m] / sqrt(mean(X[m]^2) + eps) * W, M rows of H (a multiple of 8).
void mtpd_rms_norm_f32(const float* X, const float* W, float* Y, int64_t M, int64_t H,
                       float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float* x = X + m * H;
        const float r = 1.0f / sqrtf(dot(x, x, H) / (float)H + eps);
        for (int64_t i = 0; i < H; i++) Y[m * H + i] = x[i] * r * W[i];
    }
}

// ---- SwiGLU: Y[m, i] = silu(G[m, i]) * U[m, i], gate and up side by side in GU[m].
void mtpd_silu_mul_f32(const float* GU, float* Y, int64_t M, int64_t I) {
    for (int64_t m = 0; m < M; m++) {
        const float* g = GU + m * 2 * I;
        float* y = Y + m * I;
        for (int64_t i = 0; i < I; i++) y[i] = -g[i];
        exp_all(y, I);
        for (int64_t i = 0; i < I; i++) y[i] = g[i] / (1.0f + y[i]) * g[I + i];
    }
}

// ---- Attention for one sequence's T new rows over its cache slot.
// QKV[T, (heads + 2 kv_heads) d]: q, k, v side by side, as the fused projection makes
// them. RoPE (rotate-half: x cos + roll(x, d/2) sin_signed, with COS and SIN_SIGNED
// [T, d] at the rows' positions) turns q and k; k and v are written at positions
// start.. of the slot's KC and VC [kv_heads, max_context, d]; then row t of head h
// attends over keys 0..start+t of kv head h / (heads / kv_heads). OUT[T, heads d].
// d is a multiple of 8 and at most 256.
static void rope(const float* x, const float* c, const float* s, float* y, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < d; i++) y[i] = x[i] * c[i] + x[(i + half) % d] * s[i];
}

void mtpd_attend_f32(const float* QKV, const float* COS, const float* SIN_SIGNED, float* KC,
                     float* VC, float* OUT, int64_t T, int64_t start, int64_t heads,
                     int64_t kv_heads, int64_t d, int64_t max_context, float scale,
                     int threads) {
    const int64_t width = (heads + 2 * kv_heads) * d;
    for (int64_t t = 0; t < T; t++) {
        const float* row = QKV + t * width;
        for (int64_t g = 0; g < kv_heads; g++) {
            const int64_t at = (g * max_context + start + t) * d;
            rope(row + (heads + g) * d, COS + t * d, SIN_SIGNED + t * d, KC + at, d);
            for (int64_t i = 0; i < d; i++) VC[at + i] = row[(heads + kv_heads + g) * d + i];
        }
    }
    const int64_t group = heads / kv_heads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < T * heads; task++) {
        const int64_t t = task / heads, h = task % heads, keys = start + t + 1;
        const float* k = KC + h / group * max_context * d;
        const float* v = VC + h / group * max_context * d;
        float q[256];
        rope(QKV + t * width + h * d, COS + t * d, SIN_SIGNED + t * d, q, d);
        float* p = malloc(sizeof(float) * keys);
        float top = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < keys; j++) {
            p[j] = dot(q, k + j * d, d) * scale;
            top = p[j] > top ? p[j] : top;
        }
        for (int64_t j = 0; j < keys; j++) p[j] -= top;
        exp_all(p, keys);
        for (int64_t j = 0; j < keys; j++) total += p[j];
        float* o = OUT + t * heads * d + h * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < keys; j++) {
            const float w = p[j] / total;
            for (int64_t i = 0; i < d; i++) o[i] += w * v[j * d + i];
        }
        free(p);
    }
}
