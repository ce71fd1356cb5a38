// Integer-dot CPU matmul against GGML blocks: see qdot.h for the scheme and its error bound.
//
// The portable C++ below is the specification; the SIMD paths (qdot_simd.inc, compiled here
// once per instruction set under `#pragma GCC target`) compute the same int32 block dots and
// differ only in the order of the float32 sums. Why integers: decoding a block to float costs
// ~20 instructions per 32 weights on AVX2 and the FMAs that follow another 4; one vpdpbusd
// multiplies 64 byte pairs (two blocks) and adds them in fours into int32, exactly.
//
// Summation orders. Portable: per output, blocks in order, sum_b dw dx dot (+ separately
// sum_b mw xs for Q4_1, added last). SIMD (qdot_simd.inc): each block's dot is four int32 lanes,
// each scaled and summed over the row's groups of 4 (512-bit) or 2 (256-bit) blocks in its own
// float32 lane, Q4_1's mw xs in the block's first lane; then one fixed tree over the 16 or 8 lanes.
// An output's float operations depend only on its weight row and activation row, never on M, N,
// the tile it falls in or the thread count: any batch gives the same bits for the same row.
#include "qdot.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "kquant.h"
#include "threads.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GENFUSE_X86 1
#endif

namespace genfuse {
namespace {

struct QProblem {
    Act act;
    const void* xq;    // (M, K) quantized activations: int8 (Q8) or int16 (Q16)
    const float* xd;   // (M, nb) their block scales
    const float* xs;   // (M, nb) dx * sum(qx) of each block
    int64_t M, K, nb;
    const uint8_t* w;
    int64_t N, row_bytes;
    QType type;
    float* y;
    const uint8_t* xr = nullptr;  // the SIMD paths' activation records (qdot_simd.inc's prepare)
    int64_t ng = 0;               // their groups a row
};

uint16_t ld16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// ------------------------------------------------------------------ portable C++

// The block dot of 32 weights (Q4_0 u - 8, Q4_1 u, Q8_0 q) with 32 integers at x.
template <QType T, class A>
int32_t block_dot(const uint8_t* blk, const A* x) {
    int32_t dot = 0;
    if (T == QType::Q8_0) {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
        for (int j = 0; j < 32; ++j) dot += int32_t{q[j]} * x[j];
    } else {
        const int off = T == QType::Q4_0 ? 8 : 0;
        const uint8_t* q = blk + (T == QType::Q4_1 ? 4 : 2);
        for (int j = 0; j < 16; ++j)
            dot += ((q[j] & 15) - off) * int32_t{x[j]} + ((q[j] >> 4) - off) * int32_t{x[j + 16]};
    }
    return dot;
}

template <QType T, int BITS>
void rows_portable_t(const QProblem& p, int64_t n0, int64_t n1) {
    using A = std::conditional_t<BITS == 8, int8_t, int16_t>;
    constexpr int64_t bb = T == QType::Q4_0 ? 18 : T == QType::Q4_1 ? 20 : 34;
    constexpr int64_t xb = BITS == 32 ? 64 : 32;
    for (int64_t n = n0; n < n1; ++n) {
        for (int64_t m = 0; m < p.M; ++m) {
            const uint8_t* blk = p.w + n * p.row_bytes;
            const A* x = static_cast<const A*>(p.xq) + m * p.nb * xb;
            float acc = 0.0f, macc = 0.0f;
            for (int64_t b = 0; b < p.nb; ++b, blk += bb, x += xb) {
                float dot = static_cast<float>(block_dot<T>(blk, x));
                if (BITS == 32) dot += static_cast<float>(block_dot<T>(blk, x + 32)) * 0x1p-16f;
                acc += half_to_float(ld16(blk)) * p.xd[m * p.nb + b] * dot;
                if (T == QType::Q4_1) macc += half_to_float(ld16(blk + 2)) * p.xs[m * p.nb + b];
            }
            p.y[m * p.N + n] = acc + macc;
        }
    }
}

template <int BITS>
void rows_portable_a(const QProblem& p, int64_t n0, int64_t n1) {
    switch (p.type) {
        case QType::Q4_0: return rows_portable_t<QType::Q4_0, BITS>(p, n0, n1);
        case QType::Q4_1: return rows_portable_t<QType::Q4_1, BITS>(p, n0, n1);
        case QType::Q8_0: return rows_portable_t<QType::Q8_0, BITS>(p, n0, n1);
        default: return;  // K-quants never reach here (qdot_matmul hands them to kquant)
    }
}

void rows_portable(const QProblem& p, int64_t n0, int64_t n1) {
    switch (p.act) {
        case Act::Q8: return rows_portable_a<8>(p, n0, n1);
        case Act::Q16: return rows_portable_a<16>(p, n0, n1);
        case Act::Q32: return rows_portable_a<32>(p, n0, n1);
    }
}

// Round half to even by the 1.5 * 2^23 (float) / 1.5 * 2^52 (double) trick, |v| < 2^22: the
// same bits as vcvtps2dq and nearbyint in the default rounding mode, with no libm call.
inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }
inline double round_even(double v) { return (v + 6755399441055744.0) - 6755399441055744.0; }

// Blocks of x (see qdot.h). BITS 32 stores, per block, the 32 high int16 parts and then the 32
// low ones: v = x * Q / amax in double, hi = round(v), lo = round((v - hi) * 2^16) (|lo| <=
// 2^15, clamped to 32767): hi + lo / 2^16 is within 2^-17 of v, so d * (hi + lo / 2^16) is x to
// about 2^-32 of the block's amax, far below float32's own rounding.
template <int BITS>
void quantize_t(const float* x, int64_t M, int64_t K, void* qv, float* d, float* s) {
    using A = std::conditional_t<BITS == 8, int8_t, int16_t>;
    constexpr int32_t Q = BITS == 8 ? 127 : 32767;
    constexpr int64_t xb = BITS == 32 ? 64 : 32;
    const int64_t nb = K / kQBlock;
    A* q = static_cast<A*>(qv);
    for (int64_t r = 0; r < M * nb; ++r) {
        const float* xr = x + r * kQBlock;
        A* qb = q + r * xb;
        float amax = 0.0f;
        bool finite = true;
        for (int j = 0; j < 32; ++j) {
            const float a = std::fabs(xr[j]);
            amax = a > amax ? a : amax;
            finite &= a <= FLT_MAX;  // false for inf and NaN
        }
        // A block whose values are all below 2^-96 (zero, or subnormal-scale noise) is zero:
        // Q / amax would overflow to infinity for subnormal amax.
        if (finite && amax < 0x1p-96f) amax = 0.0f;
        const float db = finite ? amax / static_cast<float>(Q) : NAN;
        const bool live = finite && amax > 0.0f;
        int32_t sum = 0;
        if constexpr (BITS == 32) {
            const double id = live ? 1.0 / static_cast<double>(db) : 0.0;  // v = x / d, d as stored
            double dsum = 0.0;
            for (int j = 0; j < 32; ++j) {
                const double v = live ? static_cast<double>(xr[j]) * id : 0.0;
                const double hi = std::clamp(round_even(v), -double{Q}, double{Q});
                const double lo = std::clamp(round_even((v - hi) * 65536.0), -32767.0, 32767.0);
                qb[j] = static_cast<int16_t>(hi);
                qb[j + 32] = static_cast<int16_t>(lo);
                dsum += hi + lo * 0x1p-16;
            }
            d[r] = db;
            s[r] = static_cast<float>(static_cast<double>(db) * dsum);
            continue;
        }
        const float id = live ? static_cast<float>(Q) / amax : 0.0f;
        for (int j = 0; j < 32; ++j) {
            const float v = finite ? xr[j] * id : 0.0f;
            const int32_t qi = std::clamp(static_cast<int32_t>(round_even(v)), -Q, Q);
            qb[j] = static_cast<A>(qi);
            sum += qi;
        }
        d[r] = db;
        s[r] = db * static_cast<float>(sum);
    }
}

}  // namespace
}  // namespace genfuse

// ------------------------------------------------------------------ the SIMD paths

#ifdef GENFUSE_X86
// GCC 12's avx512fintrin.h leaves the unused halves of casts and inserts "maybe uninitialized".
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace genfuse::simd_avx2 {
#define GF_WIDE 0
#define GF_VNNI 0
#include "qdot_simd.inc"
#undef GF_WIDE
#undef GF_VNNI
}  // namespace genfuse::simd_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace genfuse::simd_avxvnni {
#define GF_WIDE 0
#define GF_VNNI 1
#include "qdot_simd.inc"
#undef GF_WIDE
#undef GF_VNNI
}  // namespace genfuse::simd_avxvnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
namespace genfuse::simd_avx512 {
#define GF_WIDE 1
#define GF_VNNI 0
#include "qdot_simd.inc"
#undef GF_WIDE
#undef GF_VNNI
}  // namespace genfuse::simd_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace genfuse::simd_avx512vnni {
#define GF_WIDE 1
#define GF_VNNI 1
#include "qdot_simd.inc"
#undef GF_WIDE
#undef GF_VNNI
}  // namespace genfuse::simd_avx512vnni
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif

namespace genfuse {

namespace {

constexpr CpuPath kAll[] = {CpuPath::Avx512Vnni, CpuPath::AvxVnni, CpuPath::Avx512, CpuPath::Avx2, CpuPath::Portable};

bool supported(CpuPath path) {
#ifdef GENFUSE_X86
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                             __builtin_cpu_supports("f16c");
    static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                               __builtin_cpu_supports("avx512vl");
    switch (path) {
        case CpuPath::Portable: return true;
        case CpuPath::Avx2: return avx2;
        case CpuPath::AvxVnni: return avx2 && __builtin_cpu_supports("avxvnni");
        case CpuPath::Avx512: return avx512;
        case CpuPath::Avx512Vnni: return avx512 && __builtin_cpu_supports("avx512vnni");
    }
    return false;
#else
    return path == CpuPath::Portable;
#endif
}

std::string names(const std::vector<CpuPath>& paths) {
    std::string s;
    for (CpuPath p : paths) s += (s.empty() ? "" : ", ") + std::string(cpu_path_name(p));
    return s;
}

using RowsFn = void (*)(const QProblem&, int64_t, int64_t);

struct Kernel {
    size_t (*act_bytes)(const QProblem&);   // nullptr: the portable path reads quantize_act's blocks
    void (*prepare)(QProblem&, uint8_t*);
    RowsFn rows;
};

Kernel kernel(CpuPath path) {
    switch (path) {
#ifdef GENFUSE_X86
        case CpuPath::Avx2: return {simd_avx2::act_bytes, simd_avx2::prepare, simd_avx2::rows};
        case CpuPath::AvxVnni: return {simd_avxvnni::act_bytes, simd_avxvnni::prepare, simd_avxvnni::rows};
        case CpuPath::Avx512: return {simd_avx512::act_bytes, simd_avx512::prepare, simd_avx512::rows};
        case CpuPath::Avx512Vnni: return {simd_avx512vnni::act_bytes, simd_avx512vnni::prepare, simd_avx512vnni::rows};
#endif
        default: return {nullptr, nullptr, rows_portable};
    }
}

}  // namespace

const char* cpu_path_name(CpuPath path) {
    switch (path) {
        case CpuPath::Portable: return "portable";
        case CpuPath::Avx2: return "avx2";
        case CpuPath::Avx512: return "avx512";
        case CpuPath::AvxVnni: return "avx-vnni";
        case CpuPath::Avx512Vnni: return "avx512-vnni";
    }
    return "unknown";
}

CpuPath parse_cpu_path(const std::string& name) {
    for (CpuPath p : kAll)
        if (name == cpu_path_name(p)) return p;
    throw std::invalid_argument("unknown CPU path '" + name + "'; choose one of " +
                                names(std::vector<CpuPath>(std::begin(kAll), std::end(kAll))));
}

bool cpu_path_supported(CpuPath path) { return supported(path); }

std::vector<CpuPath> supported_cpu_paths() {
    std::vector<CpuPath> out;
    for (CpuPath p : kAll)
        if (supported(p)) out.push_back(p);
    return out;
}

CpuPath default_cpu_path() {
    const char* env = std::getenv("GENFUSE_CPU_PATH");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return supported_cpu_paths().front();
    CpuPath p;
    try {
        p = parse_cpu_path(env);
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string("GENFUSE_CPU_PATH: ") + e.what() + " (or auto)");
    }
    if (!supported(p))
        throw std::invalid_argument(std::string("GENFUSE_CPU_PATH=") + env + ": this CPU lacks it; it runs " +
                                    names(supported_cpu_paths()));
    return p;
}

void quantize_act(const float* x, int64_t M, int64_t K, Act act, void* q, float* d, float* s) {
    switch (act) {
        case Act::Q8: return quantize_t<8>(x, M, K, q, d, s);
        case Act::Q16: return quantize_t<16>(x, M, K, q, d, s);
        case Act::Q32: return quantize_t<32>(x, M, K, q, d, s);
    }
}

void qdot_matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, QType type,
                 float* y, int threads, CpuPath path, Act act) {
    if (is_kquant(type)) return kquant_matmul(x, M, K, w, N, type, y, threads, path, act);  // kquant.h
    if (!supported(path))
        throw std::invalid_argument(std::string("CPU path ") + cpu_path_name(path) + " is not supported here; this CPU runs " +
                                    names(supported_cpu_paths()));
    if (M <= 0 || N <= 0) return;
    const int64_t nb = K / kQBlock;
    // Per-thread scratch reused across calls: a decode step makes ~120 of them.
    thread_local std::vector<int16_t> xq;
    thread_local std::vector<float> xds;
    xq.resize(static_cast<size_t>(act == Act::Q32 ? 2 * M * K : M * K));
    xds.resize(static_cast<size_t>(2 * M * nb));
    quantize_act(x, M, K, act, xq.data(), xds.data(), xds.data() + M * nb);
    QProblem p{act, xq.data(), xds.data(), xds.data() + M * nb, M, K, nb, w, N,
               nb * block_bytes(static_cast<int>(type)), type, y};
    const Kernel kern = kernel(path);
    thread_local std::vector<uint64_t> rec;  // 8-byte units; the kernels load it unaligned
    if (kern.prepare != nullptr) {
        rec.resize((kern.act_bytes(p) + 7) / 8);
        kern.prepare(p, reinterpret_cast<uint8_t*>(rec.data()));
    }
    const RowsFn fn = kern.rows;
    threads = clamp_threads(threads);
    const int64_t rows = std::max<int64_t>(1, chunk_size(N, K * M, threads, 8));
    const int chunks = static_cast<int>((N + rows - 1) / rows);
    parallel_for(chunks, std::min(threads, chunks) - 1, [&](int c) { fn(p, c * rows, std::min(N, (c + 1) * rows)); });
}

}  // namespace genfuse
