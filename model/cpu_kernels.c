// float32 kernels for decoding and verification steps on x86 CPUs with AVX2 and FMA
// (mtpd/model/cpu_kernels.py says why): the linear layers, and the small operations
// between them, each of which costs more in PyTorch's dispatch than in arithmetic at a
// few rows. Every result a row gets is computed in the same order whatever else the step
// holds and however many threads run, so a row gets bit-identical results alone or in a
// verification step of several rows.

#include <float.h>
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

// Two accumulators per input row, taking alternate steps: one would chain every
// step's FMA on the last one's result, and at one row that latency, not memory or
// arithmetic, sets the speed. Summed in a fixed order, so results stay reproducible.

// ---- int4 linear: Y[M, N] = X[M, K] @ W[N, K]^T with W in groups of 32 inputs,
// W[n, 32 b + j] = q * S[n, b] + Z[n, b], q in 0..15 (GGUF's Q4_1 form). Q[n] holds a
// group in 16 bytes, byte j carrying q of input j in its low nibble and of input j + 16
// in its high one, as GGUF stores them. As llama.cpp does, each group of X's inputs is
// rounded to 8 bits with its own scale (XQ, XD) once per call, so a group's product is
// one integer multiply-add of 32 byte pairs (maddubs) instead of converting every weight
// to a float. Z's share is Z[n] . XS[m], XS the rounded groups' sums: every weight then
// multiplies the same rounded input (summing the exact inputs instead would leave the
// rounding of the nibbles' common offset uncancelled, several times the error). K is a
// multiple of 32.
static inline __m256 q4_group(__m256i w, const int8_t* xq, float xd, __m256 scale) {
    const __m256i x = _mm256_loadu_si256((const __m256i*)xq);
    const __m256i pairs = _mm256_maddubs_epi16(w, x);  // |15 * 127 * 2| fits int16
    const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    return _mm256_mul_ps(_mm256_mul_ps(dots, _mm256_set1_ps(xd)), scale);
}

static inline __m256i q4_unpack(const uint8_t* q) {
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q), low = _mm_set1_epi8(0x0F);
    const __m256i lo = _mm256_castsi128_si256(_mm_and_si128(bytes, low));
    return _mm256_inserti128_si256(lo, _mm_and_si128(_mm_srli_epi16(bytes, 4), low), 1);
}

static inline __attribute__((always_inline)) void q4_tile(
    const int G, const int8_t* XQ, const float* XD, const float* XS, const uint8_t* Q,
    const float* S, const float* Z, float* Y, int64_t m0, int64_t n, int64_t N, int64_t K) {
    const int64_t groups = K / 32;
    const uint8_t* q = Q + n * (K / 2);
    const float* s = S + n * groups;
    __m256 even[3], odd[3];
    for (int g = 0; g < G; g++) even[g] = odd[g] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= groups; b += 2) {
        const __m256i w0 = q4_unpack(q + 16 * b), w1 = q4_unpack(q + 16 * (b + 1));
        const __m256 s0 = _mm256_broadcast_ss(s + b), s1 = _mm256_broadcast_ss(s + b + 1);
        for (int g = 0; g < G; g++) {
            const int64_t xg = (m0 + g) * groups + b;
            even[g] = _mm256_add_ps(even[g], q4_group(w0, XQ + 32 * xg, XD[xg], s0));
            odd[g] = _mm256_add_ps(odd[g], q4_group(w1, XQ + 32 * (xg + 1), XD[xg + 1], s1));
        }
    }
    if (b < groups) {
        const __m256i w0 = q4_unpack(q + 16 * b);
        const __m256 s0 = _mm256_broadcast_ss(s + b);
        for (int g = 0; g < G; g++) {
            const int64_t xg = (m0 + g) * groups + b;
            even[g] = _mm256_add_ps(even[g], q4_group(w0, XQ + 32 * xg, XD[xg], s0));
        }
    }
    for (int g = 0; g < G; g++) {
        const float* xs = XS + (m0 + g) * groups;
        const float* z = Z + n * groups;
        int64_t i = 0;
        __m256 zero_part = _mm256_setzero_ps();
        for (; i + 8 <= groups; i += 8)
            zero_part = _mm256_fmadd_ps(_mm256_loadu_ps(z + i), _mm256_loadu_ps(xs + i), zero_part);
        float total = hsum(_mm256_add_ps(_mm256_add_ps(even[g], odd[g]), zero_part));
        for (; i < groups; i++) total += z[i] * xs[i];
        Y[(m0 + g) * N + n] = total;
    }
}

// Each group of 32 inputs: 8-bit values XQ with scale XD (max |x| / 127, rounded to
// nearest), and the sum of the rounded values (XQ * XD) in XS. A group holding a NaN or
// an infinity gets a NaN scale, so the outputs it reaches are NaN, as a float product's
// would be; a group too small for its scale to invert counts as zero.
static void q8_groups(const float* X, int64_t count, int8_t* XQ, float* XD, float* XS) {
    const __m256 sign = _mm256_set1_ps(-0.0f), huge = _mm256_set1_ps(FLT_MAX);
    for (int64_t i = 0; i < count; i++) {
        const float* x = X + 32 * i;
        __m256 v[4], top = _mm256_setzero_ps();
        int finite = 1;
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + 8 * j);
            const __m256 size = _mm256_andnot_ps(sign, v[j]);
            finite &= _mm256_movemask_ps(_mm256_cmp_ps(size, huge, _CMP_LE_OQ)) == 0xFF;
            top = _mm256_max_ps(top, size);
        }
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        t = _mm_max_ss(t, _mm_shuffle_ps(t, t, 1));
        float d = _mm_cvtss_f32(t) / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
        if (!(inverse <= FLT_MAX)) d = inverse = 0.0f;
        if (!finite) {
            for (int j = 0; j < 32; j++) XQ[32 * i + j] = 0;
            XD[i] = XS[i] = NAN;
            continue;
        }
        const __m256 inv = _mm256_set1_ps(inverse);
        __m256i q[4];
        for (int j = 0; j < 4; j++)
            q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        // int32 -> int8 in input order: packs interleave 128-bit lanes, the permute undoes it.
        const __m256i w16a = _mm256_packs_epi32(q[0], q[1]), w16b = _mm256_packs_epi32(q[2], q[3]);
        const __m256i w8 = _mm256_packs_epi16(w16a, w16b);
        _mm256_storeu_si256((__m256i*)(XQ + 32 * i),
                            _mm256_permutevar8x32_epi32(w8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        XD[i] = d;
        const __m256i sums = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        XS[i] = hsum(_mm256_cvtepi32_ps(sums)) * d;
    }
}

void mtpd_linear_q4_f32(const float* X, const uint8_t* Q, const float* S, const float* Z,
                        float* Y, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t count = M * K / 32;
    int8_t* xq = malloc(32 * count);
    float* xd = malloc(sizeof(float) * count);
    float* xs = malloc(sizeof(float) * count);
    q8_groups(X, count, xq, xd, xs);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        int64_t m = 0;
        for (; m + 3 <= M; m += 3) q4_tile(3, xq, xd, xs, Q, S, Z, Y, m, n, N, K);
        if (M - m == 2) q4_tile(2, xq, xd, xs, Q, S, Z, Y, m, n, N, K);
        if (M - m == 1) q4_tile(1, xq, xd, xs, Q, S, Z, Y, m, n, N, K);
    }
    free(xq);
    free(xd);
    free(xs);
}

// ---- int8 linear: Y[M, N] = X[M, K] @ W[N, K]^T with W[n, k] = Q[n, k] * S[n] (one scale
// per output, as PyTorch's int8 operator takes); K a multiple of 8.
static inline __m256 q8_load(const int8_t* q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q)));
}

static inline __attribute__((always_inline)) void q8_tile(
    const int G, const float* X, const int8_t* Q, const float* S, float* Y, int64_t m0,
    int64_t n, int64_t N, int64_t K) {
    const int8_t* q = Q + n * K;
    __m256 even[3], odd[3];
    for (int g = 0; g < G; g++) even[g] = odd[g] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256 w0 = q8_load(q + k), w1 = q8_load(q + k + 8);
        for (int g = 0; g < G; g++) {
            const float* x = X + (m0 + g) * K + k;
            even[g] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), even[g]);
            odd[g] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), odd[g]);
        }
    }
    if (k < K) {
        const __m256 w0 = q8_load(q + k);
        for (int g = 0; g < G; g++)
            even[g] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + (m0 + g) * K + k), even[g]);
    }
    for (int g = 0; g < G; g++) Y[(m0 + g) * N + n] = hsum(_mm256_add_ps(even[g], odd[g])) * S[n];
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
