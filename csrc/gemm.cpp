// gemm_matmul (gemm.h): float32 GEMM over dequantized weight panels.
#include "gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_layer.h"
#include "threads.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GENFUSE_X86 1
#endif

namespace genfuse {
namespace {

// Weight rows a thread dequantizes at once (a multiple of the tile's 4): all of x passes each
// panel, so x's traffic is M K floats per 2 M K kPanel flops; 64 rows of K <= 1536 (<= 384 KiB)
// stay in L2 while it does (16 rows left x streaming from L3: bench/README.md, session 6).
constexpr int64_t kPanel = 64;

// What one instruction set provides: the tile loop over a panel, and a weight row's dequantization.
struct Kernels {
    void (*panel_rows)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
    void (*dequant_row)(const uint8_t*, int64_t, QType, float*);
};

// ------------------------------------------------------------------ portable C++

namespace portable {
void panel_rows(const float* x, int64_t M, int64_t K, const float* panel, int64_t rows, float* y, int64_t ldy) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < rows; ++j) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * panel[j * K + k];
            y[m * ldy + j] = s;
        }
}
constexpr Kernels kKernels{panel_rows, dequantize_row};
}  // namespace portable

#ifdef GENFUSE_X86

// ------------------------------------------------------------------ AVX2 + FMA (256 bits)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
using vf = __m256;
constexpr int64_t W = 8;
constexpr int kMR = 3;  // 12 accumulators + 4 weight vectors of the 16 registers
#include "simd_avx2.inc"
#include "gemm_simd.inc"
constexpr Kernels kKernels{panel_rows, dequant_row};
}  // namespace avx2
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX-512 (512 bits)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
namespace avx512 {
using vf = __m512;
constexpr int64_t W = 16;
constexpr int kMR = 6;  // 24 accumulators + 4 weight vectors + 1 of x, of the 32 registers
#include "simd_avx512.inc"
#include "gemm_simd.inc"
constexpr Kernels kKernels{panel_rows, dequant_row};
}  // namespace avx512
#pragma GCC pop_options

#endif  // GENFUSE_X86

const Kernels& kernels_for(CpuPath path) {
#ifdef GENFUSE_X86
    switch (layer_isa(path)) {
        case LayerIsa::Avx512: return avx512::kKernels;
        case LayerIsa::Avx2: return avx2::kKernels;
        default: break;
    }
#endif
    return portable::kKernels;
}

}  // namespace

void gemm_matmul(const float* x, int64_t M, int64_t K, const GemmWeight& w, int64_t N, float* y, int64_t ldy,
                 int threads, CpuPath path) {
    if (M <= 0 || N <= 0) return;
    threads = clamp_threads(threads);
    const Kernels& kern = kernels_for(path);
    const int64_t bw = w.dense ? 1 : block_weights(static_cast<int>(w.type));
    const int64_t row_bytes = w.dense ? 0 : K / bw * block_bytes(static_cast<int>(w.type));
    // Chunks in multiples of the tile's 4 rows (whole panels would leave a thread idle on
    // N = 576), each in panels of up to kPanel rows.
    const int64_t per = chunk_size(N, M * K, threads, 4);
    const int chunks = static_cast<int>((N + per - 1) / per);
    parallel_for(chunks, std::min(threads, chunks) - 1, [&](int c) {
        thread_local std::vector<float> buf;
        if (static_cast<int64_t>(buf.size()) < kPanel * K) buf.assign(static_cast<size_t>(kPanel * K), 0.0f);
        const int64_t n1 = std::min(N, (c + 1) * per);
        for (int64_t p0 = c * per; p0 < n1; p0 += kPanel) {
            const int64_t rows = std::min(kPanel, n1 - p0);
            const int64_t padded = (rows + 3) / 4 * 4;
            const float* panel;
            if (w.dense != nullptr && rows == padded) {
                panel = w.dense + p0 * K;  // already float32 rows
            } else {
                float* out = buf.data();
                for (int64_t r = 0; r < rows; ++r) {
                    if (w.dense != nullptr) std::memcpy(out + r * K, w.dense + (p0 + r) * K, sizeof(float) * K);
                    else kern.dequant_row(w.blocks + (p0 + r) * row_bytes, K, w.type, out + r * K);
                }
                std::fill(out + rows * K, out + padded * K, 0.0f);
                panel = out;
            }
            kern.panel_rows(x, M, K, panel, rows, y + p0, ldy);
        }
    });
}

}  // namespace genfuse
