// The Llama family's decoder layers on the CPU as one C++ call per engine step: what
// runtime/models/llama.py `Llama.forward_step` computes per layer with torch ops, without the
// per-op Python and allocator cost (a SmolLM2 decode token was ~13 ms of small torch ops next
// to 15 ms of packed matmuls, issue 13).
//
// Per layer l, for the step's N tokens (prefill chunks and decodes mixed, as
// runtime/engine/kv_cache.py `StepInputs` lays them out):
//   h += mlp_out (all but the first layer of a step), x = rms_norm(h) * input_norm
//   qkv = x @ Wqkv^T + b_qkv;  rotary on q and k (llama layout, rotate-half: x1 c - x2 s, x2 c + x1 s)
//   k, v -> the layer's paged pools through slot_mapping (slot < 0: padding, nothing written),
//       float32 or float16 (CpuKv::half: rounded to nearest even; read back widened to float32)
//   y = paged attention of each query over its sequence's blocks, in place (no gathers): causal
//       bottom-right, grouped-query heads, online softmax in float32, scale 1 / sqrt(D)
//   h = y @ Wo^T + b_o + h;  x = rms_norm(h) * post_norm
//   mlp_out = (silu(gate) * up) @ Wdown^T + b_down, with [gate | up] = x @ Wgu^T + b_gu
// leaving (h, mlp_out) as forward_step carries them into the final norm.
//
// Weights are GGML packed blocks or dense float32 rows; the matmul is qdot_matmul (qdot.h) up to
// kQdotMaxRows tokens, gemm_matmul (gemm.h) past it.
// The norms, rotary, attention and SwiGLU are compiled per instruction set (avx512, avx2,
// portable) and picked from the qdot CpuPath: avx512* -> avx512, avx2 / avx-vnni -> avx2.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qdot.h"

namespace genfuse {

// One matmul weight (N, K): dense float32 rows, or row blocks in GGML formats, each part's
// rows going to its own columns of the output (a QKV weight whose V is a bigger type).
struct CpuWeight {
    struct Part {
        const uint8_t* data;
        int64_t rows;
        QType type;
    };
    std::vector<Part> parts;       // empty: dense
    const float* dense = nullptr;  // (N, K) when parts is empty
    int64_t N = 0, K = 0;
};

struct CpuLayer {
    const float* input_norm;  // (hidden,)
    CpuWeight qkv;            // (Hq D + 2 Hkv D, hidden): [Wq; Wk; Wv]
    const float* b_qkv;       // nullable, (Hq D + 2 Hkv D,)
    CpuWeight o;              // (hidden, Hq D)
    const float* b_o;
    const float* post_norm;   // (hidden,)
    CpuWeight gate_up;        // (2 inter, hidden): [Wgate; Wup]
    const float* b_gate_up;
    CpuWeight down;           // (hidden, inter)
    const float* b_down;
};

struct CpuDims {
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate;
    float eps;
};

// The step's tables, int32 as the engine builds them.
struct CpuStep {
    int64_t N, B, W;                 // tokens, sequences, block-table width
    const int32_t* positions;        // (N,)
    const int32_t* slot_mapping;     // (N,)
    const int32_t* block_table;      // (B, W)
    const int32_t* seq_lens;         // (B,) cached tokens including this step's
    const int32_t* query_start_loc;  // (B + 1,)
};

struct CpuKv {
    void* k;  // (num_layers, num_blocks, block_size, Hkv, D): float, or float16 bits where `half`
    void* v;
    int64_t num_layers, num_blocks, block_size;
    const float* cos;  // (max_positions, rot_half)
    const float* sin;
    int64_t max_positions, rot_half;
    bool half = false;  // float16 pools (written rounded to nearest even, read widened to float32)
};

enum class LayerIsa : int { Portable = 0, Avx2 = 1, Avx512 = 2 };
LayerIsa layer_isa(CpuPath path);
const char* layer_isa_name(LayerIsa isa);

// "" if every index the step reads or writes is in range, else a one-line message.
std::string check_step(const CpuStep& step, const CpuKv& kv);

// Layers [first, last) over the step: h and mlp_out (N, hidden) are read and written. With
// mlp_in the first layer starts with h += mlp_out (a step continued from an earlier layer).
// check_step must have passed.
void cpu_layers_forward(const CpuDims& dims, const std::vector<CpuLayer>& layers, int first, int last,
                        const CpuStep& step, const CpuKv& kv, float* h, float* mlp_out, bool mlp_in,
                        int threads, CpuPath path, Act act);

}  // namespace genfuse
