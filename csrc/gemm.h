// The CPU matmul for steps of many tokens (prompt chunks, wide decode batches): y = x @ W^T in
// float32, the activations not quantized.
//
// qdot_matmul (qdot.h) streams the weight once per call and is bound by its bytes when x has a
// few rows. With tens of rows or more every weight meets many rows of x and the arithmetic
// dominates: here each thread dequantizes a panel of W rows to float32 into a scratch buffer
// that stays in cache, then runs a register-blocked kernel of MR rows of x against 4 panel rows
// (accumulators 16 lanes wide along K on avx512, 8 on avx2). Dense float32 weights skip the
// dequantization.
//
//   y[m, n] = sum_k x[m, k] w[n, k]: lane l of the accumulator sums k = l, l + L, ... in order by
//   FMA (the tail past the last full vector through a masked load, zeros beyond K), then the L
//   lanes are added by a fixed tree.
//
// That order depends on K only, so y[m, n] has the same bits for any M, N, thread count and
// place in the tile grid (batch-invariant, as qdot_matmul is, though not the same bits as
// qdot_matmul: there the activations are integer blocks). Against the float64 product of x and
// the dequantized weights, |err| <= (ceil(K / L) + log2 L + 1) * 2^-24 * sum_k |x w| (float32
// rounding of the FMA chains and the tree; the tests hold the code to it). The portable path
// sums k in order, one float32 add a term.
#pragma once

#include <cstdint>

#include "qdot.h"
#include "quant_matmul.h"

namespace genfuse {

// Up to this many rows of x the runtime's matmuls take qdot_matmul, past it gemm_matmul (the
// crossover on SmolLM2's shapes, bench/README.md; runtime/quant.py QDOT_MAX_ROWS is the same).
constexpr int64_t kQdotMaxRows = 8;

// A weight (N, K): GGML blocks of `type` (quant_matmul.h's types, K-quants included), or dense
// float32 rows when `dense` is set.
struct GemmWeight {
    const uint8_t* blocks = nullptr;
    QType type = QType::Q8_0;
    const float* dense = nullptr;
};

// y (M, N), rows `ldy` floats apart (ldy >= N), = x (M, K) @ W (N, K)^T on `threads` threads
// (split over the rows of W) with `path`'s vector width: avx512* -> 512 bits, avx2 and
// avx-vnni -> 256, portable. Packed weights need K a multiple of their block; dense any K >= 1.
void gemm_matmul(const float* x, int64_t M, int64_t K, const GemmWeight& w, int64_t N, float* y, int64_t ldy,
                 int threads, CpuPath path);

}  // namespace genfuse
