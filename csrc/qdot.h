// Integer-dot CPU matmul against GGML block-quantized weights (Q4_0, Q4_1, Q8_0): the
// activations are quantized once per matmul to blocks of 32 with a float32 scale (llama.cpp's
// scheme), and every block product is an exact int32 dot, scaled once in float32.
//
//   activations, per row m and block b of 32, with Q = 32767 (Q8: 127):
//     dx = amax|x| / Q,  qx = round(x / dx) in [-Q, Q] (half to even),  sx = dx * sum(qx)
//     (a block with amax < 2^-96 is zero: dx = 0, qx = 0)
//   y[m, n] = sum_b  dw dx * sum_j qw_j qx_j  (+ mw * sx for Q4_1, whose w = dw u + mw)
//
// with qw the weight's integer value (Q4_0: u - 8, Q4_1: u, Q8_0: q). Three widths:
//   Q8   int8 qx (llama.cpp's Q8_0 / Q8_1): vpdpbusd, two blocks a 512-bit instruction
//   Q16  int16 qx: vpdpwssd, one block a 512-bit instruction
//   Q32  qx = hi + lo / 2^16 with int16 hi and lo (v = x / dx in double, hi = round(v),
//        lo = round((v - hi) 2^16)): two vpdpwssd a block
// So y equals the float64 product of the dequantized weights with the *dequantized activations*
// dx * qx up to float32 rounding of the per-block terms and their sum; against the float
// activations it differs by at most sum_b dx_b / 2 * sum_{j in b} |w_j| (each qx is within half a
// step of x / dx; for Q32 within 2^-16 of a step, which leaves float32 rounding as the only
// error). Measured on SmolLM2's last logits against transformers: Q32 ~2e-6 relative (as the
// float kernel), Q16 ~1e-4, Q8 ~1e-2 (greedy tokens change within a few steps); the kernels'
// cost here, Q32 : Q16 : Q8, about 1.4 : 1.2 : 1.
// A block holding a NaN or an infinity gets dx = NaN, so non-finite inputs give NaN outputs.
//
// Code paths, picked at run time from CPUID (compiled with target pragmas, so one binary runs
// on any x86-64; portable C++ elsewhere): avx512-vnni (vpdpbusd / vpdpwssd on 512 bits),
// avx-vnni (the same on 256 bits), avx512 (vpmaddubsw / vpmaddwd on 512 bits), avx2 (on 256
// bits), portable. GENFUSE_CPU_PATH=<name> forces one (an unknown name or one this CPU lacks is
// an error naming the choices), else the best this CPU has is used.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "quant_matmul.h"

namespace genfuse {

enum class CpuPath : int { Portable = 0, Avx2 = 1, Avx512 = 2, AvxVnni = 3, Avx512Vnni = 4 };
enum class Act : int { Q8 = 8, Q16 = 16, Q32 = 32 };  // the activation blocks' integer width

const char* cpu_path_name(CpuPath path);
// The path called `name`; std::invalid_argument naming the choices otherwise.
CpuPath parse_cpu_path(const std::string& name);
bool cpu_path_supported(CpuPath path);
// The paths this CPU runs, best first (portable last).
std::vector<CpuPath> supported_cpu_paths();
// GENFUSE_CPU_PATH if set (std::invalid_argument if unknown or unsupported here), else the best.
CpuPath default_cpu_path();

// Quantizes x (M, K), K a multiple of 32, to blocks: q (M, K) int8 (Q8), int16 (Q16) or, for Q32,
// int16 (M, 2K) holding each block's 32 hi then its 32 lo; d and s (M, K / 32) as above.
void quantize_act(const float* x, int64_t M, int64_t K, Act act, void* q, float* d, float* s);

// y (M, N) = quantize_act(x) (M, K) @ W (N, K)^T on `path` (std::invalid_argument if this CPU
// lacks it), `threads` threads, split over the rows of W. y[m, n] is the same bits for any
// thread count and any M, N it is computed in (batch-invariant; qdot.cpp gives the orders).
void qdot_matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, QType type,
                 float* y, int threads, CpuPath path, Act act = Act::Q32);

}  // namespace genfuse
