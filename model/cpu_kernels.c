// float32 kernels for decoding and verification steps on x86 CPUs with AVX2 and FMA (and
// AVX-512 where the library is built for it; model/cpu_kernels.py says why): the
// linear layers, float32, int4 and int8, and the small operations between them, each of
// which costs more in PyTorch's dispatch than in arithmetic at a few rows. Every result a row gets is computed in the same order whatever else the step
// holds and however many threads run, so a row gets bit-identical results alone or in a
// verification step of several rows.
//
// Each operation is a body whose loops are orphaned `omp for`s: the threads of the
// enclosing parallel region share them, and each ends on a barrier. So a whole decoder
// layer is one call and one parallel region (mtpd_decoder_layer_f32, at the end). The
// other mtpd_* entry points run one body: in a region of their own where a body has
// work for several threads, on the calling thread alone for RMSNorm and SwiGLU.

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

#ifdef __AVX512F__
// The two halves of v added: eight lanes.
static inline __m256 fold512(__m512 v) {
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return _mm256_add_ps(_mm512_castps512_ps256(v), high);
}

// An int4 or int8 tile's accumulators for one row in eight lanes: its two alternating
// 16-lane sums, then its 8-lane last step.
static inline __m256 row_sum(__m512 even, __m512 odd, __m256 last) {
    return _mm256_add_ps(fold512(_mm512_add_ps(even, odd)), last);
}
#endif

// ---- A linear layer's weight, as the Python side describes it (cpu_kernels.Matrix).
enum { MTPD_F32 = 0, MTPD_Q4 = 1, MTPD_Q8 = 2 };

typedef struct {
    int64_t kind, n, k;  // Y[M, n] = X[M, k] @ W^T
    const void* q;       // F32: W [n, k]; Q4: nibbles [n, k / 2]; Q8: int8 [n, k]
    const float* s;      // Q4: scale per group of 32 [n, k / 32]; Q8: per output [n]
    const float* z;      // Q4: minimum per group [n, k / 32]
    const float* bias;   // [n] or NULL
} mtpd_matrix;

// Where a product's outputs go: Y[m, n] = R[m, n] + (dot + bias[n]), the residual R
// optional and possibly Y itself (each output is read and written by one thread): the
// same float additions, in the same order, as PyTorch's `x + (x W^T + b)`.
typedef struct {
    float* y;
    const float* bias;
    const float* residual;
    int64_t n;
} out_t;

static inline void store(const out_t* o, int64_t m, int64_t n, float v) {
    if (o->bias) v += o->bias[n];
    if (o->residual) v = o->residual[m * o->n + n] + v;
    o->y[m * o->n + n] = v;
}

// ---- float32 linear, K a multiple of 8. Threads split the output columns: each reads
// its own weight rows once, from memory, and multiplies them with every input row while
// they sit in L1. Every output is one dot product summed in the same order whatever M
// and the thread count are.

// R weight rows from n0 against G input rows from m0: R * G accumulators, R + G loads
// per 8 columns (16 with AVX-512). Called with constant R and G, so the loops unroll
// into registers: G is at most TILE_ROWS, as many input rows as the registers hold
// beside 4 * TILE_ROWS accumulators (16 registers with AVX2, 32 with AVX-512). From
// three input rows on, a tile's arithmetic outlasts the hardware prefetcher's lead, so
// it fetches the next R rows' weights itself: a 5-row pass over every float32 weight of
// SmolLM2 went from 1.5-1.7x a 1-row pass to 1.3x (session 10).
#ifdef __AVX512F__
#define TILE_ROWS 6
#define TAIL_TILES(TILE) \
    case 5: TILE(5); break; \
    case 4: TILE(4); break; \
    case 3: TILE(3); break;
#else
#define TILE_ROWS 3
#define TAIL_TILES(TILE)
#endif

// TILE(G) over all M input rows, TILE_ROWS at a time, the rows from m (a variable
// TILE's expansion uses): a constant G in each call, so that every tile unrolls into
// registers. Each kernel's loop over its weight rows runs this.
#define FOR_ROW_TILES(M, TILE)                                        \
    do {                                                              \
        int64_t m = 0;                                                \
        for (; m + TILE_ROWS <= (M); m += TILE_ROWS) TILE(TILE_ROWS); \
        switch ((M) - m) {                                            \
            TAIL_TILES(TILE)                                          \
            case 2: TILE(2); break;                                   \
            case 1: TILE(1); break;                                   \
        }                                                             \
    } while (0)
#ifdef __AVX512F__
static inline __attribute__((always_inline)) void tile(
    const int R, const int G, const float* X, const float* W, const out_t* o, int64_t m0,
    int64_t n0, int64_t K) {
    __m512 acc[TILE_ROWS][4];
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++) acc[g][r] = _mm512_setzero_ps();
    const float* w = W + n0 * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv[TILE_ROWS];
        for (int g = 0; g < G; g++) xv[g] = _mm512_loadu_ps(X + (m0 + g) * K + k);
        for (int r = 0; r < R; r++) {
            if (G >= 3) _mm_prefetch((const char*)(w + (R + r) * K + k), _MM_HINT_T0);
            const __m512 wv = _mm512_loadu_ps(w + r * K + k);
            for (int g = 0; g < G; g++) acc[g][r] = _mm512_fmadd_ps(wv, xv[g], acc[g][r]);
        }
    }
    if (k < K) {  // the last 8 (K is a multiple of 8), the other lanes zero
        __m512 xv[TILE_ROWS];
        for (int g = 0; g < G; g++) xv[g] = _mm512_maskz_loadu_ps(0x00FF, X + (m0 + g) * K + k);
        for (int r = 0; r < R; r++) {
            const __m512 wv = _mm512_maskz_loadu_ps(0x00FF, w + r * K + k);
            for (int g = 0; g < G; g++) acc[g][r] = _mm512_fmadd_ps(wv, xv[g], acc[g][r]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++) store(o, m0 + g, n0 + r, hsum(fold512(acc[g][r])));
}
#else
static inline __attribute__((always_inline)) void tile(
    const int R, const int G, const float* X, const float* W, const out_t* o, int64_t m0,
    int64_t n0, int64_t K) {
    __m256 acc[TILE_ROWS][4];
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++) acc[g][r] = _mm256_setzero_ps();
    const float* w = W + n0 * K;
    for (int64_t k = 0; k < K; k += 8) {
        __m256 xv[TILE_ROWS];
        for (int g = 0; g < G; g++) xv[g] = _mm256_loadu_ps(X + (m0 + g) * K + k);
        for (int r = 0; r < R; r++) {
            if (G >= 3) _mm_prefetch((const char*)(w + (R + r) * K + k), _MM_HINT_T0);
            __m256 wv = _mm256_loadu_ps(w + r * K + k);
            for (int g = 0; g < G; g++) acc[g][r] = _mm256_fmadd_ps(wv, xv[g], acc[g][r]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++) store(o, m0 + g, n0 + r, hsum(acc[g][r]));
}

#endif

// All input rows against R weight rows from n0.
static inline __attribute__((always_inline)) void rows(
    const int R, const float* X, const float* W, const out_t* o, int64_t n0, int64_t M,
    int64_t K) {
#define F32_TILE(G) tile(R, G, X, W, o, m, n0, K)
    FOR_ROW_TILES(M, F32_TILE);
#undef F32_TILE
}

static void linear_f32(const float* X, const float* W, const out_t* o, int64_t M, int64_t K) {
    const int64_t N = o->n, blocks = N / 4;
#pragma omp single nowait
    for (int64_t n = 4 * blocks; n < N; n++) rows(1, X, W, o, n, M, K);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) rows(4, X, W, o, 4 * b, M, K);
}

// ---- int4 linear: W in groups of 32 inputs, W[n, 32 b + j] = q * S[n, b] + Z[n, b], q in
// 0..15 (GGUF's Q4_1 form). Q[n] holds a group in 16 bytes, byte j carrying q of input j
// in its low nibble and of input j + 16 in its high one, as GGUF stores them. As
// llama.cpp does, each group of X's inputs is rounded to 8 bits with its own scale (XQ,
// XD) once per product, so a group's product is one integer multiply-add of 32 byte
// pairs (maddubs) instead of converting every weight to a float. Z's share is Z[n] .
// XS[m], XS the rounded groups' sums: every weight then multiplies the same rounded
// input (summing the exact inputs instead would leave the rounding of the nibbles'
// common offset uncancelled, several times the error). K is a multiple of 32.
//
// The int4 and int8 kernels keep two accumulators per input row, taking alternate
// steps: one would chain every step's FMA on the last one's result, and at one row that
// latency, not memory or arithmetic, sets the speed. Summed in a fixed order, so
// results stay reproducible.
static inline __m256 q4_group(__m256i w, const int8_t* xq, const float* xd, __m256 scale) {
    const __m256i x = _mm256_loadu_si256((const __m256i*)xq);
    const __m256i pairs = _mm256_maddubs_epi16(w, x);  // |15 * 127 * 2| fits int16
    const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    return _mm256_mul_ps(_mm256_mul_ps(dots, _mm256_loadu_ps(xd)), scale);
}

static inline __m256i q4_unpack(const uint8_t* q) {
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q), low = _mm_set1_epi8(0x0F);
    const __m256i lo = _mm256_castsi128_si256(_mm_and_si128(bytes, low));
    return _mm256_inserti128_si256(lo, _mm_and_si128(_mm_srli_epi16(bytes, 4), low), 1);
}

// A row's result from its groups' products, summed in `products`, plus Z's share.
static inline float q4_total(__m256 products, const float* z, const float* xs, int64_t groups) {
    int64_t i = 0;
    __m256 zero_part = _mm256_setzero_ps();
    for (; i + 8 <= groups; i += 8)
        zero_part = _mm256_fmadd_ps(_mm256_loadu_ps(z + i), _mm256_loadu_ps(xs + i), zero_part);
    float total = hsum(_mm256_add_ps(products, zero_part));
    for (; i < groups; i++) total += z[i] * xs[i];
    return total;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// Where the CPU has AVX-512 with VNNI (cpu_kernels.py then builds for it), two groups b
// and c = b + 1 at a time: their 64 byte pairs in one dpbusd. A pair's 32 bytes of
// nibbles, loaded into both halves of a register, give [b's inputs 0-15, c's 0-15] as
// low nibbles and [b's 16-31, c's 16-31] as high ones; q8_pair puts the rounded inputs
// in that order, so the int32 lanes hold b, c, b, c four at a time, and the scales too.
#define MTPD_Q4_PAIRS 1

static inline __m512i q4_unpack_pair(const uint8_t* q) {
    const __m512i bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)q));
    const __m512i high = _mm512_mask_srli_epi16(bytes, 0xFFFF0000, bytes, 4);
    return _mm512_and_si512(high, _mm512_set1_epi8(0x0F));
}

// [v[0] x4, v[1] x4, v[0] x4, v[1] x4]: a pair's scales in its lanes' order.
static inline __m512 q4_pair_of(const float* v) {
    const __m512i index = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m128 two = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)v));
    return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(two));
}

// xd: the pair's input scales in its lanes' order (q8_pair).
static inline __m512 q4_pair(__m512i w, const int8_t* xq, const float* xd, __m512 scales,
                             __m512 acc) {
    const __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xq));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(_mm512_loadu_ps(xd), scales), acc);
}

// Two rounded groups, each in input order with its scale 8 times, into the pair's order.
static inline void q8_pair(int8_t* xq, float* xd) {
    const __m512i q = _mm512_loadu_si512(xq);
    _mm512_storeu_si512(xq, _mm512_shuffle_i64x2(q, q, _MM_SHUFFLE(3, 1, 2, 0)));
    const __m512 d = _mm512_loadu_ps(xd);
    _mm512_storeu_ps(xd, _mm512_shuffle_f32x4(d, d, _MM_SHUFFLE(3, 1, 2, 0)));
}

static inline __attribute__((always_inline)) void q4_tile(
    const int G, const int8_t* XQ, const float* XD, const float* XS, const uint8_t* Q,
    const float* S, const float* Z, const out_t* o, int64_t m0, int64_t n, int64_t K) {
    const int64_t groups = K / 32;
    const uint8_t* q = Q + n * (K / 2);
    const float* s = S + n * groups;
    __m512 even[TILE_ROWS], odd[TILE_ROWS];
    __m256 last[TILE_ROWS];
    for (int g = 0; g < G; g++) {
        even[g] = odd[g] = _mm512_setzero_ps();
        last[g] = _mm256_setzero_ps();
    }
    int64_t b = 0;
    for (; b + 4 <= groups; b += 4) {
        const __m512i w0 = q4_unpack_pair(q + 16 * b), w1 = q4_unpack_pair(q + 16 * (b + 2));
        const __m512 s0 = q4_pair_of(s + b), s1 = q4_pair_of(s + b + 2);
        for (int g = 0; g < G; g++) {
            const int64_t xg = (m0 + g) * groups + b;
            even[g] = q4_pair(w0, XQ + 32 * xg, XD + 8 * xg, s0, even[g]);
            odd[g] = q4_pair(w1, XQ + 32 * (xg + 2), XD + 8 * (xg + 2), s1, odd[g]);
        }
    }
    if (b + 2 <= groups) {
        const __m512i w0 = q4_unpack_pair(q + 16 * b);
        const __m512 s0 = q4_pair_of(s + b);
        for (int g = 0; g < G; g++) {
            const int64_t xg = (m0 + g) * groups + b;
            even[g] = q4_pair(w0, XQ + 32 * xg, XD + 8 * xg, s0, even[g]);
        }
        b += 2;
    }
    if (b < groups) {
        const __m256i w0 = q4_unpack(q + 16 * b);
        const __m256 s0 = _mm256_broadcast_ss(s + b);
        for (int g = 0; g < G; g++) {
            const int64_t xg = (m0 + g) * groups + b;
            last[g] = q4_group(w0, XQ + 32 * xg, XD + 8 * xg, s0);
        }
    }
    for (int g = 0; g < G; g++) {
        const __m256 products = row_sum(even[g], odd[g], last[g]);
        store(o, m0 + g, n, q4_total(products, Z + n * groups, XS + (m0 + g) * groups, groups));
    }
}
#else
static inline __attribute__((always_inline)) void q4_tile(
    const int G, const int8_t* XQ, const float* XD, const float* XS, const uint8_t* Q,
    const float* S, const float* Z, const out_t* o, int64_t m0, int64_t n, int64_t K) {
    const int64_t groups = K / 32;
    const uint8_t* q = Q + n * (K / 2);
    const float* s = S + n * groups;
    __m256 even[TILE_ROWS], odd[TILE_ROWS];
    for (int g = 0; g < G; g++) even[g] = odd[g] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= groups; b += 2) {
        const __m256i w0 = q4_unpack(q + 16 * b), w1 = q4_unpack(q + 16 * (b + 1));
        const __m256 s0 = _mm256_broadcast_ss(s + b), s1 = _mm256_broadcast_ss(s + b + 1);
        for (int g = 0; g < G; g++) {
            const int64_t xg = (m0 + g) * groups + b;
            even[g] = _mm256_add_ps(even[g], q4_group(w0, XQ + 32 * xg, XD + 8 * xg, s0));
            odd[g] = _mm256_add_ps(odd[g], q4_group(w1, XQ + 32 * (xg + 1), XD + 8 * (xg + 1), s1));
        }
    }
    if (b < groups) {
        const __m256i w0 = q4_unpack(q + 16 * b);
        const __m256 s0 = _mm256_broadcast_ss(s + b);
        for (int g = 0; g < G; g++) {
            const int64_t xg = (m0 + g) * groups + b;
            even[g] = _mm256_add_ps(even[g], q4_group(w0, XQ + 32 * xg, XD + 8 * xg, s0));
        }
    }
    for (int g = 0; g < G; g++)
        store(o, m0 + g, n,
              q4_total(_mm256_add_ps(even[g], odd[g]), Z + n * groups, XS + (m0 + g) * groups, groups));
}
#endif

// One group of 32 inputs: 8-bit values xq with scale xd (max |x| / 127, rounded to
// nearest; 8 copies, for the products' vector multiplies), and the sum of the rounded
// values (xq * xd) in xs. A group holding a NaN or
// an infinity gets a NaN scale, so the outputs it reaches are NaN, as a float product's
// would be; a group too small for its scale to invert counts as zero.
static void q8_group(const float* x, int8_t* xq, float* xd, float* xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f), huge = _mm256_set1_ps(FLT_MAX);
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
        for (int j = 0; j < 32; j++) xq[j] = 0;
        _mm256_storeu_ps(xd, _mm256_set1_ps(NAN));
        *xs = NAN;
        return;
    }
    const __m256 inv = _mm256_set1_ps(inverse);
    __m256i q[4];
    for (int j = 0; j < 4; j++)
        q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // int32 -> int8 in input order: packs interleave 128-bit lanes, the permute undoes it.
    const __m256i w16a = _mm256_packs_epi32(q[0], q[1]), w16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i w8 = _mm256_packs_epi16(w16a, w16b);
    _mm256_storeu_si256((__m256i*)xq,
                        _mm256_permutevar8x32_epi32(w8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    _mm256_storeu_ps(xd, _mm256_set1_ps(d));
    const __m256i sums = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    *xs = hsum(_mm256_cvtepi32_ps(sums)) * d;
}

// Rounded inputs for int4 products: 32 bytes and 9 floats for each of the count input
// groups (M * K / 32) of the widest int4 product.
typedef struct {
    int8_t* xq;
    float *xd, *xs;
} q8_inputs;

// X's rows [M, K] rounded into `in`, each row's groups two at a time (a pair's order
// where the products take pairs, a last odd group in input order).
static void q8_rows(const float* X, int64_t M, int64_t K, const q8_inputs* in) {
    const int64_t groups = K / 32, units = (groups + 1) / 2;
#pragma omp for schedule(static)
    for (int64_t u = 0; u < M * units; u++) {
        const int64_t m = u / units, b = m * groups + 2 * (u % units);
        const int64_t end = b + 2 < (m + 1) * groups ? b + 2 : (m + 1) * groups;
        for (int64_t i = b; i < end; i++)
            q8_group(X + 32 * i, in->xq + 32 * i, in->xd + 8 * i, in->xs + i);
#ifdef MTPD_Q4_PAIRS
        if (end - b == 2) q8_pair(in->xq + 32 * b, in->xd + 8 * b);
#endif
    }
}

static void linear_q4(const float* X, const mtpd_matrix* w, const out_t* o, int64_t M,
                      const q8_inputs* in) {
    const int64_t K = w->k;
    q8_rows(X, M, K, in);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < o->n; n++) {
#define Q4_TILE(G) q4_tile(G, in->xq, in->xd, in->xs, w->q, w->s, w->z, o, m, n, K)
        FOR_ROW_TILES(M, Q4_TILE);
#undef Q4_TILE
    }
}

// ---- int8 linear: W[n, k] = Q[n, k] * S[n] (one scale per output, as PyTorch's int8
// operator takes); K a multiple of 8.
static inline __m256 q8_load(const int8_t* q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q)));
}

#ifdef __AVX512F__
static inline __m512 q8_load16(const int8_t* q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q)));
}

static inline __attribute__((always_inline)) void q8_tile(
    const int G, const float* X, const int8_t* Q, const float* S, const out_t* o, int64_t m0,
    int64_t n, int64_t K) {
    const int8_t* q = Q + n * K;
    __m512 even[TILE_ROWS], odd[TILE_ROWS];
    __m256 last[TILE_ROWS];
    for (int g = 0; g < G; g++) {
        even[g] = odd[g] = _mm512_setzero_ps();
        last[g] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 w0 = q8_load16(q + k), w1 = q8_load16(q + k + 16);
        for (int g = 0; g < G; g++) {
            const float* x = X + (m0 + g) * K + k;
            even[g] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), even[g]);
            odd[g] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), odd[g]);
        }
    }
    if (k + 16 <= K) {
        const __m512 w0 = q8_load16(q + k);
        for (int g = 0; g < G; g++)
            even[g] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(X + (m0 + g) * K + k), even[g]);
        k += 16;
    }
    if (k < K) {
        const __m256 w0 = q8_load(q + k);
        for (int g = 0; g < G; g++) last[g] = _mm256_mul_ps(w0, _mm256_loadu_ps(X + (m0 + g) * K + k));
    }
    for (int g = 0; g < G; g++)
        store(o, m0 + g, n, hsum(row_sum(even[g], odd[g], last[g])) * S[n]);
}
#else
static inline __attribute__((always_inline)) void q8_tile(
    const int G, const float* X, const int8_t* Q, const float* S, const out_t* o, int64_t m0,
    int64_t n, int64_t K) {
    const int8_t* q = Q + n * K;
    __m256 even[TILE_ROWS], odd[TILE_ROWS];
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
    for (int g = 0; g < G; g++) store(o, m0 + g, n, hsum(_mm256_add_ps(even[g], odd[g])) * S[n]);
}

#endif

static void linear_q8(const float* X, const mtpd_matrix* w, const out_t* o, int64_t M) {
    const int64_t K = w->k;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < o->n; n++) {
#define Q8_TILE(G) q8_tile(G, X, w->q, w->s, o, m, n, K)
        FOR_ROW_TILES(M, Q8_TILE);
#undef Q8_TILE
    }
}

// Y[M, w.n] = R + (X @ W^T + bias), R optional.
static void product(const mtpd_matrix* w, const float* X, float* Y, const float* R, int64_t M,
                    const q8_inputs* in) {
    const out_t o = {Y, w->bias, R, w->n};
    if (w->kind == MTPD_Q4)
        linear_q4(X, w, &o, M, in);
    else if (w->kind == MTPD_Q8)
        linear_q8(X, w, &o, M);
    else
        linear_f32(X, w->q, &o, M, w->k);
}

static int alloc_q8_inputs(q8_inputs* in, int64_t count) {
    in->xq = malloc(32 * count + 1);
    in->xd = malloc(sizeof(float) * 8 * count + 1);
    in->xs = malloc(sizeof(float) * count + 1);
    return in->xq && in->xd && in->xs;
}

static void free_q8_inputs(q8_inputs* in) {
    free(in->xq);
    free(in->xd);
    free(in->xs);
}

// Returns 0, or -1 where memory for the rounded inputs could not be had.
int mtpd_linear(const mtpd_matrix* w, const float* X, float* Y, int64_t M, int threads) {
    q8_inputs in = {0};
    const int ok = w->kind != MTPD_Q4 || alloc_q8_inputs(&in, M * w->k / 32);
    if (ok) {
#pragma omp parallel num_threads(threads)
        product(w, X, Y, NULL, M, &in);
    }
    free_q8_inputs(&in);
    return ok ? 0 : -1;
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
static void rms_norm(const float* X, const float* W, float* Y, int64_t M, int64_t H, float eps) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float* x = X + m * H;
        const float r = 1.0f / sqrtf(dot(x, x, H) / (float)H + eps);
        for (int64_t i = 0; i < H; i++) Y[m * H + i] = x[i] * r * W[i];
    }
}

void mtpd_rms_norm_f32(const float* X, const float* W, float* Y, int64_t M, int64_t H,
                       float eps) {
    rms_norm(X, W, Y, M, H, eps);  // a few rows: one thread
}

// ---- SwiGLU: Y[m, i] = silu(G[m, i]) * U[m, i], gate and up side by side in GU[m].
static void silu_mul(const float* GU, float* Y, int64_t M, int64_t I) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float* g = GU + m * 2 * I;
        float* y = Y + m * I;
        for (int64_t i = 0; i < I; i++) y[i] = -g[i];
        exp_all(y, I);
        for (int64_t i = 0; i < I; i++) y[i] = g[i] / (1.0f + y[i]) * g[I + i];
    }
}

void mtpd_silu_mul_f32(const float* GU, float* Y, int64_t M, int64_t I) {
    silu_mul(GU, Y, M, I);
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

typedef struct {
    int64_t heads, kv_heads, d;
    float scale;
} heads_t;

// Returns 0, or -1 where a row's scores could not be allocated (its output is then 0).
static int attend(const heads_t* a, const float* QKV, const float* COS, const float* SIN_SIGNED,
                  float* KC, float* VC, float* OUT, int64_t T, int64_t start, int64_t context) {
    const int64_t heads = a->heads, kv_heads = a->kv_heads, d = a->d;
    const int64_t width = (heads + 2 * kv_heads) * d, group = heads / kv_heads;
    int failed = 0;  // this thread's: the caller's region combines them
#pragma omp for schedule(static)
    for (int64_t task = 0; task < T * kv_heads; task++) {
        const int64_t t = task / kv_heads, g = task % kv_heads;
        const float* row = QKV + t * width;
        const int64_t at = (g * context + start + t) * d;
        rope(row + (heads + g) * d, COS + t * d, SIN_SIGNED + t * d, KC + at, d);
        for (int64_t i = 0; i < d; i++) VC[at + i] = row[(heads + kv_heads + g) * d + i];
    }
#pragma omp for schedule(static)
    for (int64_t task = 0; task < T * heads; task++) {
        const int64_t t = task / heads, h = task % heads, keys = start + t + 1;
        const float* k = KC + h / group * context * d;
        const float* v = VC + h / group * context * d;
        float* o = OUT + t * heads * d + h * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        float q[256];
        rope(QKV + t * width + h * d, COS + t * d, SIN_SIGNED + t * d, q, d);
        float* p = malloc(sizeof(float) * keys);
        if (!p) {
            failed = 1;
            continue;
        }
        float top = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < keys; j++) {
            p[j] = dot(q, k + j * d, d) * a->scale;
            top = p[j] > top ? p[j] : top;
        }
        for (int64_t j = 0; j < keys; j++) p[j] -= top;
        exp_all(p, keys);
        for (int64_t j = 0; j < keys; j++) total += p[j];
        for (int64_t j = 0; j < keys; j++) {
            const float w = p[j] / total;
            for (int64_t i = 0; i < d; i++) o[i] += w * v[j * d + i];
        }
        free(p);
    }
    return failed ? -1 : 0;
}

int mtpd_attend_f32(const float* QKV, const float* COS, const float* SIN_SIGNED, float* KC,
                    float* VC, float* OUT, int64_t T, int64_t start, int64_t heads,
                    int64_t kv_heads, int64_t d, int64_t max_context, float scale, int threads) {
    const heads_t a = {heads, kv_heads, d, scale};
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    failed |= attend(&a, QKV, COS, SIN_SIGNED, KC, VC, OUT, T, start, max_context) != 0;
    return failed ? -1 : 0;
}

// ---- A whole pre-norm decoder layer (layers.DecoderLayer with Attention and MLP):
// Y = X + o(attention(qkv(norm(X)))), then Y += down(silu_mul(gate_up(norm(Y)))).
typedef struct {
    const float *input_norm, *post_norm;
    mtpd_matrix qkv, o, gate_up, down;
    heads_t attention;
    float eps;
} mtpd_layer;

// A step's rows: sequence i has counts[i] rows from row offset sum(counts[:i]), at cache
// positions starts[i].., in slot slots[i] of the caches K and V [layers, slots_per_layer,
// kv_heads, max_context, d]; COS and SIN_SIGNED [rows, d] at those positions.
typedef struct {
    int64_t rows, sequences;
    const int64_t *slots, *starts, *counts;
    const float *cos, *sin_signed;
    float *k, *v;
    int64_t slots_per_layer, max_context;
} mtpd_step;

// Layer `layer` of the step's caches on rows X, into Y (not X). Returns 0, or -1 where
// memory for the layer's intermediate rows could not be had.
int mtpd_decoder_layer_f32(const mtpd_layer* L, const mtpd_step* S, int64_t layer,
                           const float* X, float* Y, int threads) {
    const int64_t M = S->rows, H = L->o.n, d = L->attention.d, I = L->gate_up.n / 2;
    const int64_t slot_size = L->attention.kv_heads * S->max_context * d;
    float* const KC = S->k + layer * S->slots_per_layer * slot_size;
    float* const VC = S->v + layer * S->slots_per_layer * slot_size;
    const mtpd_matrix* const products[4] = {&L->qkv, &L->o, &L->gate_up, &L->down};
    int64_t widest = 0;  // of the int4 products' inputs, which are rounded to 8 bits
    for (int i = 0; i < 4; i++)
        if (products[i]->kind == MTPD_Q4 && products[i]->k > widest) widest = products[i]->k;
    // Every intermediate row in one allocation (+ 1: a step may have no rows).
    float* const buffer = malloc(sizeof(float) * (M * (H + L->qkv.n + L->o.k + 3 * I) + 1));
    q8_inputs in = {0};
    int failed = !buffer || (widest && !alloc_q8_inputs(&in, M * widest / 32));
    if (!failed) {
        float* const normed = buffer;
        float* const qkv = normed + M * H;
        float* const attended = qkv + M * L->qkv.n;
        float* const gate_up = attended + M * L->o.k;
        float* const act = gate_up + M * 2 * I;
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            rms_norm(X, L->input_norm, normed, M, H, L->eps);
            product(&L->qkv, normed, qkv, NULL, M, &in);
            int64_t row = 0;
            for (int64_t i = 0; i < S->sequences; i++) {
                const int64_t at = S->slots[i] * slot_size, c = row * d;
                failed |= attend(&L->attention, qkv + row * L->qkv.n, S->cos + c,
                                 S->sin_signed + c, KC + at, VC + at, attended + row * L->o.k,
                                 S->counts[i], S->starts[i], S->max_context) != 0;
                row += S->counts[i];
            }
            product(&L->o, attended, Y, X, M, &in);
            rms_norm(Y, L->post_norm, normed, M, H, L->eps);
            product(&L->gate_up, normed, gate_up, NULL, M, &in);
            silu_mul(gate_up, act, M, I);
            product(&L->down, act, Y, Y, M, &in);
        }
    }
    free(buffer);
    free_q8_inputs(&in);
    return failed ? -1 : 0;
}
