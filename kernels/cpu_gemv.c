/* auto_quant CPU GEMV/GEMM for 2/3/4/8-bit weights with int8-quantized activations.
 *
 * Plain C, no torch headers: auto_quant/inference/cpu_gemv.py compiles it with
 * `gcc -O3 -march=native -shared -fPIC [-fopenmp]` and calls it through ctypes.
 *
 * Packing contract (built once per layer by cpu_gemv.pack_weight): output rows are grouped in
 * tiles of 16 (N padded with zero rows, scale 0). The layout has a bit width `bits`: 4 (codes in
 * 0..15, two per byte) or 8 (codes in 0..255, one per byte). One uint8 buffer `data` holds, in order:
 *   codes   bits 4: uint8 [tiles][K/32][4][16][4]  byte (t, b, u, r, i) holds the code of row 16t + r
 *                           at input 32b + 4u + i in its low nibble and the one at input 32b + 16 + 4u + i
 *                           in its high nibble: one 64-byte word u gives 4 + 4 inputs of all 16 rows,
 *                           one row per int32 lane, as vpdpbusd wants them.
 *           bits 8: uint8 [tiles][K/32][8][16][4]  byte (t, b, u, r, i) is the code of row 16t + r at
 *                           input 32b + 4u + i: one 64-byte word u gives 4 inputs of all 16 rows.
 *   scales  fp16  [tiles][K/32][16]  each block's weight scale (its group's scale, repeated).
 *   zeros   uint8 [tiles][K/32][16]  each block's integer zero point; only when the `zero`
 *                           argument is negative. Otherwise every zero equals `zero` (symmetric
 *                           weights, or zeros folded into the codes at pack time).
 *   w[n][k] = (code[n][k] - zero[n][k / 32]) * scale[n][k / 32];  K % 32 == 0.
 * With 8-bit codes and zeros every integer term stays far inside int32: |code - zero| * 127 * 32 < 2^21.
 *
 * Activations x float32 [M][K] are quantized per row and block of 32 like llama.cpp's Q8_0:
 * d = absmax / 127, q = round(x / d) in int8, and the block sum of q is kept for the zero
 * term. Per block the integer dots sum_j code_j * q_j (u8 x s8, exact in int32) of 16 rows at
 * once get the zero term -zero * sum_j q_j added in integers, are converted to float once and
 * multiplied by scale * d; fp32 accumulation.  y float32 [M][N] = x @ w^T (+ bias).
 *
 * Paths: AVX-512 VNNI (_mm512_dpbusd_epi32, 16 rows x 4 inputs per instruction), AVX2
 * (_mm256_maddubs_epi16 on 8-row halves, summed in int16 per block, then _mm256_madd_epi16; 8-bit codes as
 * two nibbles, which cannot saturate vpmaddubsw), portable scalar C. Activation
 * rows are processed 4 at a time per unpacked weight block, so prefill is not M GEMVs.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define AQ_BLOCK 32
#define AQ_TILE_M 4   /* activation rows per unpacked weight tile */
#define AQ_TILE_N 16  /* weight rows interleaved in one tile */
#define AQ_TILE_BYTES(BITS) (AQ_BLOCK * AQ_TILE_N * (BITS) / 8)  /* code bytes of one block of one tile */
#define AQ_INLINE static inline __attribute__((always_inline))
#define AQ_STACK_SCRATCH 65536
/* Software prefetch distance along the codes (bytes): the codes of all tiles are one sequential stream, and
 * asking for the lines 2 KB ahead of the block being read made the one-thread GEMV 9-12 % faster on a
 * Sapphire-Rapids-class Xeon (docs/bench/kernels.md); a prefetch past the buffer's end does not fault. */
#define AQ_PREFETCH 2048

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define AQ_PATH_VNNI 1
#elif defined(__AVX2__)
#define AQ_PATH_AVX2 1
#endif

/* ----------------------------------------------------------------------------- helpers */

AQ_INLINE float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: renormalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* ------------------------------------------------------------------ activation quantize */

/* One block of 32 floats -> 32 int8 (round to nearest even), returns the scale d; *sum = sum of q. */
AQ_INLINE float quantize_block(const float *x, int8_t *q, int32_t *sum) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 sign = _mm512_set1_ps(-0.0f);
    __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b)));
    float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
    /* max_ps drops NaN: a NaN activation makes the block's scale NaN, so the row's outputs are NaN (as in
     * the float reference) rather than silently finite; an inf already gives a non-finite output */
    if (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q)) d = NAN;
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
    __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    return d;
#else
    float amax = 0.0f;
    int has_nan = 0;
    for (int j = 0; j < AQ_BLOCK; j++) {
        amax = fmaxf(amax, fabsf(x[j]));  /* fmaxf drops NaN */
        has_nan |= x[j] != x[j];
    }
    float d = has_nan ? NAN : amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t s = 0;
    for (int j = 0; j < AQ_BLOCK; j++) {
        long v = lrintf(x[j] * id);
        v = v > 127 ? 127 : (v < -127 ? -127 : v);
        q[j] = (int8_t)v;
        s += (int32_t)v;
    }
    *sum = s;
    return d;
#endif
}

/* Quantize x [M][K] into caller buffers: q int8 [M][K], d float [M][K/32], and
 * zsum int32 [M][K/32] = -zero * (block sum of q), the block's zero term for a constant zero
 * (pass zero = 1 for per-block zeros: the GEMM multiplies by each block's zero). */
void aq_quantize_rows(const float *x, int64_t M, int64_t K, int32_t zero, int8_t *q, float *d, int32_t *zsum) {
    const int64_t nb = K / AQ_BLOCK;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            int32_t s;
            int64_t i = m * K + b * AQ_BLOCK;
            d[m * nb + b] = quantize_block(x + i, q + i, &s);
            zsum[m * nb + b] = -zero * s;
        }
    }
}

/* ------------------------------------------------------------------------ tile dot paths */

/* Each path computes, for one tile of 16 weight rows and MT (<= 4) activation rows,
 * out[m][r] = sum_b scale[r][b] * d[m][b] * (sum_j code[r][j] * q[m][j] + zero term).
 * MT, ZR (per-block zeros) and BITS (4 or 8) are constants at every call site. */

/* Ask for the lines AQ_PREFETCH bytes past the block of codes at p (BITS: its layout). */
AQ_INLINE void prefetch_block(const int BITS, const uint8_t *p) {
    for (int l = 0; l < AQ_TILE_BYTES(BITS); l += 64) __builtin_prefetch(p + AQ_PREFETCH + l, 0, 3);
}

AQ_INLINE int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

#if defined(AQ_PATH_VNNI)

/* One block of a tile as 8 registers: register u holds inputs 4u..4u+3 of the 16 rows, one row
 * per int32 lane. 4 bits: word u's low nibbles are inputs 4u.., its high nibbles 16+4u..;
 * 8 bits: the 8 words as they are. */
AQ_INLINE void load_block(const int BITS, const uint8_t *p, __m512i w[8]) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    if (BITS == 8) {
        for (int u = 0; u < 8; u++) w[u] = _mm512_loadu_si512((const void *)(p + 64 * u));
        return;
    }
    for (int u = 0; u < 4; u++) {
        __m512i v = _mm512_loadu_si512((const void *)(p + 64 * u));
        w[u] = _mm512_and_si512(v, mask);
        w[u + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    }
}

/* One 16-row tile: the 16 rows are the 16 int32 lanes; vpdpbusd multiplies register u's 4 codes
 * per row (u8) with activations 4u..4u+3 (s8) broadcast to every lane. */
AQ_INLINE void tile_rows(const int MT, const int ZR, const int BITS, const uint8_t *wc, const uint16_t *ws, const uint8_t *wz, int64_t nb,
                         const int8_t *q, const float *d, const int32_t *zsum, int64_t K,
                         float out[][AQ_TILE_N]) {
    __m512 acc[AQ_TILE_M];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i w[8];
        prefetch_block(BITS, wc + b * AQ_TILE_BYTES(BITS));
        load_block(BITS, wc + b * AQ_TILE_BYTES(BITS), w);
        __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ws + b * AQ_TILE_N)));
        __m512i zr = ZR ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wz + b * AQ_TILE_N)))
                        : _mm512_setzero_si512();
        for (int m = 0; m < MT; m++) {
            const int8_t *a = q + m * K + b * AQ_BLOCK;
            __m512i lo = _mm512_set1_epi32(zsum[m * nb + b]); /* the zero term: -zero * sum q */
            if (ZR) lo = _mm512_mullo_epi32(zr, lo);
            __m512i hi = _mm512_setzero_si512();
            for (int u = 0; u < 4; u++) {
                lo = _mm512_dpbusd_epi32(lo, w[u], _mm512_set1_epi32(load_i32(a + 4 * u)));
                hi = _mm512_dpbusd_epi32(hi, w[u + 4], _mm512_set1_epi32(load_i32(a + 16 + 4 * u)));
            }
            __m512 sd = _mm512_mul_ps(s, _mm512_set1_ps(d[m * nb + b]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), sd, acc[m]);
        }
    }
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(out[m], acc[m]);
}

#elif defined(AQ_PATH_AVX2)

/* The same tile as two halves of 8 rows (8 int32 lanes each): the first 32 bytes of a 64-byte word are
 * rows 0..7, the last 32 rows 8..15. Products through _mm256_maddubs_epi16 (u8 x s8 pairs, |pair| <=
 * 2 * 15 * 127 = 3810, no saturation): the 8 of one block and half are summed in int16 (|sum| <= 30480)
 * before one _mm256_madd_epi16 widens them, and the activation broadcasts are shared by both halves.
 * 8-bit codes are split into nibbles, code = lo + 16 hi (a pair of 255 * 127 products would saturate
 * vpmaddubsw), each nibble plane with its own int16 sums. */
AQ_INLINE __m256i widen_i16(__m256i s) { return _mm256_madd_epi16(s, _mm256_set1_epi16(1)); }

AQ_INLINE void tile_rows(const int MT, const int ZR, const int BITS, const uint8_t *wc, const uint16_t *ws, const uint8_t *wz, int64_t nb,
                         const int8_t *q, const float *d, const int32_t *zsum, int64_t K,
                         float out[][AQ_TILE_N]) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256 acc[AQ_TILE_M][2];
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = wc + b * AQ_TILE_BYTES(BITS);
        prefetch_block(BITS, p);
        __m256i lo[AQ_TILE_M][2], hi[AQ_TILE_M][2]; /* int16 sums: low nibbles, high nibbles (8-bit codes) */
        for (int m = 0; m < MT; m++) lo[m][0] = lo[m][1] = hi[m][0] = hi[m][1] = _mm256_setzero_si256();
        for (int u = 0; u < (BITS == 8 ? 8 : 4); u++) {
            __m256i w[2][2]; /* [half][low/high nibbles] */
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(p + 64 * u + 32 * h));
                w[h][0] = _mm256_and_si256(v, mask);
                w[h][1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            }
            for (int m = 0; m < MT; m++) {
                const int8_t *a = q + m * K + b * AQ_BLOCK;
                /* 4 bits: the high nibbles are inputs 16 + 4u..; 8 bits: both nibbles are inputs 4u.. */
                const __m256i a0 = _mm256_set1_epi32(load_i32(a + 4 * u));
                const __m256i a1 = BITS == 8 ? a0 : _mm256_set1_epi32(load_i32(a + 16 + 4 * u));
                for (int h = 0; h < 2; h++) {
                    lo[m][h] = _mm256_add_epi16(lo[m][h], _mm256_maddubs_epi16(w[h][0], a0));
                    if (BITS == 8) hi[m][h] = _mm256_add_epi16(hi[m][h], _mm256_maddubs_epi16(w[h][1], a1));
                    else lo[m][h] = _mm256_add_epi16(lo[m][h], _mm256_maddubs_epi16(w[h][1], a1));
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ws + b * AQ_TILE_N + 8 * h)));
            __m256i zr = ZR ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wz + b * AQ_TILE_N + 8 * h)))
                            : _mm256_setzero_si256();
            for (int m = 0; m < MT; m++) {
                __m256i dot = _mm256_set1_epi32(zsum[m * nb + b]); /* the zero term: -zero * sum q */
                if (ZR) dot = _mm256_mullo_epi32(zr, dot);
                dot = _mm256_add_epi32(dot, widen_i16(lo[m][h]));
                if (BITS == 8) dot = _mm256_add_epi32(dot, _mm256_slli_epi32(widen_i16(hi[m][h]), 4));
                __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(d[m * nb + b]));
                acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sd, acc[m][h]);
            }
        }
    }
    for (int m = 0; m < MT; m++) {
        _mm256_storeu_ps(out[m], acc[m][0]);
        _mm256_storeu_ps(out[m] + 8, acc[m][1]);
    }
}

#else /* portable scalar C */

/* Row r's integer dot with one block of activations a (zero term not included). */
AQ_INLINE int32_t block_dot_scalar(const int BITS, const uint8_t *p, int r, const int8_t *a) {
    int32_t dot = 0;
    for (int u = 0; u < (BITS == 8 ? 8 : 4); u++) {
        for (int i = 0; i < 4; i++) {
            const uint8_t c = p[64 * u + 4 * r + i];
            if (BITS == 8) dot += c * a[4 * u + i];
            else dot += (c & 15) * a[4 * u + i] + (c >> 4) * a[16 + 4 * u + i];
        }
    }
    return dot;
}

AQ_INLINE void tile_rows(const int MT, const int ZR, const int BITS, const uint8_t *wc, const uint16_t *ws, const uint8_t *wz, int64_t nb,
                         const int8_t *q, const float *d, const int32_t *zsum, int64_t K,
                         float out[][AQ_TILE_N]) {
    for (int m = 0; m < MT; m++)
        for (int r = 0; r < AQ_TILE_N; r++) out[m][r] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = wc + b * AQ_TILE_BYTES(BITS);
        for (int m = 0; m < MT; m++) {
            const int8_t *a = q + m * K + b * AQ_BLOCK;
            const float dm = d[m * nb + b];
            for (int r = 0; r < AQ_TILE_N; r++) {
                int32_t dot = zsum[m * nb + b] * (ZR ? wz[b * AQ_TILE_N + r] : 1) + block_dot_scalar(BITS, p, r, a);
                out[m][r] += (float)dot * (half_to_float(ws[b * AQ_TILE_N + r]) * dm);
            }
        }
    }
}

#endif

/* ------------------------------------------------------------------------------ GEMM */

/* Output columns of row tiles [t0, t1) for every activation row, from quantized activations. */
static void gemm_tiles(int64_t t0, int64_t t1, int64_t M, int64_t N, int64_t K, int32_t bits, const uint8_t *codes,
                       const uint16_t *scales, const uint8_t *zeros, const float *bias,
                       const int8_t *q, const float *d, const int32_t *zsum, float *y) {
    const int64_t nb = K / AQ_BLOCK;
    float out[AQ_TILE_M][AQ_TILE_N];
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *wc = codes + t * nb * AQ_TILE_BYTES(bits);
        const uint16_t *ws = scales + t * nb * AQ_TILE_N;
        const uint8_t *wz = zeros ? zeros + t * nb * AQ_TILE_N : NULL;
        const int64_t n0 = t * AQ_TILE_N, nr = N - n0 < AQ_TILE_N ? N - n0 : AQ_TILE_N;
        for (int64_t m = 0; m < M; m += AQ_TILE_M) {
            const int64_t mt = M - m < AQ_TILE_M ? M - m : AQ_TILE_M;
            const int8_t *qm = q + m * K;
            const float *dm = d + m * nb;
            const int32_t *zm = zsum + m * nb;
#define AQ_TILE_CALL_ZB(MT, ZR, BITS) tile_rows(MT, ZR, BITS, wc, ws, wz, nb, qm, dm, zm, K, out)
#define AQ_TILE_CALL_B(MT, BITS) (wz ? AQ_TILE_CALL_ZB(MT, 1, BITS) : AQ_TILE_CALL_ZB(MT, 0, BITS))
#define AQ_TILE_CALL(MT) (bits == 8 ? AQ_TILE_CALL_B(MT, 8) : AQ_TILE_CALL_B(MT, 4))
            switch (mt) {
                case 1: AQ_TILE_CALL(1); break;
                case 2: AQ_TILE_CALL(2); break;
                case 3: AQ_TILE_CALL(3); break;
                default: AQ_TILE_CALL(4); break;
            }
#undef AQ_TILE_CALL
#undef AQ_TILE_CALL_B
#undef AQ_TILE_CALL_ZB
            for (int64_t i = 0; i < mt; i++) {
                float *yr = y + (m + i) * N + n0;
                for (int64_t r = 0; r < nr; r++) yr[r] = out[i][r] + (bias ? bias[n0 + r] : 0.0f);
            }
        }
    }
}

/* y [M][N] = x [M][K] @ w^T + bias, w = the packed layer `data` of bit width `bits` (4 or 8): codes,
 * then scales, then per-block zeros when zero < 0 (see the packing contract above); zero >= 0 is the
 * constant zero point. bias may be NULL. threads > 1 splits the row tiles over OpenMP threads when
 * compiled with -fopenmp. Returns 0, -1 when the activation scratch cannot be allocated, -2 for
 * another bit width. */
int aq_gemm(const float *x, float *y, int64_t M, int64_t N, int64_t K, const uint8_t *data, int32_t bits,
            int32_t zero, const float *bias, int32_t threads) {
    if (bits != 4 && bits != 8) return -2;
    const int64_t nb = K / AQ_BLOCK, tiles = (N + AQ_TILE_N - 1) / AQ_TILE_N;
    const uint8_t *codes = data;
    const uint16_t *scales = (const uint16_t *)(data + tiles * nb * AQ_TILE_BYTES(bits));
    const uint8_t *zeros = zero < 0 ? (const uint8_t *)(scales + tiles * nb * AQ_TILE_N) : NULL;
    const size_t need = (size_t)(M * K) + (size_t)(M * nb) * (sizeof(float) + sizeof(int32_t)) + 64;
    _Alignas(64) unsigned char stack[AQ_STACK_SCRATCH];
    unsigned char *scratch = need <= sizeof stack ? stack : (unsigned char *)malloc(need);
    if (!scratch) return -1;
    float *d = (float *)scratch;
    int32_t *zsum = (int32_t *)(d + M * nb);
    int8_t *q = (int8_t *)(zsum + M * nb);
    aq_quantize_rows(x, M, K, zeros ? 1 : zero, q, d, zsum);
#ifdef _OPENMP
    if (threads > 1 && tiles >= 8) {
#pragma omp parallel num_threads(threads)
        {
            const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
            gemm_tiles(tiles * t / nt, tiles * (t + 1) / nt, M, N, K, bits, codes, scales, zeros, bias, q, d, zsum, y);
        }
    } else
#endif
    {
        (void)threads;
        gemm_tiles(0, tiles, M, N, K, bits, codes, scales, zeros, bias, q, d, zsum, y);
    }
    if (scratch != stack) free(scratch);
    return 0;
}

/* One prepared layer, so an eager call passes 5 arguments instead of 10 (ctypes converts each). */
typedef struct {
    int64_t N, K;
    const uint8_t *data;
    const float *bias;
    int32_t bits, zero;
} aq_layer;

/* aq_gemm for a prepared layer (x and y as there). */
int aq_gemm_layer(const aq_layer *L, const float *x, float *y, int64_t M, int32_t threads) {
    return aq_gemm(x, y, M, L->N, L->K, L->data, L->bits, L->zero, L->bias, threads);
}

/* Which vector path this build uses: 2 = AVX-512 VNNI, 1 = AVX2, 0 = scalar C. */
int aq_path(void) {
#if defined(AQ_PATH_VNNI)
    return 2;
#elif defined(AQ_PATH_AVX2)
    return 1;
#else
    return 0;
#endif
}
