// CPU matmul against GGML block-quantized weights: see quant_matmul.h for the formats and the
// contract.
//
// Two implementations of every loop: portable C++ (any CPU, and the reference the tests hold the
// fast one to) and AVX + FMA + F16C, chosen at run time. The fast one decodes a block's 32
// weights into four 8-wide float vectors once and multiplies them with up to four rows of x
// (one block of weights feeds every row of a small batch), keeping one vector accumulator per
// row of x. The 4-bit formats use  sum_j (d q_j + m) x_j = d * sum_j q_j x_j + m * sum_j x_j
// with the block sums of x computed once per call, so a block costs one multiply by d, not 32
// (Q4_0 is read the same way, with m = -8 d; Q8_0 signed, with no offset: see rows_avx).
//
// Threads: chunks of rows of W on the shared pool of threads.h. The binding releases the GIL.
#include "quant_matmul.h"
#include "kquant.h"
#include "threads.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GENFUSE_X86 1
#define GENFUSE_AVX __attribute__((target("avx,fma,f16c,sse4.1")))
#endif

namespace genfuse {

int64_t block_bytes(int type) {
    switch (static_cast<QType>(type)) {
        case QType::Q4_0: return 18;
        case QType::Q4_1: return 20;
        case QType::Q8_0: return 34;
        case QType::Q4_K: return 144;
        case QType::Q5_K: return 176;
        case QType::Q6_K: return 210;
    }
    return 0;
}

int64_t block_weights(int type) {
    if (block_bytes(type) == 0) return 0;
    return is_kquant(static_cast<QType>(type)) ? kKBlock : kQBlock;
}

// IEEE half -> float, exactly (subnormals, infinities and NaNs included).
float half_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  // subnormal: shift the mantissa up to an implicit leading one
        exp = 113;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            --exp;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)  // inf, NaN (quiet, payload's top bits kept)
        return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
    if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
    if (ax < 0x38800000u) {  // a half subnormal (or zero): round ax / 2^-24 to an integer, even ties
        if (ax < 0x33000000u) return static_cast<uint16_t>(sign);  // below half of 2^-24: 0
        const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;  // 14 .. 24 bits off the 24-bit mantissa
        uint32_t q = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
        return static_cast<uint16_t>(sign | q);
    }
    uint32_t h = ((ax >> 13) - (112u << 10));  // rebias 127 -> 15
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may step into the exponent: right
    return static_cast<uint16_t>(sign | h);
}

namespace {

// ------------------------------------------------------------------ portable pieces

uint16_t load_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// The 32 weights of one block as float32, computed as gguf.quants does (multiply, then add).
void decode_block(const uint8_t* blk, QType type, float* out) {
    const float d = half_to_float(load_u16(blk));
    if (type == QType::Q8_0) {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
        for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(q[j]) * d;
        return;
    }
    const bool has_min = type == QType::Q4_1;
    const float m = has_min ? half_to_float(load_u16(blk + 2)) : 0.0f;
    const uint8_t* q = blk + (has_min ? 4 : 2);
    for (int i = 0; i < 16; ++i) {
        const int lo = q[i] & 0x0f, hi = q[i] >> 4;
        if (has_min) {
            out[i] = d * static_cast<float>(lo) + m;
            out[i + 16] = d * static_cast<float>(hi) + m;
        } else {
            out[i] = d * static_cast<float>(lo - 8);
            out[i + 16] = d * static_cast<float>(hi - 8);
        }
    }
}

struct Problem {
    const float* x;
    int64_t M, K;
    const uint8_t* w;
    int64_t N;
    QType type;
    float* y;
    int64_t nb;         // blocks per row: K / 32
    int64_t row_bytes;  // nb * block bytes
    const float* xsum;  // (M, nb) block sums of x
};

void rows_portable(const Problem& p, int64_t n0, int64_t n1) {
    float buf[kQBlock];
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = p.w + n * p.row_bytes;
        for (int64_t m = 0; m < p.M; ++m) {
            const float* xr = p.x + m * p.K;
            float acc = 0.0f;
            for (int64_t b = 0; b < p.nb; ++b) {
                decode_block(row + b * (p.row_bytes / p.nb), p.type, buf);
                for (int j = 0; j < 32; ++j) acc += buf[j] * xr[b * 32 + j];
            }
            p.y[m * p.N + n] = acc;
        }
    }
}

// ------------------------------------------------------------------ AVX + FMA + F16C

#ifdef GENFUSE_X86
// Eight bytes (u16 lanes of value 0..255) -> eight floats equal to value * 2^-24, in ONE
// instruction: a u16 below 1024 is the bit pattern of an fp16 subnormal, value * 2^-24 exactly,
// and F16C's vcvtph2ps converts subnormals exactly. The 2^24 goes into the block scale.
GENFUSE_AVX inline __m256 u16x8_to_ps_scaled(__m128i v) { return _mm256_cvtph_ps(v); }

// Sixteen signed bytes q -> u16 lanes (two halves of eight) that vcvtph2ps reads as q * 2^-24:
// |q| in the low byte and q's own sign bit in the high one make an fp16 subnormal, sign * |q| *
// 2^-24 exactly (|-128| reads as 128).
GENFUSE_AVX inline void signed_bytes_to_f16(__m128i q, __m128i& lo, __m128i& hi) {
    const __m128i mag = _mm_abs_epi8(q), sgn = _mm_and_si128(q, _mm_set1_epi8(static_cast<char>(0x80)));
    lo = _mm_unpacklo_epi8(mag, sgn);
    hi = _mm_unpackhi_epi8(mag, sgn);
}

GENFUSE_AVX inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

GENFUSE_AVX inline float f16(const uint8_t* p) { return _cvtsh_ss(load_u16(p)); }

// Rows [n0, n1) of W against MC rows of x starting at m0.
//
// The 4-bit formats are read as unsigned nibbles u plus an offset:  w = d u + m  with
// Q4_1: m = m;  Q4_0: m = -8 d. So a block contributes  d * sum_j u_j x_j + m * sum_j x_j  (block
// sums of x precomputed). Q8_0 is read signed, w = d q: its offset form, -128 d, would make two
// large sums that cancel and lose float32 digits where x is far from zero mean.
template <QType T, int MC>
GENFUSE_AVX void rows_avx(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
    constexpr int64_t bb = T == QType::Q4_0 ? 18 : T == QType::Q4_1 ? 20 : 34;
    constexpr float two24 = 16777216.0f;
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m128i zero = _mm_setzero_si128();
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* blk = p.w + n * p.row_bytes;
        __m256 acc[MC];
        float macc[MC];
        for (int i = 0; i < MC; ++i) {
            acc[i] = _mm256_setzero_ps();
            macc[i] = 0.0f;
        }
        for (int64_t b = 0; b < p.nb; ++b, blk += bb) {
            __m128i h0, h1, h2, h3;  // u16 lanes of weights 0..7, 8..15, 16..23, 24..31
            const float d = f16(blk);
            float m = 0.0f;
            if (T == QType::Q8_0) {
                signed_bytes_to_f16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)), h0, h1);
                signed_bytes_to_f16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)), h2, h3);
            } else {
                const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + bb - 16));
                const __m128i a = _mm_and_si128(q, low4), c = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
                h0 = _mm_unpacklo_epi8(a, zero);
                h1 = _mm_unpackhi_epi8(a, zero);
                h2 = _mm_unpacklo_epi8(c, zero);
                h3 = _mm_unpackhi_epi8(c, zero);
                m = T == QType::Q4_1 ? f16(blk + 2) : -8.0f * d;
            }
            const __m256 f0 = u16x8_to_ps_scaled(h0), f1 = u16x8_to_ps_scaled(h1);
            const __m256 f2 = u16x8_to_ps_scaled(h2), f3 = u16x8_to_ps_scaled(h3);
            const __m256 dv = _mm256_set1_ps(d * two24);
            for (int i = 0; i < MC; ++i) {
                const float* xb = p.x + (m0 + i) * p.K + b * 32;
                const __m256 s01 = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xb + 8), _mm256_mul_ps(f0, _mm256_loadu_ps(xb)));
                const __m256 s23 = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xb + 24), _mm256_mul_ps(f2, _mm256_loadu_ps(xb + 16)));
                acc[i] = _mm256_fmadd_ps(dv, _mm256_add_ps(s01, s23), acc[i]);
                if (T != QType::Q8_0) macc[i] += m * p.xsum[(m0 + i) * p.nb + b];
            }
        }
        for (int i = 0; i < MC; ++i) p.y[(m0 + i) * p.N + n] = hsum(acc[i]) + macc[i];
    }
}

template <QType T>
GENFUSE_AVX void rows_avx_all_m(const Problem& p, int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
        switch (std::min<int64_t>(4, p.M - m0)) {
            case 4: rows_avx<T, 4>(p, m0, n0, n1); break;
            case 3: rows_avx<T, 3>(p, m0, n0, n1); break;
            case 2: rows_avx<T, 2>(p, m0, n0, n1); break;
            default: rows_avx<T, 1>(p, m0, n0, n1); break;
        }
    }
}

bool cpu_has_avx() {
    static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("sse4.1");
    return ok;
}
#else
bool cpu_has_avx() { return false; }
#endif

void rows_any(const Problem& p, int64_t n0, int64_t n1, bool portable) {
#ifdef GENFUSE_X86
    if (!portable && cpu_has_avx()) {
        switch (p.type) {
            case QType::Q4_0: return rows_avx_all_m<QType::Q4_0>(p, n0, n1);
            case QType::Q4_1: return rows_avx_all_m<QType::Q4_1>(p, n0, n1);
            case QType::Q8_0: return rows_avx_all_m<QType::Q8_0>(p, n0, n1);
            default: break;  // (K-quants never get here: quant_matmul hands them to kquant.h)
        }
    }
#endif
    rows_portable(p, n0, n1);
}

}  // namespace

bool quant_matmul_uses_avx() { return cpu_has_avx(); }

void quant_matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, QType type,
                  float* y, int threads, bool portable) {
    if (is_kquant(type)) {  // the K-quants have only the integer-dot kernel, at its float32-exact width
        kquant_matmul(x, M, K, w, N, type, y, threads, portable ? CpuPath::Portable : supported_cpu_paths().front(),
                      Act::Q32);
        return;
    }
    const int64_t nb = K / kQBlock;
    Problem p{x, M, K, w, N, type, y, nb, nb * block_bytes(static_cast<int>(type)), nullptr};
    threads = clamp_threads(threads);
    std::vector<float> xsum;
    if (type != QType::Q8_0) {  // the 4-bit formats' m (see rows_avx)
        xsum.resize(static_cast<size_t>(M * nb));
        for (int64_t m = 0; m < M; ++m)
            for (int64_t b = 0; b < nb; ++b) {
                float s = 0.0f;
                for (int j = 0; j < 32; ++j) s += x[m * K + b * 32 + j];
                xsum[m * nb + b] = s;
            }
        p.xsum = xsum.data();
    }
    const int64_t rows = std::max<int64_t>(1, chunk_size(N, K, threads, 8));
    const int chunks = static_cast<int>((N + rows - 1) / rows);
    parallel_for(chunks, std::min(threads, chunks) - 1, [&](int c) {
        rows_any(p, c * rows, std::min(N, (c + 1) * rows), portable);
    });
}

void dequantize_rows(const uint8_t* w, int64_t N, int64_t K, QType type, const int64_t* rows,
                     int64_t n_rows, float* out, int threads) {
    const int64_t bw = block_weights(static_cast<int>(type));
    const int64_t nb = K / bw, bb = block_bytes(static_cast<int>(type));
    threads = clamp_threads(threads);
    const int64_t count = rows ? n_rows : N;
    const int64_t per = std::max<int64_t>(1, chunk_size(count, K, threads, 1));
    const int chunks = static_cast<int>((count + per - 1) / per);
    parallel_for(chunks, std::min(threads, chunks) - 1, [&](int c) {
        for (int64_t i = c * per; i < std::min(count, (c + 1) * per); ++i)
            dequantize_row(w + (rows ? rows[i] : i) * nb * bb, K, type, out + i * K);
    });
}

void dequantize_row(const uint8_t* row, int64_t K, QType type, float* out) {
    const int64_t bw = block_weights(static_cast<int>(type));
    const int64_t nb = K / bw, bb = block_bytes(static_cast<int>(type));
    if (is_kquant(type))
        for (int64_t b = 0; b < nb; ++b) dequantize_kblock(row + b * bb, type, out + b * bw);
    else
        for (int64_t b = 0; b < nb; ++b) decode_block(row + b * bb, type, out + b * bw);
}

}  // namespace genfuse
