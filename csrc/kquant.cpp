// K-quant dequantization and integer-dot matmul: see kquant.h for the layouts, the scheme and
// its error bound. The portable C++ here is the specification; kquant_simd.inc, compiled below
// once per instruction set under `#pragma GCC target` (as qdot.cpp does), computes the same int32
// dots and differs only in the order of float32 sums.
#include "kquant.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "threads.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GENFUSE_X86 1
#endif

namespace genfuse {
namespace kq {

struct KProblem {
    Act act;
    const void* xq;   // quantize_act_k's values: int8 (Q8), int16 (Q16), int16 hi|lo pairs (Q32)
    const float* xd;  // (M, K / 256) scales, one a K block
    const float* xs;  // (M, K / 32) dx * sum(qx) of each chunk of 32
    int64_t M, K, nb;  // nb: K / 32 chunks a row
    const uint8_t* w;
    int64_t N, row_bytes;
    QType type;
    float* y;
};

inline uint16_t ld16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// Q4_K / Q5_K: the eight 6-bit scales and mins (gguf's Q4_K.get_scale_min), four bytes at a
// time (llama.cpp's masks): out[0..8) = sc, out[8..16) = mn. Every shift is masked back into
// its own byte, so the 32-bit words act as four bytes each.
inline void scale_min(const uint8_t* b, uint8_t* out) {
    uint32_t u[4];
    std::memcpy(u, b, 12);
    constexpr uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
    u[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);  // mn[4..8)
    const uint32_t mn_lo = u[1] & m6;                        // mn[0..4)
    u[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);          // sc[4..8)
    u[2] = mn_lo;
    u[0] &= m6;                                              // sc[0..4)
    std::memcpy(out, u, 16);
}

// The 32 integer weights of chunk c (0..7) of a block: Q4_K / Q5_K q (0..31), Q6_K q - 32.
template <QType T>
inline void chunk_ints(const uint8_t* blk, int c, int8_t* q) {
    if (T == QType::Q6_K) {
        const int h = c / 4, t = c % 4;
        const uint8_t* ql = blk + 64 * h + 32 * (t % 2);
        const uint8_t* qh = blk + 128 + 32 * h;
        for (int l = 0; l < 32; ++l)
            q[l] = static_cast<int8_t>((((ql[l] >> (4 * (t / 2))) & 15) | (((qh[l] >> (2 * t)) & 3) << 4)) - 32);
        return;
    }
    const uint8_t* qs = blk + (T == QType::Q5_K ? 48 : 16) + 32 * (c / 2);
    for (int l = 0; l < 32; ++l) {
        int v = (qs[l] >> (4 * (c % 2))) & 15;
        if (T == QType::Q5_K) v |= ((blk[16 + l] >> c) & 1) << 4;
        q[l] = static_cast<int8_t>(v);
    }
}

template <QType T>
void dequant_t(const uint8_t* blk, float* out) {
    int8_t q[32];
    if (T == QType::Q6_K) {
        const float d = half_to_float(ld16(blk + 208));
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        for (int c = 0; c < 8; ++c) {
            chunk_ints<T>(blk, c, q);
            for (int l = 0; l < 32; ++l) out[32 * c + l] = (d * static_cast<float>(sc[2 * c + l / 16])) * static_cast<float>(q[l]);
        }
        return;
    }
    const float d = half_to_float(ld16(blk)), dmin = half_to_float(ld16(blk + 2));
    uint8_t sm[16];
    scale_min(blk + 4, sm);
    const uint8_t *sc = sm, *mn = sm + 8;
    for (int c = 0; c < 8; ++c) {
        chunk_ints<T>(blk, c, q);
        const float ds = d * static_cast<float>(sc[c]), dm = dmin * static_cast<float>(mn[c]);
        for (int l = 0; l < 32; ++l) out[32 * c + l] = ds * static_cast<float>(q[l]) - dm;
    }
}

// ------------------------------------------------------------------ activations

inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }  // |v| < 2^22 (qdot.cpp)
inline double round_even(double v) { return (v + 6755399441055744.0) - 6755399441055744.0; }

// qdot.cpp's quantize_t with blocks of 256 (one a K block) and the sums kept per 32.
template <int BITS>
void quantize_k_t(const float* x, int64_t M, int64_t K, void* qv, float* d, float* s) {
    using A = std::conditional_t<BITS == 8, int8_t, int16_t>;
    constexpr int32_t Q = BITS == 8 ? 127 : 32767;
    constexpr int64_t xb = BITS == 32 ? 64 : 32;
    A* q = static_cast<A*>(qv);
    for (int64_t r = 0; r < M * K / kKBlock; ++r) {
        const float* xr = x + r * kKBlock;
        float amax = 0.0f;
        bool finite = true;
        for (int j = 0; j < kKBlock; ++j) {
            const float a = std::fabs(xr[j]);
            amax = a > amax ? a : amax;
            finite &= a <= FLT_MAX;  // false for inf and NaN
        }
        if (finite && amax < 0x1p-96f) amax = 0.0f;  // Q / amax would overflow
        const float db = finite ? amax / static_cast<float>(Q) : NAN;
        const bool live = finite && amax > 0.0f;
        d[r] = db;
        const double id64 = live ? 1.0 / static_cast<double>(db) : 0.0;
        const float id32 = live ? static_cast<float>(Q) / amax : 0.0f;
        for (int c = 0; c < 8; ++c) {
            A* qb = q + (r * 8 + c) * xb;
            const float* xc = xr + 32 * c;
            if constexpr (BITS == 32) {
                double dsum = 0.0;
                for (int j = 0; j < 32; ++j) {
                    const double v = live ? static_cast<double>(xc[j]) * id64 : 0.0;
                    const double hi = std::clamp(round_even(v), -double{Q}, double{Q});
                    const double lo = std::clamp(round_even((v - hi) * 65536.0), -32767.0, 32767.0);
                    qb[j] = static_cast<int16_t>(hi);
                    qb[j + 32] = static_cast<int16_t>(lo);
                    dsum += hi + lo * 0x1p-16;
                }
                s[r * 8 + c] = static_cast<float>(static_cast<double>(db) * dsum);
            } else {
                int32_t sum = 0;
                for (int j = 0; j < 32; ++j) {
                    const float v = finite ? xc[j] * id32 : 0.0f;
                    const int32_t qi = std::clamp(static_cast<int32_t>(round_even(v)), -Q, Q);
                    qb[j] = static_cast<A>(qi);
                    sum += qi;
                }
                s[r * 8 + c] = db * static_cast<float>(sum);
            }
        }
    }
}

// ------------------------------------------------------------------ portable matmul

template <class A>
inline int64_t dot(const int8_t* q, const A* x, int n) {
    int64_t s = 0;
    for (int j = 0; j < n; ++j) s += int32_t{q[j]} * int32_t{x[j]};
    return s;
}

// Per K block the scaled integer dots are summed exactly (int64), then scaled once in float32.
template <QType T, int BITS>
void rows_portable_t(const KProblem& p, int64_t n0, int64_t n1) {
    using A = std::conditional_t<BITS == 8, int8_t, int16_t>;
    constexpr int64_t xb = BITS == 32 ? 64 : 32;  // activation values a chunk takes
    const int64_t bb = block_bytes(static_cast<int>(T)), nk = p.K / kKBlock;
    int8_t q[32];
    for (int64_t n = n0; n < n1; ++n) {
        for (int64_t m = 0; m < p.M; ++m) {
            const A* xrow = static_cast<const A*>(p.xq) + m * p.nb * xb;
            const float* xs = p.xs + m * p.nb;
            float acc = 0.0f, macc = 0.0f;
            for (int64_t k = 0; k < nk; ++k) {
                const uint8_t* blk = p.w + n * p.row_bytes + k * bb;
                int64_t hi = 0, lo = 0;
                float d;
                if (T == QType::Q6_K) {
                    d = half_to_float(ld16(blk + 208));
                    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
                    for (int c = 0; c < 8; ++c) {
                        const A* x = xrow + (8 * k + c) * xb;
                        chunk_ints<T>(blk, c, q);
                        hi += sc[2 * c] * dot(q, x, 16) + sc[2 * c + 1] * dot(q + 16, x + 16, 16);
                        if (BITS == 32) lo += sc[2 * c] * dot(q, x + 32, 16) + sc[2 * c + 1] * dot(q + 16, x + 48, 16);
                    }
                } else {
                    d = half_to_float(ld16(blk));
                    const float dmin = half_to_float(ld16(blk + 2));
                    uint8_t sm[16];
                    scale_min(blk + 4, sm);
                    for (int c = 0; c < 8; ++c) {
                        const A* x = xrow + (8 * k + c) * xb;
                        chunk_ints<T>(blk, c, q);
                        hi += sm[c] * dot(q, x, 32);
                        if (BITS == 32) lo += sm[c] * dot(q, x + 32, 32);
                        macc += dmin * static_cast<float>(sm[8 + c]) * xs[8 * k + c];
                    }
                }
                float v = static_cast<float>(hi);
                if (BITS == 32) v += static_cast<float>(lo) * 0x1p-16f;
                acc += d * p.xd[m * nk + k] * v;
            }
            p.y[m * p.N + n] = acc - macc;
        }
    }
}

template <int BITS>
void rows_portable_a(const KProblem& p, int64_t n0, int64_t n1) {
    switch (p.type) {
        case QType::Q4_K: return rows_portable_t<QType::Q4_K, BITS>(p, n0, n1);
        case QType::Q5_K: return rows_portable_t<QType::Q5_K, BITS>(p, n0, n1);
        case QType::Q6_K: return rows_portable_t<QType::Q6_K, BITS>(p, n0, n1);
        default: throw std::invalid_argument("kquant_matmul: not a K-quant type");
    }
}

void rows_portable(const KProblem& p, int64_t n0, int64_t n1) {
    switch (p.act) {
        case Act::Q8: return rows_portable_a<8>(p, n0, n1);
        case Act::Q16: return rows_portable_a<16>(p, n0, n1);
        case Act::Q32: return rows_portable_a<32>(p, n0, n1);
    }
}

}  // namespace kq
}  // namespace genfuse

// ------------------------------------------------------------------ the SIMD paths

#ifdef GENFUSE_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace genfuse::kq::simd_avx2 {
#define GF_WIDE 0
#define GF_ACC16_256(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#include "kquant_simd.inc"
#undef GF_WIDE
#undef GF_ACC16_256
#undef GF_ACC16_512
}  // namespace genfuse::kq::simd_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace genfuse::kq::simd_avxvnni {
#define GF_WIDE 0
#define GF_ACC16_256(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#include "kquant_simd.inc"
#undef GF_WIDE
#undef GF_ACC16_256
#undef GF_ACC16_512
}  // namespace genfuse::kq::simd_avxvnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
namespace genfuse::kq::simd_avx512 {
#define GF_WIDE 1
#define GF_ACC16_256(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define GF_ACC16_512(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#include "kquant_simd.inc"
#undef GF_WIDE
#undef GF_ACC16_256
#undef GF_ACC16_512
}  // namespace genfuse::kq::simd_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace genfuse::kq::simd_avx512vnni {
#define GF_WIDE 1
#define GF_ACC16_256(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#define GF_ACC16_512(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#include "kquant_simd.inc"
#undef GF_WIDE
#undef GF_ACC16_256
#undef GF_ACC16_512
}  // namespace genfuse::kq::simd_avx512vnni
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif

namespace genfuse {

namespace {

using RowsFn = void (*)(const kq::KProblem&, int64_t, int64_t);

RowsFn kernel(CpuPath path) {
    switch (path) {
#ifdef GENFUSE_X86
        case CpuPath::Avx2: return kq::simd_avx2::rows;
        case CpuPath::AvxVnni: return kq::simd_avxvnni::rows;
        case CpuPath::Avx512: return kq::simd_avx512::rows;
        case CpuPath::Avx512Vnni: return kq::simd_avx512vnni::rows;
#endif
        default: return kq::rows_portable;
    }
}

}  // namespace

void dequantize_kblock(const uint8_t* blk, QType type, float* out) {
    switch (type) {
        case QType::Q4_K: return kq::dequant_t<QType::Q4_K>(blk, out);
        case QType::Q5_K: return kq::dequant_t<QType::Q5_K>(blk, out);
        case QType::Q6_K: return kq::dequant_t<QType::Q6_K>(blk, out);
        default: throw std::invalid_argument("dequantize_kblock: not a K-quant type");
    }
}

void quantize_act_k(const float* x, int64_t M, int64_t K, Act act, void* q, float* d, float* s) {
    switch (act) {
        case Act::Q8: return kq::quantize_k_t<8>(x, M, K, q, d, s);
        case Act::Q16: return kq::quantize_k_t<16>(x, M, K, q, d, s);
        case Act::Q32: return kq::quantize_k_t<32>(x, M, K, q, d, s);
    }
}

void kquant_matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, QType type,
                   float* y, int threads, CpuPath path, Act act) {
    if (!is_kquant(type)) throw std::invalid_argument("kquant_matmul: not a K-quant type");
    if (K % kKBlock) throw std::invalid_argument("kquant_matmul: K must be a multiple of 256");
    if (!cpu_path_supported(path))
        throw std::invalid_argument(std::string("CPU path ") + cpu_path_name(path) + " is not supported here");
    if (M <= 0 || N <= 0) return;
    const int64_t nb = K / kQBlock, nk = K / kKBlock;
    // Per-thread scratch reused across calls, as qdot_matmul's.
    thread_local std::vector<int16_t> xq;
    thread_local std::vector<float> xds;
    xq.resize(static_cast<size_t>(act == Act::Q32 ? 2 * M * K : M * K));
    xds.resize(static_cast<size_t>(M * (nk + nb)));
    quantize_act_k(x, M, K, act, xq.data(), xds.data(), xds.data() + M * nk);
    const kq::KProblem p{act, xq.data(), xds.data(), xds.data() + M * nk, M, K, nb, w, N,
                         K / kKBlock * block_bytes(static_cast<int>(type)), type, y};
    const RowsFn fn = kernel(path);
    threads = clamp_threads(threads);
    const int64_t rows = std::max<int64_t>(1, chunk_size(N, K * M, threads, 8));
    const int chunks = static_cast<int>((N + rows - 1) / rows);
    parallel_for(chunks, std::min(threads, chunks) - 1, [&](int c) { fn(p, c * rows, std::min(N, (c + 1) * rows)); });
}

}  // namespace genfuse
