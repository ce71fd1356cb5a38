// llama.cpp's K-quants (Q4_K, Q5_K, Q6_K): 256 weights a block, with per-sub-block scales.
//
// Block layouts (little endian; d, dmin IEEE half precision; gguf/quants.py is the reference):
//   Q4_K, 144 bytes: d, dmin, 12 bytes of 6-bit scales sc[8] and mins mn[8], 128 bytes qs
//       sub-block s (32 weights, s = 0..7): q = (qs[32 (s / 2) + l] >> 4 (s % 2)) & 15
//       w = float32(d sc[s]) q - float32(dmin mn[s])
//       sc[j] = b[j] & 63, mn[j] = b[j + 4] & 63 (j < 4); for j >= 4:
//       sc[j] = (b[j + 4] & 15) | (b[j - 4] >> 6) << 4, mn[j] = (b[j + 4] >> 4) | (b[j] >> 6) << 4
//   Q5_K, 176 bytes: d, dmin, the 12 scale bytes, 32 bytes qh, 128 bytes qs
//       q = the Q4_K nibble | ((qh[l] >> s) & 1) << 4, w as Q4_K
//   Q6_K, 210 bytes: 128 bytes ql, 64 bytes qh, 16 int8 scales sc, d
//       chunk c of 32 weights (c = 0..7, h = c / 4, t = c % 4), weight l of it:
//       q = ((ql[64 h + 32 (t % 2) + l] >> 4 (t / 2)) & 15) | ((qh[32 h + l] >> 2 t) & 3) << 4
//       w = float32(d sc[2 c + l / 16]) (q - 32)
// Every product above is computed in float32 as gguf does (so dequantization is bitwise equal).
//
// The matmul is qdot.h's integer-dot scheme unchanged: x is quantized by quantize_act to blocks
// of 32 (Act Q32 / Q16 / Q8: dx, qx, sx = dx sum(qx)); a K block is eight of those, aligned with
// its sub-blocks (Q6_K: two 16-weight sub-blocks per activation block). Per activation block b
// of K block k:
//   Q4_K / Q5_K:  y += float32(d sc) dx_b * (q . qx_b)  -  float32(dmin mn) * sx_b
//   Q6_K:         y += d dx_b * (sc_0 (q - 32) . qx[0:16] + sc_1 (q - 32) . qx[16:32])
// with every dot exact in int32 (|q| <= 32, |qx| <= 32767: a 16-weight dot times |sc| <= 128 is
// below 2^31; the SIMD paths only ever scale partial lane sums of 2 to 4 products). So, as for
// qdot, y equals the float64 product of the dequantized weights with the dequantized activations
// dx * qx up to float32 rounding: of each block term (its int -> float conversion, the scale
// products; a few units of 2^-24 of it), of the weights themselves (the float32 w above is
// rounded once from the exact affine value: half an ulp of |w|), and of the sum of the 8 K / 256
// (plus, for Q4_K / Q5_K, 8 K / 256 min) terms, each at most 2^-24 of the running sum. Against
// the float activations add  sum_b dx_b tau sum_{j in b} |w_j|,  tau = 1/2 (Q16, Q8) or 2^-17
// (Q32, whose hi + lo / 2^16 is within 2^-17 of x / dx). tests/runtime/test_kquant.py checks
// exactly this bound on every path.
//
// Paths: as qdot's (CpuPath, picked by the caller). The SIMD ones (kquant_simd.inc) run 256-bit
// integer dots on every x86 path: vpmaddubsw / vpmaddwd on avx2 and avx512, vpdpbusd / vpdpwssd
// on avx-vnni and avx512-vnni (the 256-bit EVEX form); portable C++ is the specification.
#pragma once

#include <cstdint>

#include "qdot.h"
#include "quant_matmul.h"

namespace genfuse {

constexpr int64_t kKBlock = 256;  // weights per K-quant block

// out[0..256) = the float32 weights of one block of K-quant `type`, bitwise as gguf computes them.
void dequantize_kblock(const uint8_t* blk, QType type, float* out);

// y (M, N) = quantize_act(x) (M, K) @ W (N, K)^T for W in a K-quant `type`, K a multiple of 256,
// on `path` (which the caller has checked this CPU runs), `threads` threads split over the rows
// of W (any thread count gives the same bits).
void kquant_matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, QType type,
                   float* y, int threads, CpuPath path, Act act);

}  // namespace genfuse
