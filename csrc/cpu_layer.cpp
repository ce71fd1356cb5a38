// The fused CPU decoder layers (cpu_layer.h): the kernels of cpu_layer_simd.inc compiled per
// instruction set, and the layer loop that strings them together with qdot_matmul.
#include "cpu_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "gemm.h"
#include "threads.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GENFUSE_X86 1
#endif

namespace genfuse {
namespace {

// The kernels one instruction set provides.
struct Kernels {
    void (*rms_norm_rows)(const float*, float*, const float*, float, int64_t, int64_t, float*);
    void (*add_rows)(float*, const float*, const float*, int64_t, int64_t);
    void (*rotary_heads)(float*, int64_t, int64_t, const float*, const float*, int64_t);
    void (*swiglu_rows)(const float*, int64_t, int64_t, float*);
    void (*dense_rows)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*);
    void (*attend_rows)(const float*, int64_t, int64_t, const float*, const float*, int64_t, int64_t, int64_t,
                        const int32_t*, int64_t, float, float*, float*);
    // the same over float16 pools, and a K/V row's store into one
    void (*attend_rows_h)(const float*, int64_t, int64_t, const uint16_t*, const uint16_t*, int64_t, int64_t,
                          int64_t, const int32_t*, int64_t, float, float*, float*);
    void (*store_row_h)(const float*, int64_t, uint16_t*);
};

// The Kernels of the namespace it is expanded in.
#define GF_KERNELS                                                                                                   \
    constexpr Kernels kKernels {                                                                                     \
        rms_norm_rows, add_rows, rotary_heads, swiglu_rows, dense_rows, attend_rows<float>, attend_rows<uint16_t>, \
            store_row                                                                                                \
    }

// ------------------------------------------------------------------ portable C++

namespace portable {
using vf = float;
constexpr int64_t W = 1;
inline vf vload(const float* p) { return *p; }
inline void vstore(float* p, vf v) { *p = v; }
inline vf vset1(float x) { return x; }
inline vf vzero() { return 0.0f; }
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vsub(vf a, vf b) { return a - b; }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vdiv(vf a, vf b) { return a / b; }
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline vf vmax(vf a, vf b) { return std::isnan(b) ? b : std::max(a, b); }
inline vf vmin(vf a, vf b) { return std::isnan(b) ? b : std::min(a, b); }
inline float vhsum(vf a) { return a; }
inline void vhsum4(vf a, vf b, vf c, vf d, float* r) { r[0] = a, r[1] = b, r[2] = c, r[3] = d; }
inline float vhmax(vf a) { return a; }
inline vf vload(const uint16_t* p) { return half_to_float(*p); }
inline void vstore(uint16_t* p, vf v) { *p = float_to_half(v); }
#define GF_SCALAR_EXP 1
#include "cpu_layer_simd.inc"
#undef GF_SCALAR_EXP
GF_KERNELS;
}  // namespace portable

#ifdef GENFUSE_X86

// ------------------------------------------------------------------ AVX2 + FMA (256 bits)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
using vf = __m256;
constexpr int64_t W = 8;
#include "simd_avx2.inc"
#include "cpu_layer_simd.inc"
GF_KERNELS;
}  // namespace avx2
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX-512 (512 bits)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
namespace avx512 {
using vf = __m512;
constexpr int64_t W = 16;
#include "simd_avx512.inc"
#include "cpu_layer_simd.inc"
GF_KERNELS;
}  // namespace avx512
#pragma GCC pop_options

#endif  // GENFUSE_X86

const Kernels& kernels_for(LayerIsa isa) {
#ifdef GENFUSE_X86
    if (isa == LayerIsa::Avx512) return avx512::kKernels;
    if (isa == LayerIsa::Avx2) return avx2::kKernels;
#endif
    return portable::kKernels;
}

// Per-thread scratch reused across calls (a step allocates nothing once warm). Each buffer
// only grows.
float* scratch(std::vector<float>& buf, int64_t n) {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
    return buf.data();
}

// y (M, w.N) = x (M, w.K) @ w^T: qdot_matmul (or the dense dot rows) up to kQdotMaxRows rows of
// x, where the weight's bytes bound the time; past it gemm_matmul, where the arithmetic does.
void matmul(const CpuWeight& w, const float* x, int64_t M, float* y, int threads, CpuPath path, Act act,
            const Kernels& kern) {
    if (M > kQdotMaxRows) {
        GemmWeight gw;
        if (w.parts.empty()) {
            gw.dense = w.dense;
            gemm_matmul(x, M, w.K, gw, w.N, y, w.N, threads, path);
            return;
        }
        int64_t col = 0;
        for (const CpuWeight::Part& p : w.parts) {  // each part straight into its own columns
            gw.blocks = p.data, gw.type = p.type;
            gemm_matmul(x, M, w.K, gw, p.rows, y + col, w.N, threads, path);
            col += p.rows;
        }
        return;
    }
    if (w.parts.empty()) {  // dense float32: split over weight rows like qdot_matmul
        const int64_t rows = std::max<int64_t>(1, chunk_size(w.N, w.K * M, threads, 8));
        const int chunks = static_cast<int>((w.N + rows - 1) / rows);
        parallel_for(chunks, std::min(threads, chunks) - 1, [&](int c) {
            kern.dense_rows(x, M, w.K, w.dense, w.N, c * rows, std::min(w.N, (c + 1) * rows), y);
        });
        return;
    }
    if (w.parts.size() == 1) {
        qdot_matmul(x, M, w.K, w.parts[0].data, w.N, w.parts[0].type, y, threads, path, act);
        return;
    }
    thread_local std::vector<float> part_buf;
    int64_t col = 0;
    for (const CpuWeight::Part& p : w.parts) {  // each part into its own columns
        float* tmp = scratch(part_buf, M * p.rows);
        qdot_matmul(x, M, w.K, p.data, p.rows, p.type, tmp, threads, path, act);
        for (int64_t m = 0; m < M; ++m) std::memcpy(y + m * w.N + col, tmp + m * p.rows, sizeof(float) * p.rows);
        col += p.rows;
    }
}

}  // namespace

LayerIsa layer_isa(CpuPath path) {
    switch (path) {
        case CpuPath::Avx512:
        case CpuPath::Avx512Vnni: return LayerIsa::Avx512;
        case CpuPath::Avx2:
        case CpuPath::AvxVnni: return LayerIsa::Avx2;
        default: return LayerIsa::Portable;
    }
}

const char* layer_isa_name(LayerIsa isa) {
    return isa == LayerIsa::Avx512 ? "avx512" : isa == LayerIsa::Avx2 ? "avx2" : "portable";
}

std::string check_step(const CpuStep& st, const CpuKv& kv) {
    auto s = [](int64_t v) { return std::to_string(v); };
    const int32_t* qsl = st.query_start_loc;
    if (qsl[0] < 0) return "query_start_loc[0]=" + s(qsl[0]) + " is negative";
    for (int64_t b = 0; b < st.B; ++b) {
        if (qsl[b + 1] < qsl[b])
            return "query_start_loc must not decrease: [" + s(b) + "]=" + s(qsl[b]) + " > [" + s(b + 1) + "]=" + s(qsl[b + 1]);
        const int64_t q_len = qsl[b + 1] - qsl[b];
        if (q_len == 0) continue;
        const int64_t len = st.seq_lens[b];
        if (len < q_len || len > st.W * kv.block_size)
            return "seq_lens[" + s(b) + "]=" + s(len) + " must be in [" + s(q_len) + " (its queries), " +
                   s(st.W * kv.block_size) + " (the block table's slots)]";
        for (int64_t j = 0; j < (len + kv.block_size - 1) / kv.block_size; ++j) {
            const int64_t blk = st.block_table[b * st.W + j];
            if (blk < 0 || blk >= kv.num_blocks)
                return "block_table[" + s(b) + ", " + s(j) + "]=" + s(blk) + " is out of range [0, " + s(kv.num_blocks) + ")";
        }
    }
    if (qsl[st.B] > st.N) return "query_start_loc[-1]=" + s(qsl[st.B]) + " exceeds the " + s(st.N) + " tokens";
    for (int64_t i = 0; i < st.N; ++i) {
        if (st.positions[i] < 0 || st.positions[i] >= kv.max_positions)
            return "positions[" + s(i) + "]=" + s(st.positions[i]) + " is out of the rotary table's range [0, " +
                   s(kv.max_positions) + ")";
        if (st.slot_mapping[i] >= kv.num_blocks * kv.block_size)
            return "slot_mapping[" + s(i) + "]=" + s(st.slot_mapping[i]) + " is beyond the pools' " +
                   s(kv.num_blocks * kv.block_size) + " slots";
    }
    return "";
}

void cpu_layers_forward(const CpuDims& dm, const std::vector<CpuLayer>& layers, int first, int last,
                        const CpuStep& st, const CpuKv& kv, float* h, float* mlp_out, bool mlp_in, int threads,
                        CpuPath path, Act act) {
    const int64_t N = st.N, H = dm.hidden, D = dm.head_dim, Hq = dm.num_heads, Hkv = dm.num_kv_heads;
    const int64_t G = Hq / Hkv, I = dm.intermediate;
    const int64_t qs = Hq * D, kvs = Hkv * D, nqkv = qs + 2 * kvs;
    if (N == 0 || first >= last) return;
    threads = clamp_threads(threads);
    const Kernels& kern = kernels_for(layer_isa(path));
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));

    thread_local std::vector<float> x_buf, qkv_buf, y_buf, o_buf, gu_buf, act_buf;
    thread_local std::vector<int32_t> seq_buf;
    float* x = scratch(x_buf, N * H);
    float* qkv = scratch(qkv_buf, N * nqkv);
    float* y = scratch(y_buf, N * qs);
    float* o = scratch(o_buf, N * H);
    float* gu = scratch(gu_buf, N * 2 * I);
    float* a = scratch(act_buf, N * I);
    // each token's sequence (-1: a row no sequence owns, whose attention output is zero)
    if (static_cast<int64_t>(seq_buf.size()) < N) seq_buf.resize(static_cast<size_t>(N));
    int32_t* seq_of = seq_buf.data();
    std::fill(seq_of, seq_of + N, -1);
    int64_t ctx_sum = 0;
    for (int64_t b = 0; b < st.B; ++b)
        for (int64_t i = st.query_start_loc[b]; i < st.query_start_loc[b + 1]; ++i) {
            seq_of[i] = static_cast<int32_t>(b);
            ctx_sum += st.seq_lens[b];
        }

    const int64_t bs = kv.block_size;
    const int64_t tok = Hkv * D, blk = bs * tok, layer_stride = kv.num_blocks * blk;
    const int64_t tasks = N * Hkv;
    const int64_t per_task = std::max<int64_t>(1, ctx_sum / N) * G * D * 2;
    const int64_t task_chunk = std::max<int64_t>(1, chunk_size(tasks, per_task, threads, 1));
    const int att_chunks = static_cast<int>((tasks + task_chunk - 1) / task_chunk);
    const int64_t bsp = (bs + 15) / 16 * 16;  // >= roundup(bs, W) for every W
    const int64_t att_scratch = G * bsp + G * D + 2 * G;

    for (int l = first; l < last; ++l) {
        const CpuLayer& lw = layers[static_cast<size_t>(l)];
        // x = rms_norm(h (+ mlp_out)): the MLP residual fused into the norm
        if (l > first || mlp_in) kern.rms_norm_rows(mlp_out, h, lw.input_norm, dm.eps, N, H, x);
        else kern.rms_norm_rows(h, nullptr, lw.input_norm, dm.eps, N, H, x);
        matmul(lw.qkv, x, N, qkv, threads, path, act, kern);  // (N, q + 2 kv)
        if (lw.b_qkv != nullptr) kern.add_rows(qkv, lw.b_qkv, nullptr, N, nqkv);
        // this layer's K/V: rotary, into the pools (float32 or float16), then every query's attention
        auto write_and_attend = [&](auto* kp, auto* vp, auto attend, auto store) {
            for (int64_t i = 0; i < N; ++i) {
                float* row = qkv + i * nqkv;
                const float* c = kv.cos + st.positions[i] * kv.rot_half;
                const float* s = kv.sin + st.positions[i] * kv.rot_half;
                kern.rotary_heads(row, Hq + Hkv, D, c, s, kv.rot_half);  // q and k heads are adjacent
                const int64_t slot = st.slot_mapping[i];
                if (slot >= 0) {  // negative: padding, nothing written
                    store(row + qs, kvs, kp + slot * tok);
                    store(row + qs + kvs, kvs, vp + slot * tok);
                }
            }
            // attention over (token, kv head) pairs, every K/V of the step written first
            parallel_for(att_chunks, std::min(threads, att_chunks) - 1, [&](int c) {
                thread_local std::vector<float> att_buf;
                float* sc = scratch(att_buf, att_scratch);
                const int64_t t1 = std::min(tasks, (c + 1) * task_chunk);
                for (int64_t t = c * task_chunk; t < t1; ++t) {
                    const int64_t i = t / Hkv, g = t % Hkv;
                    float* out = y + i * qs + g * G * D;
                    const int32_t b = seq_of[i];
                    if (b < 0) {
                        std::fill(out, out + G * D, 0.0f);
                        continue;
                    }
                    const int64_t q_len = st.query_start_loc[b + 1] - st.query_start_loc[b];
                    const int64_t ctx = st.seq_lens[b] - q_len + (i - st.query_start_loc[b]) + 1;  // causal, bottom-right
                    attend(qkv + i * nqkv + g * G * D, G, D, kp + g * D, vp + g * D, tok, blk, bs,
                           st.block_table + b * st.W, ctx, scale, out, sc);
                }
            });
        };
        const int64_t at = l * layer_stride;
        if (kv.half)
            write_and_attend(static_cast<uint16_t*>(kv.k) + at, static_cast<uint16_t*>(kv.v) + at, kern.attend_rows_h,
                             kern.store_row_h);
        else
            write_and_attend(static_cast<float*>(kv.k) + at, static_cast<float*>(kv.v) + at, kern.attend_rows,
                             [](const float* src, int64_t n, float* dst) { std::memcpy(dst, src, sizeof(float) * n); });
        matmul(lw.o, y, N, o, threads, path, act, kern);  // (N, hidden)
        kern.add_rows(o, lw.b_o, h, N, H);                // + b_o + h
        std::memcpy(h, o, sizeof(float) * N * H);
        kern.rms_norm_rows(h, nullptr, lw.post_norm, dm.eps, N, H, x);
        matmul(lw.gate_up, x, N, gu, threads, path, act, kern);  // (N, 2 inter)
        if (lw.b_gate_up != nullptr) kern.add_rows(gu, lw.b_gate_up, nullptr, N, 2 * I);
        kern.swiglu_rows(gu, N, I, a);
        matmul(lw.down, a, N, mlp_out, threads, path, act, kern);  // (N, hidden)
        if (lw.b_down != nullptr) kern.add_rows(mlp_out, lw.b_down, nullptr, N, H);
    }
}

}  // namespace genfuse
