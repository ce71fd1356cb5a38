// CPU matmul against weights kept in GGML's block formats (Q4_0, Q4_1, Q8_0).
//
// y[m, n] = sum_k x[m, k] * W[n, k] with x, y float32 and W stored as llama.cpp stores it:
// each of the N rows is K / 32 blocks of 32 weights. Decoding a small batch reads every weight
// once per step, so on a CPU the step is bound by the bytes of W: Q4_1 is 0.625 bytes a weight
// against fp32's 4. The weights are decoded in registers, never written out, and the sums are
// float32 throughout; the result equals x @ dequantize(W).T up to float32 rounding: summation
// order, and for Q4_0 / Q4_1 the split d * sum(q x) + m * sum(x), whose terms cancel where x is
// far from zero mean (up to about 1e-5 of sum |x| |w|, against 3e-7 for Q8_0, in the tests).
//
// Block layouts (little endian, `d` and `m` IEEE half precision):
//   Q4_0, 18 bytes: d, 16 bytes of nibbles      w[j] = d * (q[j] - 8)
//   Q4_1, 20 bytes: d, m, 16 bytes of nibbles   w[j] = d * q[j] + m
//   Q8_0, 34 bytes: d, 32 int8                   w[j] = d * q[j]
// where for the 4-bit formats byte i holds q[i] in its low nibble and q[i + 16] in its high one.
#pragma once

#include <cstddef>
#include <cstdint>

namespace genfuse {

// GGML's type ids, as in gguf.GGMLQuantizationType. The K-quants (256 weights a block) are
// kquant.h's; this file's kernels take them too by handing them there.
enum class QType : int { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

constexpr int64_t kQBlock = 32;  // weights per block of Q4_0, Q4_1, Q8_0 (and per sub-block of K)

// Bytes of one block of `type`; 0 for a type this file does not know.
int64_t block_bytes(int type);
// Weights in one block of `type`: 32, or 256 for the K-quants; 0 for an unknown type.
int64_t block_weights(int type);
inline bool is_kquant(QType t) { return t == QType::Q4_K || t == QType::Q5_K || t == QType::Q6_K; }

// y (M, N) = x (M, K) @ W (N, K)^T. K must be a multiple of the block (32; 256 for K-quants); rows of x and y are contiguous
// with strides K and N. Runs on `threads` threads (the caller's included); the work is split
// over the rows of W. Picks AVX/FMA code at run time when the CPU has it, portable C++ else
// (or always, with `portable`: the tests hold the fast code to it).
void quant_matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, QType type,
                  float* y, int threads, bool portable = false);

// out (len(rows), K) = the float32 values of W's rows `rows[i]` (all N rows when rows is null,
// then out is (N, K)). Bitwise what gguf.quants.dequantize computes.
void dequantize_rows(const uint8_t* w, int64_t N, int64_t K, QType type, const int64_t* rows,
                     int64_t n_rows, float* out, int threads);

// The K float32 values of one row of W (K / block blocks of `type` at `row`), as dequantize_rows
// computes them; on the calling thread.
void dequantize_row(const uint8_t* row, int64_t K, QType type, float* out);

// IEEE half precision bits -> float, exactly (subnormals, infinities and NaNs included).
float half_to_float(uint16_t h);
// float -> IEEE half, rounded to nearest even (overflow to inf, NaN kept): what F16C's vcvtps2ph does.
uint16_t float_to_half(float f);

// Whether the AVX/FMA code path is in use on this CPU.
bool quant_matmul_uses_avx();

}  // namespace genfuse
