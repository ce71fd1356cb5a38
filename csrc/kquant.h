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
// The matmul is qdot.h's integer-dot scheme with llama.cpp's Q8_K grouping: x is quantized by
// quantize_act_k, like quantize_act (Act Q32 / Q16 / Q8, the same rounding) but with one scale dx
// per 256 values, aligned with the K blocks, and the sums sx = dx sum(qx) kept per 32. Per K block
// k and row of x:
//   Q4_K / Q5_K:  y += d dx_k * sum_c sc_c (q . qx)_c  -  sum_c float32(dmin mn_c) * sx_c
//   Q6_K:         y += d dx_k * sum_c (sc_2c (q - 32) . qx[0:16] + sc_2c+1 (q - 32) . qx[16:32])_c
// over its eight chunks c of 32. The scaled dots are integers summed exactly (|sc q| <= 4096,
// |qx| <= 32767: see kquant_simd.inc for why no int32 lane overflows), so per K block one float32
// conversion and scaling (two on the SIMD paths: half a block each) replaces qdot's eight. As for
// qdot, y equals the float64 product of the dequantized weights with the dequantized activations
// dx * qx up to float32 rounding: of the block terms (their int -> float conversion, the scale
// products), of the weights themselves (the float32 w above is rounded once from the exact affine
// value: half an ulp of |w|), and of the sum of those terms and the 8 K / 256 min terms.
// Against the float activations add  sum_k dx_k tau sum_{j in k} |w_j|,  tau = 1/2 (Q16, Q8) or
// 2^-17 (Q32, whose hi + lo / 2^16 is within 2^-17 of x / dx): with dx per 256 rather than 32, a
// row whose values differ widely in size within 256 loses more at 8 and 16 bits than qdot's
// blocks would (the same trade llama.cpp makes); at 32 bits it stays far below float32 rounding.
// tests/runtime/test_kquant.py checks exactly these bounds on every path.
//
// Paths: as qdot's (CpuPath, picked by the caller). The SIMD ones (kquant_simd.inc): avx2 and
// avx-vnni on 256 bits (vpmaddwd / vpdpwssd, vpmaddubsw), avx512 and avx512-vnni with the 16- and
// 32-bit dots on 512 bits; portable C++ is the specification.
#pragma once

#include <cstdint>

#include "qdot.h"
#include "quant_matmul.h"

namespace genfuse {

constexpr int64_t kKBlock = 256;  // weights per K-quant block

// Quantizes x (M, K), K a multiple of 256, as quantize_act does but with one scale per 256
// values: q as quantize_act's (per 32: int8 / int16 values; Q32 32 hi then 32 lo), d (M, K / 256),
// s (M, K / 32) = d * sum(q) of each 32 values.
void quantize_act_k(const float* x, int64_t M, int64_t K, Act act, void* q, float* d, float* s);

// out[0..256) = the float32 weights of one block of K-quant `type`, bitwise as gguf computes them.
void dequantize_kblock(const uint8_t* blk, QType type, float* out);

// y (M, N) = quantize_act(x) (M, K) @ W (N, K)^T for W in a K-quant `type`, K a multiple of 256,
// on `path` (which the caller has checked this CPU runs), `threads` threads split over the rows
// of W (any thread count gives the same bits).
void kquant_matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, QType type,
                   float* y, int threads, CpuPath path, Act act);

}  // namespace genfuse
