/* CPU kernels for x86 with AVX2 and FMA (and VNNI where the CPU has it: see dot_u8s8), built at run time by
 * splitserve/kernels/cpu_kernels.py with -march=native and called through ctypes.
 *
 * quant_linear: quantized linear layer, y = x @ w^T (+ bias), outputs fp32. Weights are int8 with one fp32 scale
 * per output channel, or 4-bit with a scale and a minimum per channel and block of 32 inputs (llama.cpp's Q4_1),
 * packed in groups of channels. A decode step's few rows read each weight once, as one byte (or half of one)
 * instead of four, so on a memory-bound CPU the layer runs 3x faster or more than an fp32 GEMM (torch's own
 * int8/int4 CPU kernels are slower than fp32 on AVX2 machines). Activations stay fp32 (int8 weights converted in
 * registers), or are quantized per block of 32, to 8 bits (w8a8, w4a8) or 7 (w8a7), for integer dot products.
 * An int8 tile takes 4 channels and 2 rows (8 accumulators + 4 weight vectors + the row's: the 16 AVX2
 * registers), a 4-bit one 8 channels and 4 rows.
 *
 * add_rms_norm, rope, silu_mul: a decoder layer's element-wise steps, one call each instead of 5-10 torch ops
 * (at a decode step's few rows those ops cost more in dispatch than in arithmetic).
 *
 * paged_attention: each query row (a decode row, or a prompt row as a decode row at its position) over its KV
 * pages, read in place from the page-major cache (no gather, no copy; fp32, fp16, bf16 or int8 as stored): each
 * (row, KV head) scores its context for the query heads that share that KV head, softmaxes in fp32 and sums the
 * values. A row's result depends on its query, its keys and its context length only.
 *
 * decode_layers: all decoder layers of a step of a quantized model (decode rows and prompt rows alike), the kernels
 * above in one call.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

/* Integer dot products: VNNI's vpdpbusd (4 unsigned x signed byte products summed into each int32 lane, one
 * instruction) where the compiler targets it, as AVX512-VNNI on 256-bit vectors (AVX512VL) or AVX-VNNI (the same
 * instruction on CPUs with only the 256-bit form); else AVX2's maddubs (pairs summed into int16) and madd (pairs of
 * those into int32). The kernels below never saturate maddubs' int16 sums, so both give the same int32 sums, and
 * the outputs are the same bytes on every build (tests compile both and compare). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 2
#define dpbusd(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define VNNI 1
#define dpbusd(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#else
#define VNNI 0
#endif

/* acc + the int32 sums of 4 adjacent u8 x s8 products: vpdpbusd, or maddubs and madd (no saturation: see above). */
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if VNNI
    return dpbusd(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* Which integer dot product this build uses: 0 AVX2 (maddubs), 1 AVX-VNNI, 2 AVX512-VNNI. */
int vnni(void) { return VNNI; }

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* --- quant_linear ------------------------------------------------------------------------------------------------
 * Weights are packed for the kernel (cpu_quant.pack): [ceil(N/4)][ceil(K/32)][4][32], each block of 32 inputs
 * holding its 4 channels' weights one after another, zero-padded. A tile of 4 channels then reads one sequential
 * stream: row-major weights read as 4 streams K bytes apart ran at half the memory bandwidth here. (4-bit weights
 * have their own layout: see below.) */

#define QB 32 /* inputs per block */
#define NG 4  /* channels per group */

/* The tiles below ask for the weights (and 4-bit scales) PREFETCH blocks ahead of the one they compute: a decode
 * step reads each weight once, from memory, and computing between loads left too few of them in flight (the
 * embedded model's step on 2 cores: 7.4-8.0 ms without, 6.0-6.4 ms 32 blocks ahead; 16 gained less). A block past
 * a group's last is the next group's, which the same thread reads next; a prefetch past the end does not fault. */
#define PREFETCH 32
static inline __attribute__((always_inline)) void prefetch_lines(const void* p, int lines) {
    for (int i = 0; i < lines; i++) _mm_prefetch((const char*)p + 64 * i, _MM_HINT_T0);
}

static inline __m256 load_w8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

/* acc[i][j] += x[i, :] . w[j, :] for MR rows of fp32 x (ldx apart, zero-padded to kb blocks) and the 4
 * channels of group `wg`, their weights converted to fp32 in registers. */
static inline __attribute__((always_inline)) void tile_f32(
    const float* x, int64_t ldx, const int8_t* wg, int64_t kb, int MR, __m256 acc[2][NG])
{
    for (int64_t b = 0; b < kb; b++) {
        prefetch_lines(wg + (b + PREFETCH) * NG * QB, NG * QB / 64);
        for (int kk = 0; kk < QB; kk += 8) {
            __m256 wv[NG];
            for (int j = 0; j < NG; j++) wv[j] = load_w8(wg + b * NG * QB + j * QB + kk);
            for (int i = 0; i < MR; i++) {
                const __m256 xv = _mm256_loadu_ps(x + i * ldx + b * QB + kk);
                for (int j = 0; j < NG; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
            }
        }
    }
}

/* The same from int8 x blocks (xq, ldq apart; d: each block's scale, kb per row): per block, 32 products
 * summed in int32 (maddubs takes one unsigned operand: |x| against w carrying x's sign), then scaled by d. */
static inline __attribute__((always_inline)) void tile_a8(
    const int8_t* xq, int64_t ldq, const float* d, const int8_t* wg, int64_t kb, int MR, __m256 acc[2][NG])
{
    for (int64_t b = 0; b < kb; b++) {
        prefetch_lines(wg + (b + PREFETCH) * NG * QB, NG * QB / 64);
        __m256i wv[NG];
        for (int j = 0; j < NG; j++) wv[j] = _mm256_loadu_si256((const __m256i*)(wg + b * NG * QB + j * QB));
        for (int i = 0; i < MR; i++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + i * ldq + b * QB));
            const __m256i ax = _mm256_sign_epi8(xv, xv);
            const __m256 dv = _mm256_set1_ps(d[i * kb + b]);
            for (int j = 0; j < NG; j++) {
                __m256i p = dot_u8s8(_mm256_setzero_si256(), ax, _mm256_sign_epi8(wv[j], xv));
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv, acc[i][j]);
            }
        }
    }
}

/* The same from 7-bit x blocks stored as unsigned bytes (xu = q + 64, 1..127): maddubs(xu, w) needs no sign
 * trick and cannot saturate (2 * 127 * 127 < 2^15), one instruction fewer per product than int8 activations.
 * The offset is taken back once per row and block for 4 channels at a time: corr[i] += d * ws, ws = 64 * sum w
 * of each channel over the block (`offset`, made with the packed weights). */
static inline __attribute__((always_inline)) void tile_a7(
    const uint8_t* xu, int64_t ldq, const float* d, const int8_t* wg, const float* ws, int64_t kb, int MR,
    __m256 acc[2][NG], __m128 corr[2])
{
    for (int64_t b = 0; b < kb; b++) {
        prefetch_lines(wg + (b + PREFETCH) * NG * QB, NG * QB / 64);
        __m256i wv[NG];
        for (int j = 0; j < NG; j++) wv[j] = _mm256_loadu_si256((const __m256i*)(wg + b * NG * QB + j * QB));
        const __m128 w4 = _mm_loadu_ps(ws + b * NG);
        for (int i = 0; i < MR; i++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(xu + i * ldq + b * QB));
            const __m256 dv = _mm256_set1_ps(d[i * kb + b]);
            corr[i] = _mm_fmadd_ps(_mm256_castps256_ps128(dv), w4, corr[i]);
            for (int j = 0; j < NG; j++) {
                __m256i p = dot_u8s8(_mm256_setzero_si256(), xv, wv[j]);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv, acc[i][j]);
            }
        }
    }
}

/* --- 4-bit weights ---------------------------------------------------------------------------------------------
 * w = dw * q + m per channel and block of 32 inputs, q in 0..15 (llama.cpp's Q4_1), packed (cpu_quant.pack4) in
 * groups of 8 channels: per group and block, 4 runs of 32 bytes; byte 4c + t of run r holds channel c's q at input
 * 4r + t in its low nibble and at input 4r + 16 + t in its high one. dw and m: [groups][kb][8].
 *
 * Each 32-bit lane of a vector then belongs to one channel: maddubs of a run's nibbles (the unsigned operand)
 * against 4 inputs of x broadcast to every lane (the signed one) gives each channel two partial sums in int16.
 * A block's 8 such products add up in int16 without overflow (8 * 2 * 15 * 127 < 2^15), so a block costs per row
 * 8 maddubs + 8 adds, then one widening, one conversion and one multiply-add for all 8 channels, whose results land
 * in their own lanes (no horizontal sums): about half the instructions of the int8 kernel per weight. */
#define NG4 8 /* channels per 4-bit group */

/* acc[i] += the group's 8 dot products with rows i < MR of int8 x (xq, ldq apart; d: each block's scale, sx: scale
 * times the block's sum, kb per row), for the group's 4-bit weights wg. */
static inline __attribute__((always_inline)) void tile_w4(
    const int8_t* xq, int64_t ldq, const float* d, const float* sx, const uint8_t* wg, const float* dw,
    const float* mw, int64_t kb, int MR, __m256 acc[4])
{
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < kb; b++) {
        prefetch_lines(wg + (b + PREFETCH) * 128, 2);
        prefetch_lines(dw + (b + PREFETCH) * NG4, 1);
        prefetch_lines(mw + (b + PREFETCH) * NG4, 1);
        __m256i sum[4]; /* int16 pairs (AVX2), or int32 (VNNI: the low nibbles' products; the high ones' in sum2) */
#if VNNI
        __m256i sum2[4]; /* two dependency chains: a row alone (a decode step's) waits on one vpdpbusd per product */
        for (int i = 0; i < MR; i++) sum2[i] = _mm256_setzero_si256();
#endif
        for (int i = 0; i < MR; i++) sum[i] = _mm256_setzero_si256();
        for (int r = 0; r < 4; r++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i*)(wg + (b * 4 + r) * 32));
            const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            for (int i = 0; i < MR; i++) {
                const int8_t* xb = xq + i * ldq + b * QB + 4 * r;
                const __m256i xl = _mm256_set1_epi32(*(const int32_t*)xb);
                const __m256i xh = _mm256_set1_epi32(*(const int32_t*)(xb + 16));
#if VNNI
                sum[i] = dpbusd(sum[i], lo, xl);
                sum2[i] = dpbusd(sum2[i], hi, xh);
#else
                sum[i] = _mm256_add_epi16(sum[i], _mm256_maddubs_epi16(lo, xl));
                sum[i] = _mm256_add_epi16(sum[i], _mm256_maddubs_epi16(hi, xh));
#endif
            }
        }
        const __m256 d8 = _mm256_loadu_ps(dw + b * NG4), m8 = _mm256_loadu_ps(mw + b * NG4);
        for (int i = 0; i < MR; i++) {
#if VNNI
            const __m256 p = _mm256_cvtepi32_ps(_mm256_add_epi32(sum[i], sum2[i])); /* exact: the same int32 sums */
#else
            const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[i], _mm256_set1_epi16(1)));
#endif
            acc[i] = _mm256_fmadd_ps(p, _mm256_mul_ps(d8, _mm256_set1_ps(d[i * kb + b])), acc[i]);
            acc[i] = _mm256_fmadd_ps(m8, _mm256_set1_ps(sx[i * kb + b]), acc[i]);
        }
    }
}

#if VNNI == 2 && defined(__AVX512BW__)
#define W4_512 1
/* tile_w4 for two groups at once (16 channels: group g in lanes 0-7, g + 1 in 8-15), on 512-bit vectors: half
 * the instructions per weight. Each lane's integer sum and float arithmetic is the 256-bit tile's, so its outputs
 * are the same bytes. */
static inline __attribute__((always_inline)) void tile_w4x2(
    const int8_t* xq, int64_t ldq, const float* d, const float* sx, const uint8_t* wg, const uint8_t* wg1,
    const float* dw, const float* dw1, const float* mw, const float* mw1, int64_t kb, int MR, __m512 acc[4])
{
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < kb; b++) {
        prefetch_lines(wg + (b + PREFETCH) * 128, 2);
        prefetch_lines(wg1 + (b + PREFETCH) * 128, 2);
        prefetch_lines(dw + (b + PREFETCH) * NG4, 1);
        prefetch_lines(dw1 + (b + PREFETCH) * NG4, 1);
        prefetch_lines(mw + (b + PREFETCH) * NG4, 1);
        prefetch_lines(mw1 + (b + PREFETCH) * NG4, 1);
        __m512i sum[4], sum2[4]; /* the low and the high nibbles' products: two dependency chains (see tile_w4) */
        for (int i = 0; i < MR; i++) sum[i] = sum2[i] = _mm512_setzero_si512();
        for (int r = 0; r < 4; r++) {
            const __m512i raw = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(wg + (b * 4 + r) * 32))),
                _mm256_loadu_si256((const __m256i*)(wg1 + (b * 4 + r) * 32)), 1);
            const __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            for (int i = 0; i < MR; i++) {
                const int8_t* xb = xq + i * ldq + b * QB + 4 * r;
                sum[i] = _mm512_dpbusd_epi32(sum[i], lo, _mm512_set1_epi32(*(const int32_t*)xb));
                sum2[i] = _mm512_dpbusd_epi32(sum2[i], hi, _mm512_set1_epi32(*(const int32_t*)(xb + 16)));
            }
        }
        const __m512 d16 = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(dw + b * NG4)),
                                              _mm256_loadu_ps(dw1 + b * NG4), 1);
        const __m512 m16 = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(mw + b * NG4)),
                                              _mm256_loadu_ps(mw1 + b * NG4), 1);
        for (int i = 0; i < MR; i++) {
            const __m512 p = _mm512_cvtepi32_ps(_mm512_add_epi32(sum[i], sum2[i]));
            acc[i] = _mm512_fmadd_ps(p, _mm512_mul_ps(d16, _mm512_set1_ps(d[i * kb + b])), acc[i]);
            acc[i] = _mm512_fmadd_ps(m16, _mm512_set1_ps(sx[i * kb + b]), acc[i]);
        }
    }
}
#else
#define W4_512 0
#endif

/* y = x @ w^T (+ bias) for 4-bit weights (see above) and x quantized to int8 per block (xq, d, sx as tile_w4):
 * the groups in pairs on 512-bit vectors where the CPU has AVX512-VNNI, else (and for an odd last group) one by
 * one. */
static void linear_w4(const int8_t* xq, const float* d, const float* sx, const uint8_t* w, const float* dw,
                      const float* mw, const float* bias, float* y, int64_t M, int64_t N, int64_t kb, int nthreads) {
    const int64_t groups = (N + NG4 - 1) / NG4, kp = kb * QB;
    const int64_t pairs = W4_512 ? groups / 2 : 0, units = pairs + (groups - 2 * pairs);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t g = u < pairs ? 2 * u : u + pairs, width = u < pairs ? 2 * NG4 : NG4;
        const uint8_t* wg = w + g * NG4 * kp / 2;
        const float *gd = dw + g * kb * NG4, *gm = mw + g * kb * NG4;
        for (int64_t m = 0; m < M; m += 4) {
            const int mr = M - m >= 4 ? 4 : (int)(M - m);
            float out[4][2 * NG4];
            const int8_t* xr = xq + m * kp;
            const float *dr = d + m * kb, *sr = sx + m * kb;
#if W4_512
            if (u < pairs) {
                const uint8_t* wg1 = wg + NG4 * kp / 2;
                const float *gd1 = gd + kb * NG4, *gm1 = gm + kb * NG4;
                __m512 acc[4];
                for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_ps();
                if (mr == 4) tile_w4x2(xr, kp, dr, sr, wg, wg1, gd, gd1, gm, gm1, kb, 4, acc);
                else if (mr == 3) tile_w4x2(xr, kp, dr, sr, wg, wg1, gd, gd1, gm, gm1, kb, 3, acc);
                else if (mr == 2) tile_w4x2(xr, kp, dr, sr, wg, wg1, gd, gd1, gm, gm1, kb, 2, acc);
                else tile_w4x2(xr, kp, dr, sr, wg, wg1, gd, gd1, gm, gm1, kb, 1, acc);
                for (int i = 0; i < mr; i++) _mm512_storeu_ps(out[i], acc[i]);
            } else
#endif
            {
                __m256 acc[4];
                for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();
                if (mr == 4) tile_w4(xr, kp, dr, sr, wg, gd, gm, kb, 4, acc);
                else if (mr == 3) tile_w4(xr, kp, dr, sr, wg, gd, gm, kb, 3, acc);
                else if (mr == 2) tile_w4(xr, kp, dr, sr, wg, gd, gm, kb, 2, acc);
                else tile_w4(xr, kp, dr, sr, wg, gd, gm, kb, 1, acc);
                for (int i = 0; i < mr; i++) _mm256_storeu_ps(out[i], acc[i]);
            }
            for (int i = 0; i < mr; i++)
                for (int c = 0; c < width && g * NG4 + c < N; c++) {
                    const int64_t n = g * NG4 + c;
                    y[(m + i) * N + n] = out[i][c] + (bias ? bias[n] : 0.0f);
                }
        }
    }
}

/* One block of 32 values to `levels` (127: int8; 63: 7 bits) plus `offset`: q = round(x / d) + offset,
 * d = max |x| / levels; *s = d * sum(q - offset) where s is not NULL. */
static inline void quantize_block(const float* src, int8_t* dst, float* d, float* s, float levels, int offset) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(src + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    t = _mm_max_ss(t, _mm_movehdup_ps(t));
    const float dm = _mm_cvtss_f32(t) / levels;
    *d = dm;
    const __m256 inv = _mm256_set1_ps(dm > 0.0f ? 1.0f / dm : 0.0f);
    __m256i q[4], total = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT));
        total = _mm256_add_epi32(total, q[j]);
        q[j] = _mm256_add_epi32(q[j], _mm256_set1_epi32(offset));
    }
    if (s) *s = dm * hsum(_mm256_cvtepi32_ps(total));
    /* 32 int32 -> 32 int8 in order (the packs interleave 128-bit lanes: permute back) */
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i*)dst, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* y = x @ w^T (+ bias); x [M, K] fp32, bias [N] or NULL. Weights (packed, see above):
 *   wbits 8: int8 with one fp32 scale per channel (`scale` [N]); bits = 32: x stays fp32; 8: each row of x is
 *     quantized to int8 per block of 32 first (integer dot products: about half the instructions per weight, for
 *     approximate activations); 7: to 7 bits (fewer instructions still; `offset`, made with the weights, takes
 *     the 7-bit offset back: see tile_a7);
 *   wbits 4: 4-bit with a scale and a minimum per channel and block of 32 (`scale`, `offset`; see linear_w4),
 *     with int8 activations (bits = 8): half the bytes of int8 weights, and fewer instructions.
 * A last partial block is zero-padded. */
void quant_linear(const float* x, const void* w, const float* scale, const float* offset, const float* bias,
                  float* y, int64_t M, int64_t N, int64_t K, int nthreads, int wbits, int bits) {
    const int a8 = bits != 32;
    const int64_t kb = (K + QB - 1) / QB, kp = kb * QB, groups = (N + NG - 1) / NG;
    float* xp = NULL; /* x zero-padded to kp, where K is not a whole number of blocks */
    int8_t* xq = NULL;
    float *d = NULL, *sx = NULL;
    if (a8) {
        xq = malloc((size_t)(M * kp));
        d = malloc(sizeof(float) * (size_t)(M * kb));
        if (wbits == 4) sx = malloc(sizeof(float) * (size_t)(M * kb));
        for (int64_t m = 0; m < M; m++)
            for (int64_t b = 0; b < kb; b++) {
                const float* src = x + m * K + b * QB;
                float block[QB] = {0};
                if (b * QB + QB > K) {
                    for (int64_t k = b * QB; k < K; k++) block[k - b * QB] = x[m * K + k];
                    src = block;
                }
                quantize_block(src, xq + m * kp + b * QB, d + m * kb + b, sx ? sx + m * kb + b : NULL,
                               bits == 7 ? 63.0f : 127.0f, bits == 7 ? 64 : 0);
            }
    } else if (kp != K) {
        xp = calloc((size_t)(M * kp), sizeof(float));
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) xp[m * kp + k] = x[m * K + k];
    }
    const float* xf = xp ? xp : x;
    const int64_t ldx = xp ? kp : K;
    if (wbits == 4) linear_w4(xq, d, sx, w, scale, offset, bias, y, M, N, kb, nthreads);
    else {
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int8_t* wg = (const int8_t*)w + g * NG * kp;
            const float* ws = offset ? offset + g * kb * NG : NULL;
            for (int64_t m = 0; m < M; m += 2) {
                const int mr = M - m >= 2 ? 2 : 1;
                __m256 acc[2][NG];
                __m128 corr[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
                for (int i = 0; i < 2; i++) for (int j = 0; j < NG; j++) acc[i][j] = _mm256_setzero_ps();
                const uint8_t* xu = (const uint8_t*)xq + m * kp;
                if (bits == 7 && mr == 2) tile_a7(xu, kp, d + m * kb, wg, ws, kb, 2, acc, corr);
                else if (bits == 7) tile_a7(xu, kp, d + m * kb, wg, ws, kb, 1, acc, corr);
                else if (a8 && mr == 2) tile_a8(xq + m * kp, kp, d + m * kb, wg, kb, 2, acc);
                else if (a8) tile_a8(xq + m * kp, kp, d + m * kb, wg, kb, 1, acc);
                else if (mr == 2) tile_f32(xf + m * ldx, ldx, wg, kb, 2, acc);
                else tile_f32(xf + m * ldx, ldx, wg, kb, 1, acc);
                for (int i = 0; i < mr; i++) {
                    float offsets[NG];
                    _mm_storeu_ps(offsets, corr[i]);
                    for (int j = 0; j < NG && g * NG + j < N; j++) {
                        const int64_t n = g * NG + j;
                        y[(m + i) * N + n] = (hsum(acc[i][j]) - offsets[j]) * scale[n] + (bias ? bias[n] : 0.0f);
                    }
                }
            }
        }
    }
    free(xp);
    free(xq);
    free(d);
    free(sx);
}

/* e^x for 8 floats (Cephes' single-precision polynomial, as in avx_mathfun): within 2 ulp of expf. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* row[i] = e^(row[i] - shift) for i < n; returns their sum. */
static inline float exp_shifted(float* row, int64_t n, float shift) {
    __m256 sv = _mm256_set1_ps(shift), acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + i), sv));
        _mm256_storeu_ps(row + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    for (; i < n; i++) { row[i] = expf(row[i] - shift); sum += row[i]; }
    return sum;
}

static inline void axpy(float* y, float a, const float* x, int64_t n) {
    __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

/* --- paged attention, a query row at a time ------------------------------------------------------------------------
 * The cache holds K/V as --kv-dtype stores them (kind below): fp32, fp16, bf16, or int8 with an fp32 scale per
 * page, layer, K or V, and KV head, stored after the block's values (kernels/kv_format.py). Attention reads them in
 * place, 8 elements at a time converted to fp32 in registers (fp16 by F16C, bf16 by a shift, int8 by a widening),
 * so a narrower cache moves fewer bytes from memory; an int8 page's scale multiplies its keys' scores and its
 * values' probabilities. Scores, softmax and sums stay fp32. Each function below takes the kind as a constant
 * (always inlined into one specialised copy per kind). */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2, KV_I8 = 3 };

static inline __attribute__((always_inline)) int64_t kv_bytes(int kind) {
    return kind == KV_F32 ? 4 : kind == KV_I8 ? 1 : 2;
}

/* Bytes of one (page, layer, K or V) block: page_size tokens' kv_heads rows, then an int8 block's scales. */
static inline int64_t kv_block(int64_t page_size, int64_t kv_heads, int64_t dim, int kind) {
    return page_size * kv_heads * dim * kv_bytes(kind) + (kind == KV_I8 ? kv_heads * (int64_t)sizeof(float) : 0);
}

static inline __attribute__((always_inline)) __m256 load8(const char* p, int kind) {
    switch (kind) {
    case KV_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    case KV_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
    case KV_I8: return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
    default: return _mm256_loadu_ps((const float*)p);
    }
}

static inline __attribute__((always_inline)) float load1(const char* p, int kind) {
    switch (kind) {
    case KV_F16: return _cvtsh_ss(*(const uint16_t*)p);
    case KV_BF16: {
        union { uint32_t u; float f; } x = {(uint32_t)*(const uint16_t*)p << 16};
        return x.f;
    }
    case KV_I8: return (float)*(const int8_t*)p;
    default: return *(const float*)p;
    }
}

/* fp32 -> bf16 rounded to nearest even, NaN to 0x7fc0: as torch converts. */
static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } x = {f};
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((x.u + 0x7fffu + ((x.u >> 16) & 1u)) >> 16);
}

/* count new rows (src, `dim` floats each, `src_stride` apart) of KV head h into slots first.. of an int8 block
 * (`page_size` tokens of `heads` rows, then the heads' scales): the scale becomes max(old, absmax / 127), the
 * rows already there (before `first`; none when first is 0, a fresh page) requantized if it grew. As
 * kv_format.write computes it. */
static void store_i8(int8_t* block, int64_t first, int64_t count, const float* src, int64_t src_stride, int64_t h,
                     int64_t heads, int64_t dim, int64_t page_size) {
    float* scale_at = (float*)(block + page_size * heads * dim) + h;
    const float old = first > 0 ? *scale_at : 0.0f;
    float amax = 0.0f;
    for (int64_t t = 0; t < count; t++)
        for (int64_t i = 0; i < dim; i++) amax = fmaxf(amax, fabsf(src[t * src_stride + i]));
    const float scale = fmaxf(old, amax / 127.0f), step = scale > 0.0f ? scale : 1.0f;
    if (scale > old)
        for (int64_t t = 0; t < first; t++) {
            int8_t* row = block + (t * heads + h) * dim;
            for (int64_t i = 0; i < dim; i++) row[i] = (int8_t)nearbyintf((float)row[i] * old / step);
        }
    for (int64_t t = 0; t < count; t++) {
        int8_t* row = block + ((first + t) * heads + h) * dim;
        for (int64_t i = 0; i < dim; i++) {
            const float q = nearbyintf(src[t * src_stride + i] / step);
            row[i] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
        }
    }
    *scale_at = scale;
}

/* One token's heads rows of dim values from src (contiguous) into slot `offset` of a (page, layer, K or V) block
 * as the cache stores them (rounded to nearest even, as torch converts). */
static void store_kv(char* block, int64_t offset, const float* src, int64_t heads, int64_t dim, int64_t page_size,
                     int kind) {
    if (kind == KV_I8) {
        for (int64_t h = 0; h < heads; h++)
            store_i8((int8_t*)block, offset, 1, src + h * dim, dim, h, heads, dim, page_size);
        return;
    }
    char* dst = block + offset * heads * dim * kv_bytes(kind);
    const int64_t n = heads * dim;
    int64_t i = 0;
    switch (kind) {
    case KV_F16:
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)(dst + 2 * i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++) ((uint16_t*)dst)[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
        break;
    case KV_BF16:
        for (; i < n; i++) ((uint16_t*)dst)[i] = to_bf16(src[i]);
        break;
    default:
        for (; i < n; i++) ((float*)dst)[i] = src[i];
    }
}

/* r[i] = the sum of v[i]'s 8 lanes, for 8 vectors at once */
static inline __m256 hsum8(const __m256 v[8]) {
    const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

/* The shape of a paged attention call: the cache [num_pages, num_layers, 2, page_size, kv_heads, dim] of `kind`
 * elements (each (page, layer, K or V) block kv_block bytes), and the query heads. */
typedef struct {
    int64_t heads, kv_heads, dim, page_size, num_layers;
    float scale;
    int kind;
} AttnShape;

/* Each function below computes one row's values in one fixed order, whichever rows are attended together (see
 * attend_rows): a row's attention is the same bits alone, in a batch of decode rows or among a prompt's rows. */

/* out[i] = scale * q . k_i for the 8 keys keys[0..8) (dim a multiple of 8): one accumulator each, summed together. */
static inline __attribute__((always_inline)) void score8(const float* q, const char* const* keys, int64_t dim,
                                                         float scale, float* out, int kind) {
    const int64_t es = kv_bytes(kind);
    __m256 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < dim; c += 8) {
        const __m256 qv = _mm256_loadu_ps(q + c);
        for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qv, load8(keys[i] + c * es, kind), acc[i]);
    }
    _mm256_storeu_ps(out, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
}

/* scale * q . k, element by element: the keys past a row's last whole block of 8 (and every key when dim is not a
 * multiple of 8). */
static inline __attribute__((always_inline)) float score1(const float* q, const char* key, int64_t dim, float scale,
                                                          int kind) {
    const int64_t es = kv_bytes(kind);
    float s = 0.0f;
    for (int64_t c = 0; c < dim; c++) s += q[c] * load1(key + c * es, kind);
    return s * scale;
}

/* o[c0 .. c0 + 8 * W) += sum over t in [t0, t1) of p[t] * v_t[c0 ..], W vectors kept in registers (`fresh`: o
 * starts at 0): a row's values summed in order of t, in as many calls as its keys are split into. */
static inline __attribute__((always_inline)) void values_chunk(const float* p, const char* const* values, int64_t t0,
                                                               int64_t t1, int64_t c0, int W, float* o, int fresh,
                                                               int kind) {
    const int64_t es = kv_bytes(kind);
    __m256 acc[8];
    for (int i = 0; i < W; i++) acc[i] = fresh ? _mm256_setzero_ps() : _mm256_loadu_ps(o + c0 + 8 * i);
    for (int64_t t = t0; t < t1; t++) {
        const __m256 pv = _mm256_set1_ps(p[t]);
        const char* v = values[t] + c0 * es;
        for (int i = 0; i < W; i++) acc[i] = _mm256_fmadd_ps(pv, load8(v + 8 * i * es, kind), acc[i]);
    }
    for (int i = 0; i < W; i++) _mm256_storeu_ps(o + c0 + 8 * i, acc[i]);
}

#define ROWS 8      /* rows attended together: each 8-key block's keys are read once for all of them */
#define VALUE_RUN 64 /* keys whose values stay in L1 while every row of a block sums them */

/* `rows` rows over one KV head h: row r's `group` query heads (q + r * q_stride) over the first lens[r] tokens of
 * `pages` of `layer` (lens non-decreasing; every row reads a prefix of the same pages: a prompt's rows, or one
 * decode row), written to out + r * out_stride. The keys' scores come block by block of 8 for every row whose
 * whole blocks reach that far, the values run by run of VALUE_RUN keys: a block's K and V leave memory once for all
 * the rows, where attending row by row read them once a row. */
static inline __attribute__((always_inline)) void attend_rows(const float* q, int64_t q_stride, int64_t rows,
                                                              const int64_t* lens, const char* cache,
                                                              const int64_t* pages, int64_t layer, int64_t h,
                                                              int64_t group, const AttnShape* a, float* out,
                                                              int64_t out_stride, int kind) {
    const int64_t dim = a->dim, row = dim * kv_bytes(kind), n = lens[rows - 1];
    const int64_t token_stride = a->kv_heads * row;
    const int64_t half = kv_block(a->page_size, a->kv_heads, dim, kind); /* K to V within a page's layer */
    const int64_t page_stride = a->num_layers * 2 * half;
    const int64_t per_row = group * n; /* row r's scores: scores + r * per_row, [group][lens[r]] */
    const int64_t floats = (rows * per_row + (kind == KV_I8 ? 2 * n : 0) + 1) & ~(int64_t)1; /* pointers aligned */
    float* scores = malloc(sizeof(float) * (size_t)floats + 2 * sizeof(char*) * (size_t)n);
    float* key_scales = scores + rows * per_row; /* int8: each key's and value's scale (its page's) */
    float* value_scales = key_scales + n;
    const char** keys = (const char**)(scores + floats);
    const char** values = keys + n;
    for (int64_t t0 = 0, p = 0; t0 < n; t0 += a->page_size, p++) { /* page by page: no division per token */
        const char* block = cache + pages[p] * page_stride + layer * 2 * half;
        const char* k = block + h * row;
        for (int64_t t = t0; t < n && t < t0 + a->page_size; t++, k += token_stride) {
            keys[t] = k;
            values[t] = k + half;
        }
        if (kind == KV_I8) {
            const float* sc = (const float*)(block + a->page_size * token_stride) + h;
            const float ks = sc[0], vs = *(const float*)((const char*)sc + half);
            for (int64_t t = t0; t < n && t < t0 + a->page_size; t++) {
                key_scales[t] = ks;
                value_scales[t] = vs;
            }
        }
    }
    const int64_t whole = dim % 8 == 0 ? 8 : n + 1; /* keys scored 8 at a time up to each row's last whole block */
    for (int64_t t = 0; t + whole <= n; t += 8) {
        for (int i = 8; i < 16 && t + i < n; i++) /* the next block's keys: their lines are K strides apart */
            for (int64_t c = 0; c < row; c += 64) _mm_prefetch(keys[t + i] + c, _MM_HINT_T0);
        for (int64_t r = 0; r < rows; r++)
            if (t + 8 <= lens[r])
                for (int64_t g = 0; g < group; g++)
                    score8(q + r * q_stride + g * dim, keys + t, dim, a->scale,
                           scores + r * per_row + g * lens[r] + t, kind);
    }
    float total[ROWS][64];
    for (int64_t r = 0; r < rows; r++) {
        const int64_t nr = lens[r], tail = whole == 8 ? nr & ~(int64_t)7 : 0;
        for (int64_t g = 0; g < group; g++) {
            float* sr = scores + r * per_row + g * nr;
            for (int64_t t = tail; t < nr; t++) sr[t] = score1(q + r * q_stride + g * dim, keys[t], dim, a->scale, kind);
            if (kind == KV_I8)
                for (int64_t t = 0; t < nr; t++) sr[t] *= key_scales[t];
            float best = sr[0];
            for (int64_t t = 1; t < nr; t++) best = sr[t] > best ? sr[t] : best;
            total[r][g] = exp_shifted(sr, nr, best);
            if (kind == KV_I8)
                for (int64_t t = 0; t < nr; t++) sr[t] *= value_scales[t];
        }
    }
    if (dim % 8 == 0) {
        for (int64_t t0 = 0; t0 < n; t0 += VALUE_RUN)
            for (int64_t r = 0; r < rows; r++) {
                const int64_t t1 = t0 + VALUE_RUN < lens[r] ? t0 + VALUE_RUN : lens[r];
                for (int64_t g = 0; g < group && t0 < t1; g++) {
                    const float* pg = scores + r * per_row + g * lens[r];
                    float* o = out + r * out_stride + g * dim;
                    int64_t c0 = 0;
                    for (; c0 + 64 <= dim; c0 += 64) values_chunk(pg, values, t0, t1, c0, 8, o, t0 == 0, kind);
                    for (; c0 < dim; c0 += 8) values_chunk(pg, values, t0, t1, c0, 1, o, t0 == 0, kind);
                }
            }
        for (int64_t r = 0; r < rows; r++)
            for (int64_t g = 0; g < group; g++) {
                float* o = out + r * out_stride + g * dim;
                const __m256 inv = _mm256_set1_ps(1.0f / total[r][g]);
                for (int64_t c = 0; c < dim; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), inv));
            }
    } else {
        const int64_t es = kv_bytes(kind);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t g = 0; g < group; g++) {
                const float* pg = scores + r * per_row + g * lens[r];
                float* o = out + r * out_stride + g * dim;
                for (int64_t d = 0; d < dim; d++) o[d] = 0.0f;
                for (int64_t t = 0; t < lens[r]; t++)
                    for (int64_t d = 0; d < dim; d++) o[d] += pg[t] * load1(values[t] + d * es, kind);
                for (int64_t d = 0; d < dim; d++) o[d] /= total[r][g];
            }
    }
    free(scores);
}

typedef void (*AttendRows)(const float*, int64_t, int64_t, const int64_t*, const char*, const int64_t*, int64_t,
                           int64_t, int64_t, const AttnShape*, float*, int64_t);
#define ATTEND_ROWS(name, kind)                                                                                      \
    static void name(const float* q, int64_t qs, int64_t rows, const int64_t* lens, const char* c, const int64_t* p, \
                     int64_t layer, int64_t h, int64_t group, const AttnShape* a, float* out, int64_t os) {          \
        attend_rows(q, qs, rows, lens, c, p, layer, h, group, a, out, os, kind);                                     \
    }
ATTEND_ROWS(attend_rows_f32, KV_F32)
ATTEND_ROWS(attend_rows_f16, KV_F16)
ATTEND_ROWS(attend_rows_bf16, KV_BF16)
ATTEND_ROWS(attend_rows_i8, KV_I8)

/* out[s, h] = softmax(scale * q[s, h] . K[s]) V[s] for every row s and query head h; K[s], V[s] are the first
 * context_lens[s] tokens of the pages page_table[s, :] of `layer`. Query head h reads KV head h / (heads /
 * kv_heads). Up to ROWS consecutive rows whose pages extend each other's (a prompt's rows, each reading its
 * span's pages one position further) are attended together. */
static void attend(const float* q, int64_t q_stride, const void* cache, const int64_t* page_table, int64_t table_stride,
                   const int64_t* context_lens, float* out, int64_t nd, const AttnShape* a, int64_t layer,
                   int nthreads) {
    const int64_t group = a->heads / a->kv_heads;
    const AttendRows head = a->kind == KV_F16 ? attend_rows_f16 : a->kind == KV_BF16 ? attend_rows_bf16
                          : a->kind == KV_I8 ? attend_rows_i8 : attend_rows_f32;
    int64_t* starts = malloc(sizeof(int64_t) * (size_t)(nd + 1));
    int64_t blocks = 0;
    for (int64_t s = 0; s < nd; s++) {
        const int64_t prev = s - 1, used = (context_lens[prev < 0 ? 0 : prev] + a->page_size - 1) / a->page_size;
        const int joins = s > 0 && s - starts[blocks - 1] < ROWS && context_lens[s] >= context_lens[prev] &&
                          memcmp(page_table + s * table_stride, page_table + prev * table_stride,
                                 sizeof(int64_t) * (size_t)used) == 0;
        if (!joins) starts[blocks++] = s;
    }
    starts[blocks] = nd;
    /* Work items: a block's rows over one KV head, or where those are too few to keep the threads busy (a decode
     * step of one or two requests), over one of its query heads: a query head's values are the same either way. */
    const int64_t split = blocks * a->kv_heads < 2 * nthreads ? group : 1, per = group / split;
    #pragma omp parallel for collapse(3) schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t h = 0; h < a->kv_heads; h++)
            for (int64_t part = 0; part < split; part++) {
                const int64_t s = starts[b], last = starts[b + 1] - 1, first = (h * group + part * per) * a->dim;
                head(q + s * q_stride + first, q_stride, last - s + 1, context_lens + s, (const char*)cache,
                     page_table + last * table_stride, layer, h, per, a, out + s * a->heads * a->dim + first,
                     a->heads * a->dim);
            }
    free(starts);
}

void paged_attention(const float* q, const void* cache, const int64_t* page_table,
                            const int64_t* context_lens, float* out, int64_t nd, int64_t heads, int64_t kv_heads,
                            int64_t dim, int64_t page_size, int64_t num_layers, int64_t layer, int64_t max_pages,
                            float scale, int nthreads, int kind) {
    const AttnShape a = {heads, kv_heads, dim, page_size, num_layers, scale, kind};
    attend(q, heads * dim, cache, page_table, max_pages, context_lens, out, nd, &a, layer, nthreads);
}

/* The xor of the n bytes at p (their first n / 128 * 128), read 128 bytes at a time by nthreads threads: the
 * weight-read floor that benchmarks/decode_step.py times a decode step against. */
int64_t read_bytes(const void* p, int64_t n, int nthreads) {
    int64_t total = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(^ : total)
    for (int64_t i = 0; i < n / 128; i++) {
        const __m256i* v = (const __m256i*)((const char*)p + i * 128);
        const __m256i x = _mm256_xor_si256(_mm256_xor_si256(_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)),
                                           _mm256_xor_si256(_mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 3)));
        total ^= _mm256_extract_epi64(x, 0) ^ _mm256_extract_epi64(x, 3);
    }
    return total;
}

/* h = x + residual (residual may be NULL: h = x); out = weight * h / sqrt(mean(h^2) + eps), per row. */
void add_rms_norm(const float* x, const float* residual, const float* weight, float* out, float* h,
                  int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * dim;
        float* hr = h + r * dim;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(residual + r * dim + i));
            _mm256_storeu_ps(hr + i, v);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float sq = hsum(acc);
        for (; i < dim; i++) {
            float v = xr[i] + (residual ? residual[r * dim + i] : 0.0f);
            hr[i] = v;
            sq += v * v;
        }
        const float inv = 1.0f / sqrtf(sq / (float)dim + eps);
        for (i = 0; i < dim; i++) out[r * dim + i] = weight[i] * (hr[i] * inv);
    }
}

/* Rotate-half rotary embedding in place: x [tokens, heads, dim] (rows `row_stride` floats apart, heads
 * contiguous) by cos/sin [tokens, dim]. */
void rope(float* x, const float* cos, const float* sin, int64_t tokens, int64_t heads, int64_t dim,
          int64_t row_stride) {
    const int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const float* c = cos + t * dim;
        const float* s = sin + t * dim;
        for (int64_t h = 0; h < heads; h++) {
            float* v = x + t * row_stride + h * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* out[r, i] = silu(gate_up[r, i]) * gate_up[r, size + i]: the gated MLP's activation. */
void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t size) {
    for (int64_t r = 0; r < rows; r++) {
        const float* g = gate_up + r * 2 * size;
        const float* u = g + size;
        float* o = out + r * size;
        int64_t i = 0;
        const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
        for (; i + 8 <= size; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
        }
        for (; i < size; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* One quantized linear layer (see quant_linear) and one decoder layer's weights for decode_layers. Their ctypes
 * mirror (QLinear and DecodeLayer in cpu_kernels.py) checks itself against struct_layout when the library loads. */
typedef struct {
    const void* w; const float* scale; const float* offset; const float* bias;
    int64_t wbits; /* 4 or 8: a layer's matrices may differ (a Q4_K_M file keeps some wider) */
} QLinear;

typedef struct {
    const float* input_norm;
    QLinear qkv, o;
    const float* post_norm;
    QLinear gate_up, down;
} DecodeLayer;

/* The structs' sizes and their fields' offsets, each struct's size then its fields' offsets in the order
 * declared above: QLinear (w, scale, offset, bias, wbits), then DecodeLayer (input_norm, qkv, o, post_norm, gate_up,
 * down). */
void struct_layout(int64_t* out) {
    const int64_t layout[] = {
        sizeof(QLinear), offsetof(QLinear, w), offsetof(QLinear, scale), offsetof(QLinear, offset),
        offsetof(QLinear, bias), offsetof(QLinear, wbits),
        sizeof(DecodeLayer), offsetof(DecodeLayer, input_norm), offsetof(DecodeLayer, qkv), offsetof(DecodeLayer, o),
        offsetof(DecodeLayer, post_norm), offsetof(DecodeLayer, gate_up), offsetof(DecodeLayer, down),
    };
    for (size_t i = 0; i < sizeof(layout) / sizeof(layout[0]); i++) out[i] = layout[i];
}

static inline void linear(const QLinear* l, const float* x, float* y, int64_t M, int64_t N, int64_t K, int nthreads,
                          int bits) {
    quant_linear(x, l->w, l->scale, l->offset, l->bias, y, M, N, K, nthreads, (int)l->wbits, bits);
}

/* Every decoder layer of a step, in one call: nd rows, one new token each (a decode row, or a prompt row at its
 * position: every row's K/V is stored before any row attends, so a prompt row sees its chunk's earlier keys). `h` holds the token
 * embeddings on entry and the last layer's output on return, `residual` the residual stream (both [nd, hidden]);
 * the model's final norm adds them. Each token's K/V goes to (slot_pages[i], slot_offsets[i]) of the cache
 * [num_pages, num_layers, 2, page_size, kv_heads, dim]; row i attends to the first context_lens[i] tokens of
 * page_table[i * table_stride ...]. cos/sin: [nd, dim], each row's rotary angles. The same arithmetic as the
 * layer-by-layer path through the kernels above, without a return to Python between the steps. */
void decode_layers(const DecodeLayer* layers, int64_t num_layers, float* h, float* residual,
                   const float* cos, const float* sin, void* cache, const int64_t* slot_pages,
                   const int64_t* slot_offsets, const int64_t* page_table, int64_t table_stride,
                   const int64_t* context_lens, int64_t nd, int64_t hidden, int64_t heads, int64_t kv_heads,
                   int64_t dim, int64_t intermediate, int64_t page_size, float eps, float scale, int nthreads, int bits,
                   int kind) {
    const int64_t q_size = heads * dim, kv_size = kv_heads * dim, qkv_size = q_size + 2 * kv_size;
    const int64_t half = kv_block(page_size, kv_heads, dim, kind), page_stride = num_layers * 2 * half; /* bytes */
    const AttnShape a = {heads, kv_heads, dim, page_size, num_layers, scale, kind};
    float* x = malloc(sizeof(float) * (size_t)(nd * (hidden + qkv_size + q_size + 3 * intermediate)));
    float* qkv = x + nd * hidden;
    float* attn = qkv + nd * qkv_size;
    float* gate_up = attn + nd * q_size;
    float* act = gate_up + nd * 2 * intermediate;
    for (int64_t l = 0; l < num_layers; l++) {
        const DecodeLayer* w = layers + l;
        /* layer 0 has no residual yet: its input is the embedding itself */
        add_rms_norm(h, l ? residual : NULL, w->input_norm, x, residual, nd, hidden, eps);
        linear(&w->qkv, x, qkv, nd, qkv_size, hidden, nthreads, bits);
        rope(qkv, cos, sin, nd, heads + kv_heads, dim, qkv_size);
        for (int64_t i = 0, run; i < nd; i += run) {
            /* a run of consecutive slots in one page (kv_format.segments): an int8 page's scale grows once a run */
            for (run = 1; i + run < nd && slot_pages[i + run] == slot_pages[i] &&
                          slot_offsets[i + run] == slot_offsets[i] + run; run++) {}
            char* k = (char*)cache + slot_pages[i] * page_stride + l * 2 * half;
            const float* src = qkv + i * qkv_size + q_size;
            if (kind == KV_I8) {
                for (int64_t h = 0; h < kv_heads; h++) {
                    store_i8((int8_t*)k, slot_offsets[i], run, src + h * dim, qkv_size, h, kv_heads, dim, page_size);
                    store_i8((int8_t*)(k + half), slot_offsets[i], run, src + kv_size + h * dim, qkv_size, h, kv_heads,
                             dim, page_size);
                }
                continue;
            }
            for (int64_t t = 0; t < run; t++) {
                store_kv(k, slot_offsets[i] + t, src + t * qkv_size, kv_heads, dim, page_size, kind);
                store_kv(k + half, slot_offsets[i] + t, src + t * qkv_size + kv_size, kv_heads, dim, page_size, kind);
            }
        }
        attend(qkv, qkv_size, cache, page_table, table_stride, context_lens, attn, nd, &a, l, nthreads);
        linear(&w->o, attn, h, nd, hidden, q_size, nthreads, bits);
        add_rms_norm(h, residual, w->post_norm, x, residual, nd, hidden, eps);
        linear(&w->gate_up, x, gate_up, nd, 2 * intermediate, hidden, nthreads, bits);
        silu_mul(gate_up, act, nd, intermediate);
        linear(&w->down, act, h, nd, hidden, intermediate, nthreads, bits);
    }
    free(x);
}
