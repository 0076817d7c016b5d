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
#include <string.h>
#include <time.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

// The largest of t's four lanes, and of v's eight.
static inline float hmax4(__m128 t) {
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}

static inline float hmax(__m256 v) {
    return hmax4(_mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

#ifdef __AVX512F__
// The two halves of v added: eight lanes.
static inline __m256 fold512(__m512 v) {
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return _mm256_add_ps(_mm512_castps512_ps256(v), high);
}
#endif

// ---- A linear layer's weight, as the Python side describes it (cpu_kernels.Matrix).
enum { MTPD_F32 = 0, MTPD_Q4 = 1, MTPD_Q8 = 2 };

typedef struct {
    int64_t kind, n, k;  // Y[M, n] = X[M, k] @ W^T
    const void* q;       // F32: W [n, k]; Q4, Q8: panels (linear_q4, linear_q8)
    const float* s;      // Q8: scale per output [n]
    const float* bias;   // [n] or NULL
    // [n] or NULL: W's row j is Y's column order[j] (a permutation, checked in Python).
    // An LM head stored with the draft vocabulary's rows first, so that an MTP head's
    // draft pass reads them as its own leading rows (cpu_kernels.Matrix.leading).
    const int32_t* order;
} mtpd_matrix;

// Where a product's outputs go: Y[m, order[n]] = R[m, n] + (dot + bias[n]), the residual R
// optional and possibly Y itself (each output is read and written by one thread): the
// same float additions, in the same order, as PyTorch's `x + (x W^T + b)`. A matrix with
// an order has no residual.
typedef struct {
    float* y;
    const float* bias;
    const float* residual;
    int64_t n;
    const int32_t* order;
} out_t;

static inline void store(const out_t* o, int64_t m, int64_t n, float v) {
    if (o->bias) v += o->bias[n];
    if (o->residual) v = o->residual[m * o->n + n] + v;
    o->y[m * o->n + (o->order ? o->order[n] : n)] = v;
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

// TILE(G) over all M input rows, ROWS at a time (TAILS the cases of the rest from 3 up),
// the rows from m (a variable TILE's expansion uses): a constant G in each call, so that
// every tile unrolls into registers. Each kernel's loop over its weight rows runs this.
#define FOR_TILES_OF(M, ROWS, TAILS, TILE)                \
    do {                                                  \
        int64_t m = 0;                                    \
        for (; m + (ROWS) <= (M); m += (ROWS)) TILE(ROWS); \
        switch ((M) - m) {                                \
            TAILS(TILE)                                   \
            case 2: TILE(2); break;                       \
            case 1: TILE(1); break;                       \
        }                                                 \
    } while (0)
#define FOR_ROW_TILES(M, TILE) FOR_TILES_OF(M, TILE_ROWS, TAIL_TILES, TILE)
// The bytes PREFETCH_AHEAD on from `at`, for a kernel that streams one contiguous run (a
// thread's weight panels, a head's keys or values): the hardware's prefetcher alone kept
// a 1-row int4 step at 16-18 GB/s of the ~24 this machine's memory gives (whole model,
// in one process: 6.1 -> 4.8 ms; 2 KB ahead, or into L1, gained half of that; a Xeon
// with AVX-512). Into L2 there. The AVX2 build's hint is non-temporal, measured on a
// Zen 1 EPYC: a step's 95 MB of weights then stop flushing its 8 MB L3, and what the
// next step touches first stays (the worker's Python between two steps took 0.73-0.98
// ms instead of 1.14-1.20; a one-row decode step ran 0.93-0.98x as long, 8 streams'
// 0.95-1.05x, in blocks of steps of each: benchmarks/stage_ab.py, session 31).
#define PREFETCH_AHEAD 8192
#ifdef __AVX512F__
#define PREFETCH_HINT _MM_HINT_T1
#else
#define PREFETCH_HINT _MM_HINT_NTA
#endif
static inline __attribute__((always_inline)) void prefetch_ahead(const void* at, int64_t bytes) {
    for (int64_t l = 0; l < bytes; l += 64)
        _mm_prefetch((const char*)at + PREFETCH_AHEAD + l, PREFETCH_HINT);
}

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

// Rounded inputs for int4 and int8 products: for each of the count input groups (M * K /
// 32) of the widest such product, 32 bytes, their scale, the rounded values' sum (int4's
// minimums multiply it) and the bytes' integer sum (int8's unsigned weights need it).
typedef struct {
    int8_t* xq;
    float *xd, *xs;
    int32_t* xn;
} q8_inputs;

// ---- int4 linear: W in groups of 32 inputs, W[n, 32 b + j] = q * S[n, b] + Z[n, b], q in
// 0..15 (GGUF's Q4_1 form). As llama.cpp does, each group of X's inputs is rounded to 8
// bits with its own scale (q8_inputs' xq, xd) once per product, so a group's product is
// integer multiply-adds of byte pairs instead of a float conversion of every weight. Z's
// share is Z[n] . xs[m], xs the rounded groups' sums: every weight then multiplies the same
// rounded input (summing the exact inputs instead would leave the rounding of the
// nibbles' common offset uncancelled, several times the error). K is a multiple of 32.
//
// The weight comes in panels of 16 outputs (cpu_kernels.Matrix.q4 packs them), one
// stream of Q4_GROUP_BYTES per group: 4 chunks of 64 bytes of nibbles, then the group's
// S and Z for the panel's 16 outputs as float16 (GGUF's Q4_1 precision: 20 bytes per 32
// weights, where float32 took 24, and decoding reads every byte). Byte 4 i + t of chunk c holds, for the panel's
// output i, q of input 4 c + t in its low nibble and of input 16 + 4 c + t in its high
// one. A chunk's low (or high) nibbles are thus 16 outputs x 4 consecutive inputs, and
// one dpbusd (maddubs on AVX2) against those 4 inputs, broadcast, adds each output's
// share in its own lane: an input row costs 8 integer multiply-adds and 4 float
// operations per group of 16 outputs, and no horizontal sums, so a verification step's
// extra rows ride on the weight stream nearly free. An output's sum runs group by group
// in the same order in every build, alone or beside other rows.
#define PANEL 16
#define Q4_GROUP_BYTES 320

// A panel's outputs for row m from n0, 16 (or 8) of them: as `store` does each.
#ifdef __AVX512F__
static inline void store16(const out_t* o, int64_t m, int64_t n0, __m512 v) {
    const int64_t at = m * o->n + n0;
    if (o->bias) v = _mm512_add_ps(v, _mm512_loadu_ps(o->bias + n0));
    if (o->residual) v = _mm512_add_ps(_mm512_loadu_ps(o->residual + at), v);
    if (o->order)
        _mm512_i32scatter_ps(o->y + m * o->n, _mm512_loadu_si512(o->order + n0), v, 4);
    else
        _mm512_storeu_ps(o->y + at, v);
}
#endif

static inline void store8(const out_t* o, int64_t m, int64_t n0, __m256 v) {
    const int64_t at = m * o->n + n0;
    if (o->bias) v = _mm256_add_ps(v, _mm256_loadu_ps(o->bias + n0));
    if (o->residual) v = _mm256_add_ps(_mm256_loadu_ps(o->residual + at), v);
    if (o->order) {  // AVX2 has no scatter
        float lanes[8];
        _mm256_storeu_ps(lanes, v);
        for (int i = 0; i < 8; i++) o->y[m * o->n + o->order[n0 + i]] = lanes[i];
    } else {
        _mm256_storeu_ps(o->y + at, v);
    }
}

static inline __m256i quad8(const int8_t* x) {
    int32_t v;
    memcpy(&v, x, 4);
    return _mm256_set1_epi32(v);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// The int4 and int8 tiles take 8 rows: 2 x 8 accumulators and the weights in registers.
// Eight streams' step then unpacks each weight once instead of in a 6-row and a 2-row
// tile: 5% off an 8-row int4 step (benchmarks/kernel_ab.py, session 24).
#define Q_TILE_ROWS 8
#define Q_TAIL_TILES(TILE) \
    case 7: TILE(7); break; \
    case 6: TILE(6); break; \
    TAIL_TILES(TILE)

// dpbusd(acc, a, the 4 bytes at x in every lane), the broadcast folded into the
// instruction's memory operand ({1to16}, which GCC does not fold from the intrinsics):
// one fused operation instead of two, and a 2-row int4 step, whose tiles issue a
// broadcast beside each dpbusd, ran 4-5% faster (benchmarks/kernel_ab.py, session 29).
typedef int32_t __attribute__((may_alias)) int32_alias;  // 4 of the int8 inputs, read as one

static inline __attribute__((always_inline)) __m512i dpbusd_quad(__m512i acc, __m512i a,
                                                                 const int8_t* x) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*(const int32_alias*)x));
    return acc;
}

// Rows m0..m0+G-1 against panel p.
static inline __attribute__((always_inline)) void q4_tile(
    const int G, const q8_inputs* in, const uint8_t* P, const out_t* o, int64_t m0, int64_t p,
    int64_t groups) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[Q_TILE_ROWS];
    for (int g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();
    for (int64_t b = 0; b < groups; b++) {
        const uint8_t* w = P + (p * groups + b) * Q4_GROUP_BYTES;
        prefetch_ahead(w, Q4_GROUP_BYTES);
        __m512i dot[Q_TILE_ROWS];
        for (int g = 0; g < G; g++) dot[g] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m512i bytes = _mm512_loadu_si512(w + 64 * c);
            const __m512i lo = _mm512_and_si512(bytes, low);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
            for (int g = 0; g < G; g++) {
                const int8_t* x = in->xq + 32 * ((m0 + g) * groups + b);
                dot[g] = dpbusd_quad(dot[g], lo, x + 4 * c);
                dot[g] = dpbusd_quad(dot[g], hi, x + 16 + 4 * c);
            }
        }
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + 256)));
        const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + 288)));
        for (int g = 0; g < G; g++) {
            const int64_t i = (m0 + g) * groups + b;
            const __m512 scale = _mm512_mul_ps(s, _mm512_set1_ps(in->xd[i]));
            acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[g]), scale, acc[g]);
            acc[g] = _mm512_fmadd_ps(z, _mm512_set1_ps(in->xs[i]), acc[g]);
        }
    }
    for (int g = 0; g < G; g++) store16(o, m0 + g, PANEL * p, acc[g]);
}
#else
// Panel p, both halves (its outputs 0..7 and 8..15) in one pass, rows m0..m0+G-1: each
// weight line is used whole as it arrives, and a row's broadcast inputs serve both
// halves. Half by half, on an AVX2-only Zen 1 EPYC, a 1-row int4 step took 1.06-1.15x
// and a 2-row one 1.05-1.08x as long (benchmarks/kernel_ab.py, session 30). Two rows:
// their 8 accumulators and the unpacked weights fill AVX2's 16 registers (three spilled:
// 1.02-1.03x). A group's 8 maddubs results per lane stay within int16 (8 x 2 x 15 x 127
// < 32768).
#define Q_TILE_ROWS 2
#define Q_TAIL_TILES(TILE)
static inline __attribute__((always_inline)) void q4_tile(
    const int G, const q8_inputs* in, const uint8_t* P, const out_t* o, int64_t m0, int64_t p,
    int64_t groups) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[Q_TILE_ROWS][2];
    for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < groups; b++) {
        const uint8_t* w = P + (p * groups + b) * Q4_GROUP_BYTES;
        prefetch_ahead(w, Q4_GROUP_BYTES);
        __m256i dot[Q_TILE_ROWS][2];
        for (int g = 0; g < G; g++) dot[g][0] = dot[g][1] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            for (int h = 0; h < 2; h++) {
                const __m256i bytes = _mm256_loadu_si256((const __m256i*)(w + 64 * c + 32 * h));
                const __m256i lo = _mm256_and_si256(bytes, low);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
                for (int g = 0; g < G; g++) {
                    const int8_t* x = in->xq + 32 * ((m0 + g) * groups + b);
                    __m256i* d = &dot[g][h];
                    *d = _mm256_add_epi16(*d, _mm256_maddubs_epi16(lo, quad8(x + 4 * c)));
                    *d = _mm256_add_epi16(*d, _mm256_maddubs_epi16(hi, quad8(x + 16 + 4 * c)));
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 256 + 16 * h)));
            const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 288 + 16 * h)));
            for (int g = 0; g < G; g++) {
                const int64_t i = (m0 + g) * groups + b;
                const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot[g][h], ones));
                const __m256 scale = _mm256_mul_ps(s, _mm256_set1_ps(in->xd[i]));
                acc[g][h] = _mm256_fmadd_ps(dots, scale, acc[g][h]);
                acc[g][h] = _mm256_fmadd_ps(z, _mm256_set1_ps(in->xs[i]), acc[g][h]);
            }
        }
    }
    for (int g = 0; g < G; g++)
        for (int h = 0; h < 2; h++) store8(o, m0 + g, PANEL * p + 8 * h, acc[g][h]);
}
#endif

#define FOR_Q_ROW_TILES(M, TILE) FOR_TILES_OF(M, Q_TILE_ROWS, Q_TAIL_TILES, TILE)

static inline __attribute__((always_inline)) void q4_panel(
    const q8_inputs* in, const uint8_t* P, const out_t* o, int64_t p, int64_t M, int64_t groups) {
#define Q4_TILE(G) q4_tile(G, in, P, o, m, p, groups)
    FOR_Q_ROW_TILES(M, Q4_TILE);
#undef Q4_TILE
}

// One group of 32 inputs: 8-bit values xq with scale xd (max |x| / 127, rounded to
// nearest), and the sum of the rounded values (xq * xd) in xs. A group holding a NaN or
// an infinity gets a NaN scale, so the outputs it reaches are NaN, as a float product's
// would be; a group too small for its scale to invert counts as zero.
static void q8_group(const float* x, int8_t* xq, float* xd, float* xs, int32_t* xn) {
    const __m256 sign = _mm256_set1_ps(-0.0f), huge = _mm256_set1_ps(FLT_MAX);
    __m256 v[4], top = _mm256_setzero_ps();
    int finite = 1;
    for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(x + 8 * j);
        const __m256 size = _mm256_andnot_ps(sign, v[j]);
        finite &= _mm256_movemask_ps(_mm256_cmp_ps(size, huge, _CMP_LE_OQ)) == 0xFF;
        top = _mm256_max_ps(top, size);
    }
    float d = hmax(top) / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
    if (!(inverse <= FLT_MAX)) d = inverse = 0.0f;
    if (!finite) {
        for (int j = 0; j < 32; j++) xq[j] = 0;
        *xd = *xs = NAN;
        *xn = 0;
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
    *xd = d;
    const __m256i sums = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    const __m128i quarter = _mm_add_epi32(half, _mm_unpackhi_epi64(half, half));
    *xn = _mm_cvtsi128_si32(quarter) + _mm_extract_epi32(quarter, 1);
    *xs = (float)*xn * d;
}

// X's rows [M, K] rounded into `in`, group by group.
static void q8_rows(const float* X, int64_t M, int64_t K, const q8_inputs* in) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * (K / 32); i++)
        q8_group(X + 32 * i, in->xq + 32 * i, in->xd + i, in->xs + i, in->xn + i);
}

static void linear_q4(const float* X, const mtpd_matrix* w, const out_t* o, int64_t M,
                      const q8_inputs* in) {
    const int64_t groups = w->k / 32;
    q8_rows(X, M, w->k, in);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < o->n / PANEL; p++) q4_panel(in, w->q, o, p, M, groups);
}

// ---- int8 linear: W[n, k] = Q[n, k] * S[n], one scale per output (as PyTorch's int8
// operator takes), in panels of 16 outputs like int4's (cpu_kernels.Matrix.q8 packs
// them): panel p, group b is 8 chunks of 64 bytes, byte 4 i + t of chunk c holding
// Q[16 p + i, 32 b + 4 c + t] + 128, unsigned as dpbusd takes it. The inputs are rounded
// to 8 bits per group as for int4, so a row costs 8 dpbusd and 3 other operations per
// group of 16 outputs instead of a float FMA for every 16 weights. The + 128 adds 128
// times the group's input sum, taken back in integers before the group's scale. K is a
// multiple of 32.
#define Q8_GROUP_BYTES 512

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
static inline __attribute__((always_inline)) void q8_tile(
    const int G, const q8_inputs* in, const uint8_t* P, const float* S, const out_t* o,
    int64_t m0, int64_t p, int64_t groups) {
    __m512 acc[Q_TILE_ROWS];
    for (int g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();
    for (int64_t b = 0; b < groups; b++) {
        const uint8_t* w = P + (p * groups + b) * Q8_GROUP_BYTES;
        prefetch_ahead(w, Q8_GROUP_BYTES);
        __m512i dot[Q_TILE_ROWS];
        for (int g = 0; g < G; g++) dot[g] = _mm512_setzero_si512();
        for (int c = 0; c < 8; c++) {
            const __m512i bytes = _mm512_loadu_si512(w + 64 * c);
            for (int g = 0; g < G; g++)
                dot[g] = dpbusd_quad(dot[g], bytes, in->xq + 32 * ((m0 + g) * groups + b) + 4 * c);
        }
        for (int g = 0; g < G; g++) {
            const int64_t i = (m0 + g) * groups + b;
            const __m512i exact = _mm512_sub_epi32(dot[g], _mm512_set1_epi32(128 * in->xn[i]));
            acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(in->xd[i]), acc[g]);
        }
    }
    const __m512 scale = _mm512_loadu_ps(S + PANEL * p);
    for (int g = 0; g < G; g++) store16(o, m0 + g, PANEL * p, _mm512_mul_ps(acc[g], scale));
}
#else
// Panel p, both halves in one pass. maddubs takes |Q| (unsigned, at most 127) against the
// inputs with Q's signs, so a pair's sum fits int16 (2 x 127 x 127); the same integer dot
// as above.
static inline __attribute__((always_inline)) void q8_tile(
    const int G, const q8_inputs* in, const uint8_t* P, const float* S, const out_t* o,
    int64_t m0, int64_t p, int64_t groups) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 acc[Q_TILE_ROWS][2];
    for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < groups; b++) {
        const uint8_t* w = P + (p * groups + b) * Q8_GROUP_BYTES;
        prefetch_ahead(w, Q8_GROUP_BYTES);
        __m256i dot[Q_TILE_ROWS][2];
        for (int g = 0; g < G; g++) dot[g][0] = dot[g][1] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            for (int h = 0; h < 2; h++) {
                const __m256i q = _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i*)(w + 64 * c + 32 * h)), flip);
                const __m256i size = _mm256_abs_epi8(q);
                for (int g = 0; g < G; g++) {
                    const __m256i x = quad8(in->xq + 32 * ((m0 + g) * groups + b) + 4 * c);
                    const __m256i pairs = _mm256_maddubs_epi16(size, _mm256_sign_epi8(x, q));
                    dot[g][h] = _mm256_add_epi32(dot[g][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (int g = 0; g < G; g++) {
            const __m256 d = _mm256_set1_ps(in->xd[(m0 + g) * groups + b]);
            for (int h = 0; h < 2; h++)
                acc[g][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[g][h]), d, acc[g][h]);
        }
    }
    for (int h = 0; h < 2; h++) {
        const __m256 scale = _mm256_loadu_ps(S + PANEL * p + 8 * h);
        for (int g = 0; g < G; g++)
            store8(o, m0 + g, PANEL * p + 8 * h, _mm256_mul_ps(acc[g][h], scale));
    }
}
#endif

static inline __attribute__((always_inline)) void q8_panel(
    const q8_inputs* in, const uint8_t* P, const float* S, const out_t* o, int64_t p, int64_t M,
    int64_t groups) {
#define Q8_TILE(G) q8_tile(G, in, P, S, o, m, p, groups)
    FOR_Q_ROW_TILES(M, Q8_TILE);
#undef Q8_TILE
}

static void linear_q8(const float* X, const mtpd_matrix* w, const out_t* o, int64_t M,
                      const q8_inputs* in) {
    const int64_t groups = w->k / 32;
    q8_rows(X, M, w->k, in);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < o->n / PANEL; p++) q8_panel(in, w->q, w->s, o, p, M, groups);
}

// Y[M, w.n] = R + (X @ W^T + bias), R optional.
static void product(const mtpd_matrix* w, const float* X, float* Y, const float* R, int64_t M,
                    const q8_inputs* in) {
    const out_t o = {Y, w->bias, R, w->n, w->order};
    if (w->kind == MTPD_Q4)
        linear_q4(X, w, &o, M, in);
    else if (w->kind == MTPD_Q8)
        linear_q8(X, w, &o, M, in);
    else
        linear_f32(X, w->q, &o, M, w->k);
}

static int alloc_q8_inputs(q8_inputs* in, int64_t count) {
    in->xq = malloc(32 * count + 1);
    in->xd = malloc(sizeof(float) * count + 1);
    in->xs = malloc(sizeof(float) * count + 1);
    in->xn = malloc(sizeof(int32_t) * count + 1);
    return in->xq && in->xd && in->xs && in->xn;
}

static void free_q8_inputs(q8_inputs* in) {
    free(in->xq);
    free(in->xd);
    free(in->xs);
    free(in->xn);
}

// Returns 0, or -1 where memory for the rounded inputs could not be had.
int mtpd_linear(const mtpd_matrix* w, const float* X, float* Y, int64_t M, int threads) {
    q8_inputs in = {0};
    const int ok = w->kind == MTPD_F32 || alloc_q8_inputs(&in, M * w->k / 32);
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

// ---- RMSNorm: Y[m] = X[m] / sqrt(mean(X[m]^2) + eps) * W, M rows of H (a multiple of 8),
// row m of X at X + m * x_stride, of Y at Y + m * y_stride (so rows may be slices of
// wider ones, as an MTP head's inputs are).
static void rms_norm_rows(const float* X, int64_t x_stride, const float* W, float* Y,
                          int64_t y_stride, int64_t M, int64_t H, float eps) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float* x = X + m * x_stride;
        const float r = 1.0f / sqrtf(dot(x, x, H) / (float)H + eps);
        for (int64_t i = 0; i < H; i++) Y[m * y_stride + i] = x[i] * r * W[i];
    }
}

static void rms_norm(const float* X, const float* W, float* Y, int64_t M, int64_t H, float eps) {
    rms_norm_rows(X, H, W, Y, H, M, H, eps);
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

// Four dot products' sums, [a, b, c, d].
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// The KV caches hold vectors of d values (a key or a value of one kv head at one
// position) in float32; in float16 (half the bytes for attention to read, as llama.cpp's
// default cache); or in int8 with a float32 scale per KV_GROUP values of a vector (a
// quarter of float32's bytes and an eighth more for the scales, as llama.cpp's q8_0
// cache: at 8 streams of 1,000 positions and more attention's time follows the bytes).
enum { KV_F32 = 0, KV_F16 = 1, KV_I8 = 2 };
#define KV_GROUP 32

static inline int64_t kv_groups(int64_t d) { return (d + KV_GROUP - 1) / KV_GROUP; }

// A cache from some vector on: its values, and (int8) their scales [vectors, kv_groups(d)].
typedef struct {
    void* x;
    float* s;
} kv_t;

// Vector `row` on of a cache.
static inline __attribute__((always_inline)) kv_t kv_at(kv_t c, int64_t row, int64_t d, int fmt) {
    const int64_t size = fmt == KV_F32 ? 4 : fmt == KV_F16 ? 2 : 1;
    return (kv_t){(char*)c.x + row * d * size, fmt == KV_I8 ? c.s + row * kv_groups(d) : c.s};
}

static inline int64_t kv_bytes(int64_t values, int fmt) {
    return values * (fmt == KV_F32 ? 4 : fmt == KV_F16 ? 2 : 1);
}

// Values i..i+7 of vector `row` as float32 (i a multiple of 8: within one scale group).
static inline __attribute__((always_inline)) __m256 kv8(kv_t c, int64_t row, int64_t i, int64_t d,
                                                        int fmt) {
    const int64_t at = row * d + i;
    if (fmt == KV_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)c.x + at)));
    if (fmt == KV_I8) {
        const __m128i q = _mm_loadl_epi64((const __m128i*)((const int8_t*)c.x + at));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
                             _mm256_set1_ps(c.s[row * kv_groups(d) + i / KV_GROUP]));
    }
    return _mm256_loadu_ps((const float*)c.x + at);
}

// x [d] rounded to 8 bits a group of KV_GROUP values at a time, as the int4 and int8
// products round their inputs (q8_group: scale the group's largest magnitude / 127,
// rounded to nearest; a NaN scale for a group holding a NaN or an infinity); the groups'
// scales, and (`sums`, unless NULL) the sums of their rounded values. A last group
// shorter than KV_GROUP is rounded as if padded with zeros.
_Static_assert(KV_GROUP == 32, "q8_group rounds groups of 32");
static void round_groups(const float* x, int64_t d, int8_t* q, float* scales, int32_t* sums) {
    for (int64_t b = 0; b < kv_groups(d); b++) {
        const int64_t from = b * KV_GROUP, n = d - from < KV_GROUP ? d - from : KV_GROUP;
        float padded[KV_GROUP] = {0}, scaled_sum;
        int8_t rounded[KV_GROUP];
        int32_t sum;
        memcpy(padded, x + from, sizeof(float) * n);
        q8_group(padded, rounded, &scales[b], &scaled_sum, &sum);
        memcpy(q + from, rounded, n);
        if (sums) sums[b] = sum;
    }
}

// An int8 cache's keys lie KV_BLOCK to a block (the caches' positions are padded to a
// multiple), so that integer dot products take 16 keys to a register (scores_i8): a
// block is d / 4 runs of 64 bytes, run t holding values 4 t..4 t + 3 of each of its keys
// in turn, each + 128 (unsigned, as dpbusd takes them), and its scales [groups][KV_BLOCK].
// Values stay a vector to a row: attention weighs them one key at a time.
#define KV_BLOCK 16

static inline int64_t key_byte(int64_t row, int64_t i, int64_t d) {
    return row / KV_BLOCK * KV_BLOCK * d + i / 4 * 64 + row % KV_BLOCK * 4 + i % 4;
}

static inline int64_t key_scale(int64_t row, int64_t b, int64_t d) {
    return row / KV_BLOCK * KV_BLOCK * kv_groups(d) + b * KV_BLOCK + row % KV_BLOCK;
}

// x [d] into vector `row` of the cache (a key's where `key`): rounded to nearest where it
// holds float16, rounded in groups where int8 (round_groups).
static void kv_store(kv_t c, int64_t row, const float* x, int64_t d, int fmt, int key) {
    if (fmt == KV_I8 && key) {
        int8_t q[256];
        float scales[256 / KV_GROUP];
        round_groups(x, d, q, scales, NULL);
        for (int64_t i = 0; i < d; i++) ((uint8_t*)c.x)[key_byte(row, i, d)] = (uint8_t)(q[i] + 128);
        for (int64_t b = 0; b < kv_groups(d); b++) c.s[key_scale(row, b, d)] = scales[b];
        return;
    }
    if (fmt == KV_I8) {
        round_groups(x, d, (int8_t*)c.x + row * d, c.s + row * kv_groups(d), NULL);
        return;
    }
    for (int64_t j = 0; j < d; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        if (fmt == KV_F16)
            _mm_storeu_si128((__m128i*)((uint16_t*)c.x + row * d + j),
                             _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        else
            _mm256_storeu_ps((float*)c.x + row * d + j, v);
    }
}

// Attention's vectors: 16 lanes where the library is built for AVX-512, else 8. A head's
// d is a multiple of 8; on AVX-512 a last half vector is loaded and stored under a mask
// (masked-off lanes read nothing and add zeros). At 8 streams attention is about 38% of
// a step: 512-bit loads, float16 conversions and FMAs halve its instructions.
#ifdef __AVX512F__
#define ATT_W 16
typedef __m512 attv;
typedef __mmask16 attmask;
static inline attmask att_mask(int64_t left) {
    return left >= 16 ? (attmask)0xFFFF : (attmask)((1u << left) - 1);
}
static inline attv att_zero(void) { return _mm512_setzero_ps(); }
static inline attv att_set1(float x) { return _mm512_set1_ps(x); }
static inline attv att_fma(attv a, attv b, attv c) { return _mm512_fmadd_ps(a, b, c); }
static inline attv att_load(const float* p, attmask m) { return _mm512_maskz_loadu_ps(m, p); }
static inline void att_store(float* p, attv v, attmask m) { _mm512_mask_storeu_ps(p, m, v); }
static inline __m256 att_eight(attv v) { return fold512(v); }
// Values i.. of vector `row` (i a multiple of 16: within one scale group).
static inline __attribute__((always_inline)) attv att_kv(kv_t c, int64_t row, int64_t i, int64_t d,
                                                         int fmt, attmask m) {
    const int64_t at = row * d + i;
    if (fmt == KV_F16)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t*)c.x + at));
    if (fmt == KV_I8) {
        const __m128i q = _mm_maskz_loadu_epi8(m, (const int8_t*)c.x + at);
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)),
                             _mm512_set1_ps(c.s[row * kv_groups(d) + i / KV_GROUP]));
    }
    return _mm512_maskz_loadu_ps(m, (const float*)c.x + at);
}
#else
#define ATT_W 8
typedef __m256 attv;
typedef int attmask;  // unused: d is a multiple of 8
static inline attmask att_mask(int64_t left) { return (void)left, 0; }
static inline attv att_zero(void) { return _mm256_setzero_ps(); }
static inline attv att_set1(float x) { return _mm256_set1_ps(x); }
static inline attv att_fma(attv a, attv b, attv c) { return _mm256_fmadd_ps(a, b, c); }
static inline attv att_load(const float* p, attmask m) { return (void)m, _mm256_loadu_ps(p); }
static inline void att_store(float* p, attv v, attmask m) { (void)m, _mm256_storeu_ps(p, v); }
static inline __m256 att_eight(attv v) { return v; }
static inline __attribute__((always_inline)) attv att_kv(kv_t c, int64_t row, int64_t i, int64_t d,
                                                         int fmt, attmask m) {
    return (void)m, kv8(c, row, i, d, fmt);
}
#endif

// Queries sharing a kv head (the heads of a group, for one row) take its keys and values
// together, ATT_QUERIES at a time: each key and value vector is loaded (and converted
// from float16) once for all of them instead of once per query (attention at 200
// positions had cost a row about 0.26 ms of a 3 ms int4 step; together, a step ran 4-8%
// faster, session 24). Each query's sums run in the same order as alone, so its result
// does not depend on its companions. Three queries of four keys take 12 accumulators
// beside the keys: AVX-512's 32 registers hold them; AVX2's 16 do not, but spilling a few
// cost less than converting a group's keys and values twice (two queries, then one): an
// int4 step at 200 positions 0.97-0.98x, at 1,000 0.95-0.96x on a Zen 1 EPYC
// (benchmarks/kernel_ab.py, session 30).
#define ATT_CHUNK 64
#define ATT_QUERIES 3

// p[g][j] = q[g] . K[j] * scale for each key and query; top[g] the largest of p[g]. Four
// keys at a time, each its own accumulator, so the products overlap instead of waiting
// on one sum.
static inline __attribute__((always_inline)) void scores(const int G, const int fmt,
                                                         const float* const* q, kv_t K,
                                                         float (*p)[ATT_CHUNK], int64_t keys,
                                                         int64_t d, float scale, float* top) {
    __m128 tops[ATT_QUERIES];  // four keys' running maxima: no chain of scalar compares
    for (int g = 0; g < G; g++) tops[g] = _mm_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 4 <= keys; j += 4) {
        attv acc[ATT_QUERIES][4];
        for (int g = 0; g < G; g++)
            for (int r = 0; r < 4; r++) acc[g][r] = att_zero();
        prefetch_ahead(kv_at(K, j, d, fmt).x, kv_bytes(4 * d, fmt));
        for (int64_t i = 0; i < d; i += ATT_W) {
            const attmask m = att_mask(d - i);
            attv k[4];
            for (int r = 0; r < 4; r++) k[r] = att_kv(K, j + r, i, d, fmt, m);
            for (int g = 0; g < G; g++) {
                const attv qv = att_load(q[g] + i, m);
                for (int r = 0; r < 4; r++) acc[g][r] = att_fma(qv, k[r], acc[g][r]);
            }
        }
        for (int g = 0; g < G; g++) {
            const __m128 four = _mm_mul_ps(hsum4(att_eight(acc[g][0]), att_eight(acc[g][1]),
                                                 att_eight(acc[g][2]), att_eight(acc[g][3])),
                                           _mm_set1_ps(scale));
            _mm_storeu_ps(p[g] + j, four);
            tops[g] = _mm_max_ps(four, tops[g]);
        }
    }
    for (int g = 0; g < G; g++) top[g] = hmax4(tops[g]);
    for (; j < keys; j++) {
        attv acc[ATT_QUERIES];
        for (int g = 0; g < G; g++) acc[g] = att_zero();
        for (int64_t i = 0; i < d; i += ATT_W) {
            const attmask m = att_mask(d - i);
            const attv k = att_kv(K, j, i, d, fmt, m);
            for (int g = 0; g < G; g++) acc[g] = att_fma(att_load(q[g] + i, m), k, acc[g]);
        }
        for (int g = 0; g < G; g++) {
            p[g][j] = hsum(att_eight(acc[g])) * scale;
            top[g] = p[g][j] > top[g] ? p[g][j] : top[g];
        }
    }
}

// A query rounded for an int8 cache's keys (round_groups): its values, their groups'
// scales and sums.
typedef struct {
    const int8_t* q;
    const float* scale;
    const int32_t* sum;
} q8_query;

// scores() over an int8 cache's keys (K from a block's start), the queries rounded to 8
// bits as the keys are: each group's dot product in integers, 16 keys to a register (a
// block: no sum across lanes), then p[g][j] = scale * sum over groups of the integer dot
// * the key's scale * the query's. Over float keys a key cost about 40 operations, a
// third of them the sums across lanes; here a key costs a query one dpbusd (64
// multiply-adds). Both builds compute the same integer dot products.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
static inline __attribute__((always_inline)) void scores_i8(const int G, const q8_query* q,
                                                            kv_t K, float (*p)[ATT_CHUNK],
                                                            int64_t keys, int64_t d,
                                                            float scale, float* top) {
    const int64_t groups = kv_groups(d), quads = d / 4;
    __m512 tops[ATT_QUERIES];
    for (int g = 0; g < G; g++) tops[g] = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < keys; j0 += KV_BLOCK) {
        const uint8_t* block = (const uint8_t*)K.x + j0 * d;
        const float* scales = K.s + j0 * groups;
        prefetch_ahead(block, KV_BLOCK * d);
        __m512 f[ATT_QUERIES];
        for (int g = 0; g < G; g++) f[g] = _mm512_setzero_ps();
        for (int64_t b = 0; b < groups; b++) {
            __m512i dot[ATT_QUERIES];
            for (int g = 0; g < G; g++) dot[g] = _mm512_setzero_si512();
            const int64_t end = (b + 1) * KV_GROUP / 4 < quads ? (b + 1) * KV_GROUP / 4 : quads;
            for (int64_t t = b * KV_GROUP / 4; t < end; t++) {
                const __m512i k = _mm512_loadu_si512(block + 64 * t);
                for (int g = 0; g < G; g++) dot[g] = dpbusd_quad(dot[g], k, q[g].q + 4 * t);
            }
            const __m512 ks = _mm512_loadu_ps(scales + KV_BLOCK * b);
            for (int g = 0; g < G; g++) {
                // The keys' + 128 took 128 times the query's sum in.
                const __m512i exact = _mm512_sub_epi32(dot[g], _mm512_set1_epi32(128 * q[g].sum[b]));
                f[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact),
                                       _mm512_mul_ps(ks, _mm512_set1_ps(q[g].scale[b])), f[g]);
            }
        }
        const int64_t n = keys - j0 < KV_BLOCK ? keys - j0 : KV_BLOCK;
        const __mmask16 m = (__mmask16)((1u << n) - 1);
        for (int g = 0; g < G; g++) {
            const __m512 v = _mm512_mul_ps(f[g], _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(p[g] + j0, m, v);
            tops[g] = _mm512_mask_max_ps(tops[g], m, tops[g], v);
        }
    }
    for (int g = 0; g < G; g++) top[g] = _mm512_reduce_max_ps(tops[g]);
}
#else
static inline __attribute__((always_inline)) void scores_i8(const int G, const q8_query* q,
                                                            kv_t K, float (*p)[ATT_CHUNK],
                                                            int64_t keys, int64_t d,
                                                            float scale, float* top) {
    const int64_t groups = kv_groups(d), quads = d / 4;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    for (int g = 0; g < G; g++) top[g] = -INFINITY;
    for (int64_t j0 = 0; j0 < keys; j0 += 8) {  // half a block: its first or last 8 keys
        const int64_t half = j0 % KV_BLOCK / 8;
        const uint8_t* block = (const uint8_t*)K.x + (j0 - 8 * half) * d + 32 * half;
        const float* scales = K.s + (j0 - 8 * half) * groups + 8 * half;
        __m256 f[ATT_QUERIES];
        for (int g = 0; g < G; g++) f[g] = _mm256_setzero_ps();
        for (int64_t b = 0; b < groups; b++) {
            __m256i dot[ATT_QUERIES];
            for (int g = 0; g < G; g++) dot[g] = _mm256_setzero_si256();
            const int64_t end = (b + 1) * KV_GROUP / 4 < quads ? (b + 1) * KV_GROUP / 4 : quads;
            for (int64_t t = b * KV_GROUP / 4; t < end; t++) {
                // Signed keys (the + 128 undone), each pair's product sum within int16.
                const __m256i k = _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i*)(block + 64 * t)), flip);
                for (int g = 0; g < G; g++) {
                    const __m256i x = quad8(q[g].q + 4 * t);
                    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(k, x));
                    dot[g] = _mm256_add_epi32(dot[g], _mm256_madd_epi16(pairs, ones));
                }
            }
            const __m256 ks = _mm256_loadu_ps(scales + KV_BLOCK * b);
            for (int g = 0; g < G; g++)
                f[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[g]),
                                       _mm256_mul_ps(ks, _mm256_set1_ps(q[g].scale[b])), f[g]);
        }
        const int64_t n = keys - j0 < 8 ? keys - j0 : 8;
        for (int g = 0; g < G; g++) {
            float v[8];
            _mm256_storeu_ps(v, _mm256_mul_ps(f[g], _mm256_set1_ps(scale)));
            for (int64_t j = 0; j < n; j++) {
                p[g][j0 + j] = v[j];
                top[g] = v[j] > top[g] ? v[j] : top[g];
            }
        }
    }
}
#endif

// o[g] = sum over keys of p[g][j] V[j] (unnormalised: fold and scale_row normalise), four
// vectors of dimensions at a time held in registers across the keys (one at a time for
// the rest of d).
static inline __attribute__((always_inline)) void weigh_values(const int G, const int fmt,
                                                               float (*p)[ATT_CHUNK], kv_t V,
                                                               float* const* o,
                                                               int64_t keys, int64_t d) {
    int64_t i0 = 0;
    const attmask all = att_mask(ATT_W);
    for (; i0 + 4 * ATT_W <= d; i0 += 4 * ATT_W) {
        attv acc[ATT_QUERIES][4];
        for (int g = 0; g < G; g++)
            for (int r = 0; r < 4; r++) acc[g][r] = att_zero();
        for (int64_t j = 0; j < keys; j++) {
            prefetch_ahead((char*)kv_at(V, j, d, fmt).x + kv_bytes(i0, fmt),
                           kv_bytes(4 * ATT_W, fmt));
            attv v[4];
            for (int r = 0; r < 4; r++) v[r] = att_kv(V, j, i0 + ATT_W * r, d, fmt, all);
            for (int g = 0; g < G; g++) {
                const attv w = att_set1(p[g][j]);
                for (int r = 0; r < 4; r++) acc[g][r] = att_fma(w, v[r], acc[g][r]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int r = 0; r < 4; r++) att_store(o[g] + i0 + ATT_W * r, acc[g][r], all);
    }
    for (; i0 < d; i0 += ATT_W) {
        const attmask m = att_mask(d - i0);
        attv acc[ATT_QUERIES];
        for (int g = 0; g < G; g++) acc[g] = att_zero();
        for (int64_t j = 0; j < keys; j++) {
            const attv v = att_kv(V, j, i0, d, fmt, m);
            for (int g = 0; g < G; g++) acc[g] = att_fma(att_set1(p[g][j]), v, acc[g]);
        }
        for (int g = 0; g < G; g++) att_store(o[g] + i0, acc[g], m);
    }
}

typedef struct {
    int64_t heads, kv_heads, d;
    float scale;
} heads_t;

// A sequence's part of a step for attention: its slot's caches [kv_heads, context, d],
// the cache position of its first row, that row's index in the step and its row count.
typedef struct {
    kv_t k, v;
    int64_t start, first_row, rows;
} att_seq;

// Keys are taken ATT_CHUNK at a time, each chunk's softmax partial (its largest score,
// the sum of its weights relative to that, their weighted values) folded into the row's
// in key order. A chunk's keys and values stay in L1 while every query that reads them
// does, and a short context still splits into enough tasks for both threads: one task
// per head had read each kv head's cache once per query head and per row, and gave a
// thread 5 of 9 heads. A row's result depends only on its own keys, never on what else
// the step holds or how the chunks were shared out (both ways below fold the same
// partials in the same order). ATT_CHUNK (keys a chunk holds) is defined above.

static inline int64_t chunks_of(int64_t keys) { return (keys + ATT_CHUNK - 1) / ATT_CHUNK; }

// Queries q[0..G-1] over n (at most ATT_CHUNK) keys K and values V: each one's partial
// (o[g], m[g], l[g]).
static inline __attribute__((always_inline)) void chunk_partials_of(
    const int G, const int fmt, const float* const* q, const q8_query* qq, kv_t K, kv_t V,
    int64_t n, int64_t d, float scale, float* const* o, float* m, float* l) {
    float p[ATT_QUERIES][ATT_CHUNK], top[ATT_QUERIES];
    if (fmt == KV_I8)
        scores_i8(G, qq, K, p, n, d, scale, top);
    else
        scores(G, fmt, q, K, p, n, d, scale, top);
    for (int g = 0; g < G; g++) {
        for (int64_t j = 0; j < n; j++) p[g][j] -= top[g];
        exp_all(p[g], n);
        // Eight running sums, not one chain of n dependent additions.
        __m256 sums = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) sums = _mm256_add_ps(sums, _mm256_loadu_ps(p[g] + j));
        float total = hsum(sums);
        for (; j < n; j++) total += p[g][j];
        m[g] = top[g];
        l[g] = total;
    }
    weigh_values(G, fmt, p, V, o, n, d);
}

// The partials of `count` queries (qq: the same rounded to 8 bits, for an int8 cache),
// ATT_QUERIES at a time; each cache format compiled with its own loads.
static void chunk_partials(int fmt, const float* const* q, const q8_query* qq, int64_t count,
                           kv_t K, kv_t V, int64_t n, int64_t d, float scale, float* const* o,
                           float* m, float* l) {
    for (int64_t i = 0; i < count; i += ATT_QUERIES) {
        const int64_t G = count - i < ATT_QUERIES ? count - i : ATT_QUERIES;
#define PARTIALS(G, FMT) \
    chunk_partials_of(G, FMT, q + i, qq + i, K, V, n, d, scale, o + i, m + i, l + i)
#define BY_FORMAT(G)                                     \
    (fmt == KV_F16  ? PARTIALS(G, KV_F16)                \
     : fmt == KV_I8 ? PARTIALS(G, KV_I8)                 \
                    : PARTIALS(G, KV_F32))
        if (G == 1)
            BY_FORMAT(1);
        else if (G == 2)
            BY_FORMAT(2);
        else
            BY_FORMAT(3);
#undef BY_FORMAT
#undef PARTIALS
    }
}

// The running partial (m, l, o) with a chunk's (mc, lc, oc) folded in; m starts at
// -infinity, l and o at 0. Written out operation by operation so that both ways of
// sharing the chunks out compile to the same arithmetic.
static void fold(float* m, float* l, float* o, float mc, float lc, const float* oc, int64_t d) {
    const float top = mc > *m ? mc : *m;
    const float a = expf(*m - top), b = expf(mc - top);
    *l = fmaf(*l, a, lc * b);
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    for (int64_t i = 0; i < d; i += 8)
        _mm256_storeu_ps(o + i, _mm256_fmadd_ps(_mm256_loadu_ps(o + i), va,
                                                _mm256_mul_ps(_mm256_loadu_ps(oc + i), vb)));
    *m = top;
}

static void scale_row(float* o, int64_t d, float l) {
    const __m256 norm = _mm256_set1_ps(1.0f / l);
    for (int64_t i = 0; i < d; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(o + i), norm));
}

// One task of the split way: kv head g's chunk c of sequence s, for every row and query
// head that reads it.
typedef struct {
    int64_t seq, g, c;
} att_task;

// What a step's attention works in, laid out once per step (the same for every layer).
// Partials (d + 2 floats: o, m, l) for row r, head h, chunk c at part_of_row[r] +
// h chunks_of(keys of r) + c. With no partials (a sequence of many rows, a prompt:
// they would take memory quadratic in its length), each task takes one row and kv head
// through all its chunks instead.
typedef struct {
    float* q;  // [M, heads, d]: the rows' queries, turned
    // For an int8 cache, the same rounded (round_groups): [M, heads, d] and [M, heads,
    // kv_groups(d)] scales and sums.
    int8_t* q8;
    float* q8_scale;
    int32_t* q8_sum;
    float* partials;
    int64_t* part_of_row;
    att_task* tasks;
    int64_t n_tasks;
    int fmt;  // the caches' format: KV_F32, KV_F16, KV_I8
} att_work;

#define ATT_SPLIT_ROWS 16             // the most rows a sequence may have for the split way
#define ATT_SPLIT_BYTES (64l << 20)  // and the most memory its partials may take

// Query `at` (row * heads + head) rounded, where the cache is int8.
static inline q8_query rounded_query(const att_work* w, int64_t at, int64_t d) {
    if (!w->q8) return (q8_query){0};
    const int64_t groups = kv_groups(d);
    return (q8_query){w->q8 + at * d, w->q8_scale + at * groups, w->q8_sum + at * groups};
}

static inline int64_t keys_of(const att_seq* s, int64_t r) {
    return s->start + r - s->first_row + 1;
}

// Lays out `w` for the step's sequences (their k, v unused here); returns 0 where
// memory for the queries could not be had.
static int att_plan(att_work* w, const heads_t* a, const att_seq* seqs, int64_t n_seqs,
                    int64_t M, int fmt) {
    *w = (att_work){0};
    w->fmt = fmt;
    int64_t n_tasks = 0, n_parts = 0, split = 1;
    for (int64_t s = 0; s < n_seqs; s++) {
        split &= seqs[s].rows <= ATT_SPLIT_ROWS;
        n_tasks += a->kv_heads * chunks_of(seqs[s].start + seqs[s].rows);
        for (int64_t r = seqs[s].first_row; r < seqs[s].first_row + seqs[s].rows; r++)
            n_parts += a->heads * chunks_of(keys_of(&seqs[s], r));
    }
    split &= n_parts * (a->d + 2) * (int64_t)sizeof(float) <= ATT_SPLIT_BYTES;
    w->q = malloc(sizeof(float) * (M * a->heads * a->d + 1));
    if (!w->q) return 0;
    if (fmt == KV_I8) {
        const int64_t queries = M * a->heads;
        w->q8 = malloc(queries * a->d + 1);
        w->q8_scale = malloc(sizeof(float) * (queries * kv_groups(a->d) + 1));
        w->q8_sum = malloc(sizeof(int32_t) * (queries * kv_groups(a->d) + 1));
        if (!w->q8 || !w->q8_scale || !w->q8_sum) return 0;
    }
    if (split) {
        w->partials = malloc(sizeof(float) * (n_parts * (a->d + 2) + 1));
        w->part_of_row = malloc(sizeof(int64_t) * (M + 1));
        w->tasks = malloc(sizeof(att_task) * (n_tasks + 1));
    }
    if (!w->partials || !w->part_of_row || !w->tasks) {  // the other way needs none of them
        free(w->partials), free(w->part_of_row), free(w->tasks);
        w->partials = NULL, w->part_of_row = NULL, w->tasks = NULL;
        return 1;
    }
    for (int64_t s = 0, part = 0; s < n_seqs; s++) {
        for (int64_t g = 0; g < a->kv_heads; g++)
            for (int64_t c = 0; c < chunks_of(seqs[s].start + seqs[s].rows); c++)
                w->tasks[w->n_tasks++] = (att_task){s, g, c};
        for (int64_t r = seqs[s].first_row; r < seqs[s].first_row + seqs[s].rows; r++) {
            w->part_of_row[r] = part;
            part += a->heads * chunks_of(keys_of(&seqs[s], r));
        }
    }
    return 1;
}

static void att_free(att_work* w) {
    free(w->q), free(w->partials), free(w->part_of_row), free(w->tasks);
    free(w->q8), free(w->q8_scale), free(w->q8_sum);
}

// Every sequence's rows; row r belongs to seqs[seq_of_row[r]]. Two barriers the online
// way, three the split way, whatever the batch holds (a pair per sequence had cost 8
// streams about a millisecond a step).
// COS and SIN_SIGNED hold the rotary rows of positions cos_from.. (the whole tables, from
// 0, in a decoder step: no per-step gathering of rows).
static void attend(const heads_t* a, const float* QKV, const float* COS, const float* SIN_SIGNED,
                   int64_t cos_from, const att_seq* seqs, const int64_t* seq_of_row, int64_t M,
                   float* OUT, int64_t context, const att_work* w) {
    const int64_t heads = a->heads, kv_heads = a->kv_heads, d = a->d;
    const int64_t width = (heads + 2 * kv_heads) * d, group = heads / kv_heads;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < M * kv_heads; task++) {
        const int64_t r = task / kv_heads, g = task % kv_heads;
        const att_seq* q = &seqs[seq_of_row[r]];
        const float* row = QKV + r * width;
        const int64_t position = keys_of(q, r) - 1, at = g * context + position;
        const float* c = COS + (position - cos_from) * d;
        const float* s = SIN_SIGNED + (position - cos_from) * d;
        float turned[256];
        rope(row + (heads + g) * d, c, s, turned, d);
        kv_store(q->k, at, turned, d, w->fmt, 1);
        kv_store(q->v, at, row + (heads + kv_heads + g) * d, d, w->fmt, 0);
        for (int64_t h = g * group; h < (g + 1) * group; h++) {
            const int64_t at_q = r * heads + h;
            rope(row + h * d, c, s, w->q + at_q * d, d);
            if (w->q8)
                round_groups(w->q + at_q * d, d, w->q8 + at_q * d,
                             w->q8_scale + at_q * kv_groups(d), w->q8_sum + at_q * kv_groups(d));
        }
    }
    if (w->partials) {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < w->n_tasks; t++) {
            const att_task task = w->tasks[t];
            const att_seq* s = &seqs[task.seq];
            const int64_t c0 = task.c * ATT_CHUNK;
            const kv_t k = kv_at(s->k, task.g * context + c0, d, w->fmt);
            const kv_t v = kv_at(s->v, task.g * context + c0, d, w->fmt);
            for (int64_t r = s->first_row; r < s->first_row + s->rows; r++) {
                const int64_t keys = keys_of(s, r);
                const int64_t n = keys - c0 < ATT_CHUNK ? keys - c0 : ATT_CHUNK;
                if (n <= 0) continue;
                const float* q[group];
                q8_query qq[group];
                float *o[group], m[group], l[group];
                for (int64_t i = 0; i < group; i++) {
                    const int64_t h = task.g * group + i;
                    q[i] = w->q + (r * heads + h) * d;
                    qq[i] = rounded_query(w, r * heads + h, d);
                    o[i] = w->partials +
                           (w->part_of_row[r] + h * chunks_of(keys) + task.c) * (d + 2);
                }
                chunk_partials(w->fmt, q, qq, group, k, v, n, d, a->scale, o, m, l);
                for (int64_t i = 0; i < group; i++) o[i][d] = m[i], o[i][d + 1] = l[i];
            }
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < M * heads; task++) {
            const int64_t r = task / heads, h = task % heads;
            const int64_t chunks = chunks_of(keys_of(&seqs[seq_of_row[r]], r));
            float* o = OUT + (r * heads + h) * d;
            float m = -INFINITY, l = 0.0f;
            for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
            for (int64_t c = 0; c < chunks; c++) {
                const float* part = w->partials + (w->part_of_row[r] + h * chunks + c) * (d + 2);
                fold(&m, &l, o, part[d], part[d + 1], part, d);
            }
            scale_row(o, d, l);
        }
    } else {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < M * kv_heads; task++) {
            const int64_t r = task / kv_heads, g = task % kv_heads;
            const att_seq* s = &seqs[seq_of_row[r]];
            const int64_t keys = keys_of(s, r);
            float m[group], l[group], oc[group][d], mc[group], lc[group];
            const float* q[group];
            q8_query qq[group];
            float* o[group];
            for (int64_t h = 0; h < group; h++) {
                q[h] = w->q + (r * heads + g * group + h) * d, o[h] = oc[h];
                qq[h] = rounded_query(w, r * heads + g * group + h, d);
            }
            for (int64_t h = 0; h < group; h++) {
                m[h] = -INFINITY, l[h] = 0.0f;
                for (int64_t i = 0; i < d; i++) OUT[(r * heads + g * group + h) * d + i] = 0.0f;
            }
            for (int64_t c0 = 0; c0 < keys; c0 += ATT_CHUNK) {
                const int64_t n = keys - c0 < ATT_CHUNK ? keys - c0 : ATT_CHUNK;
                const kv_t k = kv_at(s->k, g * context + c0, d, w->fmt);
                const kv_t v = kv_at(s->v, g * context + c0, d, w->fmt);
                chunk_partials(w->fmt, q, qq, group, k, v, n, d, a->scale, o, mc, lc);
                for (int64_t h = 0; h < group; h++)
                    fold(&m[h], &l[h], OUT + (r * heads + g * group + h) * d, mc[h], lc[h], oc[h], d);
            }
            for (int64_t h = 0; h < group; h++)
                scale_row(OUT + (r * heads + g * group + h) * d, d, l[h]);
        }
    }
}

int mtpd_attend_f32(const float* QKV, const float* COS, const float* SIN_SIGNED, float* KC,
                    float* VC, float* OUT, int64_t T, int64_t start, int64_t heads,
                    int64_t kv_heads, int64_t d, int64_t max_context, float scale, int threads) {
    const heads_t a = {heads, kv_heads, d, scale};
    const att_seq one = {{KC, NULL}, {VC, NULL}, start, 0, T};
    int64_t* const seq_of_row = calloc(T + 1, sizeof(int64_t));  // all rows: sequence 0
    att_work w;
    const int ok = seq_of_row && att_plan(&w, &a, &one, 1, T, KV_F32);
    if (ok) {
#pragma omp parallel num_threads(threads)
        attend(&a, QKV, COS, SIN_SIGNED, start, &one, seq_of_row, T, OUT, max_context, &w);
        att_free(&w);
    }
    free(seq_of_row);
    return ok ? 0 : -1;
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
// kv_heads, max_context, d] (int8: with their scales K_SCALE and V_SCALE [layers,
// slots_per_layer, kv_heads, max_context, kv_groups(d)]); cos and sin_signed the rotary
// tables [positions, d] from position 0 (the layers take each row's own).
typedef struct {
    int64_t rows, sequences;
    const int64_t *slots, *starts, *counts;
    const float *cos, *sin_signed;
    void *k, *v;
    float *k_scale, *v_scale;
    int64_t slots_per_layer, max_context;
    int64_t kv_format;  // KV_F32, KV_F16, KV_I8
} mtpd_step;

// Layers first .. first + n - 1 of the step's caches (L[0] .. L[n - 1]) on rows X, the
// last one's output into Y (not X), in one parallel region: a Python call and an OpenMP
// region per layer had cost a 1-row int4 step about 0.3 ms of its 6. The rows going into
// each of the n_taps layers taps[j] (increasing, 0 .. n - 1) are copied to T + j * M * H:
// the residual stream a fused MTP head reads (split into a call per tap, the tail of a
// 1-row int4 step took 0.15-0.35 ms longer). Returns 0, or -1 where memory for the
// intermediate rows could not be had.
int mtpd_decoder_layers_f32(const mtpd_layer* L, int64_t n, const mtpd_step* S, int64_t first,
                            const float* X, float* Y, int threads, const int64_t* taps,
                            int64_t n_taps, float* T) {
    const int64_t M = S->rows, H = L[0].o.n;
    int64_t widest = 0, width = 0;  // of the 8-bit-rounded inputs; of a layer's rows
    for (int64_t l = 0; l < n; l++) {
        const mtpd_matrix* const products[4] = {&L[l].qkv, &L[l].o, &L[l].gate_up, &L[l].down};
        for (int i = 0; i < 4; i++)
            if (products[i]->kind != MTPD_F32 && products[i]->k > widest) widest = products[i]->k;
        const int64_t w = H + L[l].qkv.n + L[l].o.k + 3 * (L[l].gate_up.n / 2);
        width = w > width ? w : width;
    }
    const int64_t slot_size = L[0].attention.kv_heads * S->max_context;  // vectors
    // Every intermediate row in one allocation, and the rows between two layers (+ 1: a
    // step may have no rows).
    float* const buffer = malloc(sizeof(float) * (M * (width + H) + 1));
    q8_inputs in = {0};
    att_seq* const seqs = malloc(sizeof(att_seq) * (S->sequences + 1));
    int64_t* const seq_of_row = malloc(sizeof(int64_t) * (M + 1));
    att_work work = {0};
    int failed = !buffer || !seqs || !seq_of_row ||
                 (widest && !alloc_q8_inputs(&in, M * widest / 32));
    for (int64_t i = 0, row = 0; !failed && i < S->sequences; row += S->counts[i++]) {
        seqs[i] = (att_seq){{0}, {0}, S->starts[i], row, S->counts[i]};  // k, v: per layer
        for (int64_t r = row; r < row + S->counts[i]; r++) seq_of_row[r] = i;
    }
    failed = failed || !att_plan(&work, &L[0].attention, seqs, S->sequences, M, (int)S->kv_format);
    if (!failed) {
        float* const between = buffer + M * width;
#pragma omp parallel num_threads(threads)
        for (int64_t l = 0; l < n; l++) {
            const mtpd_layer* const A = &L[l];
            const int64_t layer = first + l, I = A->gate_up.n / 2;
            // The last layer writes Y; the others alternate so that none reads what it writes.
            const float* const x = l == 0 ? X : ((n - l) % 2 ? between : Y);
            float* const y = (n - 1 - l) % 2 ? between : Y;
            float* const normed = buffer;
            float* const qkv = normed + M * H;
            float* const attended = qkv + M * A->qkv.n;
            float* const gate_up = attended + M * A->o.k;
            float* const act = gate_up + M * 2 * I;
#pragma omp single
            {
                for (int64_t i = 0; i < S->sequences; i++) {
                    const int64_t at = (layer * S->slots_per_layer + S->slots[i]) * slot_size;
                    const int64_t d = A->attention.d, fmt = S->kv_format;
                    seqs[i].k = kv_at((kv_t){S->k, S->k_scale}, at, d, fmt);
                    seqs[i].v = kv_at((kv_t){S->v, S->v_scale}, at, d, fmt);
                }
                // Before this layer overwrites the buffer x will be: its end is a barrier.
                for (int64_t j = 0; j < n_taps; j++)
                    if (taps[j] == l) memcpy(T + j * M * H, x, sizeof(float) * M * H);
            }
            rms_norm(x, A->input_norm, normed, M, H, A->eps);
            product(&A->qkv, normed, qkv, NULL, M, &in);
            attend(&A->attention, qkv, S->cos, S->sin_signed, 0, seqs, seq_of_row, M, attended,
                   S->max_context, &work);
            product(&A->o, attended, y, x, M, &in);
            rms_norm(y, A->post_norm, normed, M, H, A->eps);
            product(&A->gate_up, normed, gate_up, NULL, M, &in);
            silu_mul(gate_up, act, M, I);
            product(&A->down, act, y, y, M, &in);
        }
    }
    free(buffer);
    free(seqs);
    free(seq_of_row);
    free_q8_inputs(&in);
    att_free(&work);
    return failed ? -1 : 0;
}

// ---- An MTP head's input (model/mtp.py, MTPHead._input): fc(cat(norm_embedding(E),
// hidden)), hidden the trunk's final state normed or, where the rows carry taps, the
// final state and each tap normed and mixed by fuse; rows as wide as one state (the
// head's own, drafting on) take the final-state norm alone. One call: the head's
// PyTorch ops around its layer cost a draft pass more than their arithmetic (a 1-row
// int4 pass took 0.43 ms, of which the input's norms, concatenations and products 0.09).
typedef struct {
    int64_t hidden, taps;  // H; trunk taps (0: none, fuse unused)
    float eps;
    const float* norm_embedding;  // [H]
    const float* norm_hidden;     // [H]
    const float* norm_taps;       // [taps, H]
    mtpd_matrix fuse;             // [H, (1 + taps) H]
    mtpd_matrix fc;               // [H, 2 H]
} mtpd_mtp_input;

// E: the next tokens' embeddings [M, H]; X: [M, width], width H or (1 + taps) H; Y: [M, H].
// Returns 0, or -1 where memory for the intermediate rows could not be had.
int mtpd_mtp_input_f32(const mtpd_mtp_input* h, const float* E, const float* X, int64_t width,
                       float* Y, int64_t M, int threads) {
    const int64_t H = h->hidden, parts = 1 + h->taps;
    const int fused = h->taps > 0 && width == parts * H;
    // cat(normed embedding, hidden) [M, 2 H]; with taps, the normed parts [M, parts H]
    // and their mix [M, H].
    float* const buffer = malloc(sizeof(float) * (M * (2 * H + (fused ? (parts + 1) * H : 0)) + 1));
    float* const joined = buffer;
    float* const normed = joined + M * 2 * H;
    float* const mixed = normed + M * parts * H;
    int64_t widest = 0;
    const mtpd_matrix* const products[2] = {&h->fc, fused ? &h->fuse : &h->fc};
    for (int i = 0; i < 2; i++)
        if (products[i]->kind != MTPD_F32 && products[i]->k > widest) widest = products[i]->k;
    q8_inputs in = {0};
    const int failed = !buffer || (widest && !alloc_q8_inputs(&in, M * widest / 32));
    if (!failed) {
#pragma omp parallel num_threads(threads)
        {
            rms_norm_rows(E, H, h->norm_embedding, joined, 2 * H, M, H, h->eps);
            if (fused) {
                rms_norm_rows(X, width, h->norm_hidden, normed, parts * H, M, H, h->eps);
                for (int64_t t = 0; t < h->taps; t++)
                    rms_norm_rows(X + (t + 1) * H, width, h->norm_taps + t * H, normed + (t + 1) * H,
                                  parts * H, M, H, h->eps);
                product(&h->fuse, normed, mixed, NULL, M, &in);
#pragma omp for schedule(static)
                for (int64_t m = 0; m < M; m++)
                    memcpy(joined + m * 2 * H + H, mixed + m * H, sizeof(float) * H);
            } else {
                rms_norm_rows(X, width, h->norm_hidden, joined + H, 2 * H, M, H, h->eps);
            }
            product(&h->fc, joined, Y, NULL, M, &in);
        }
    }
    free(buffer);
    free_q8_inputs(&in);
    return failed ? -1 : 0;
}

// ---- An MTP head's whole pass (model/mtp.py, MTPHead.forward_and_draft): the next
// tokens' embeddings, the input stage, the head's layers over the step S (the head's own
// cache), the final norm of the rows that draft (draft_rows, n_draft of them) and the
// draft vocabulary's greedy pick for each. The same kernels in the same order as the
// head's calls one by one, so the same bits; in one call because the Python between them
// (layouts, norms, argmax, indexing) had cost a draft pass about as much as its
// arithmetic.
typedef struct {
    const float* embedding;  // [vocab, H]: the trunk's, shared
    int64_t vocab;
    mtpd_mtp_input input;
    const mtpd_layer* layers;
    int64_t n_layers;
    const float* norm;  // [H]
    float eps;
    mtpd_matrix draft_head;    // [n, H]: the draft vocabulary's rows, padded to whole panels
    int64_t draft_vocab;       // its rows that are tokens (the padding's are not)
    const int64_t* draft_ids;  // [draft_vocab]: full-vocabulary ids, or NULL (the same)
} mtpd_mtp_pass;

// numpy's argmax of x's n values: the first of equal largest, or the first NaN where there
// is one (the largest found 8 lanes at a time, then its first place).
static int64_t first_largest(const float* x, int64_t n) {
    __m256 top = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        top = _mm256_max_ps(top, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float largest = hmax(top);
    int any_nan = _mm256_movemask_ps(nan) != 0;
    for (; j < n; j++) {
        any_nan |= x[j] != x[j];
        largest = x[j] > largest ? x[j] : largest;
    }
    for (j = 0; j < n; j++)
        if (any_nan ? x[j] != x[j] : x[j] == largest) return j;
    return 0;
}

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

// TOKENS [M]; X [M, width] as mtpd_mtp_input takes it; STATES [n_draft, H] the normed
// states of rows draft_rows; DRAFTS [n_draft] their greedy drafts (as numpy's argmax of
// their logits). *ROWS_SECONDS: the time of the part that grows with the rows (the input
// stage and the layers; the drafter bills held rows their share of it). Returns 0; -1
// where memory could not be had; -2 where a token lies outside the vocabulary (nothing
// is computed then).
int mtpd_mtp_pass_f32(const mtpd_mtp_pass* p, const mtpd_step* S, const int64_t* TOKENS,
                      const float* X, int64_t width, const int64_t* draft_rows, int64_t n_draft,
                      float* STATES, int64_t* DRAFTS, double* ROWS_SECONDS, int threads) {
    const int64_t M = S->rows, H = p->input.hidden, V = p->draft_head.n;
    for (int64_t m = 0; m < M; m++)
        if (TOKENS[m] < 0 || TOKENS[m] >= p->vocab) return -2;
    float* const buffer = malloc(sizeof(float) * (3 * M * H + n_draft * (H + V)) + 1);
    if (!buffer) return -1;
    float *const embedded = buffer, *const input = embedded + M * H, *const out = input + M * H;
    float *const picked = out + M * H, *const logits = picked + n_draft * H;
    for (int64_t m = 0; m < M; m++)
        memcpy(embedded + m * H, p->embedding + TOKENS[m] * H, sizeof(float) * H);
    const double began = seconds_now();
    int failed = mtpd_mtp_input_f32(&p->input, embedded, X, width, input, M, threads) ||
                 mtpd_decoder_layers_f32(p->layers, p->n_layers, S, 0, input, out, threads,
                                         NULL, 0, NULL);
    *ROWS_SECONDS = seconds_now() - began;
    if (!failed && n_draft) {
        for (int64_t i = 0; i < n_draft; i++)
            memcpy(picked + i * H, out + draft_rows[i] * H, sizeof(float) * H);
        rms_norm(picked, p->norm, STATES, n_draft, H, p->eps);  // a few rows: one thread
        failed = mtpd_linear(&p->draft_head, STATES, logits, n_draft, threads);
    }
    for (int64_t i = 0; !failed && i < n_draft; i++) {
        const int64_t best = first_largest(logits + i * V, p->draft_vocab);
        DRAFTS[i] = p->draft_ids ? p->draft_ids[best] : best;
    }
    free(buffer);
    return failed ? -1 : 0;
}
