// Standalone ASan/UBSan drive of the integer-dot kernel (csrc/qdot.cpp), run by csrc/asan_check.sh:
// every CPU path this machine has x activation width x weight type x shape x threads 1..4 against
// the portable path, NaN rows included, and quantize_act on zero, subnormal and infinite blocks.
// Not part of the extension (setup.py compiles csrc/*.cpp only).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include "qdot.h"
using namespace genfuse;
static uint16_t f2h(float f) {  // crude float->half for scales in a normal range
    uint32_t b; std::memcpy(&b, &f, 4);
    uint32_t s = (b >> 16) & 0x8000, e = ((b >> 23) & 0xff) - 127 + 15, m = (b >> 13) & 0x3ff;
    return static_cast<uint16_t>(s | (e << 10) | m);
}
int main() {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    int bad = 0, runs = 0;
    const QType types[] = {QType::Q4_0, QType::Q4_1, QType::Q8_0};
    const Act acts[] = {Act::Q8, Act::Q16, Act::Q32};
    const int64_t shapes[][3] = {{1, 1, 32}, {1, 37, 64}, {2, 20, 96}, {5, 33, 160}, {9, 70, 576}, {4, 17, 1536}};
    for (auto& sh : shapes) {
        const int64_t M = sh[0], N = sh[1], K = sh[2], nb = K / 32;
        std::vector<float> x(M * K);
        for (auto& v : x) v = nd(rng) * 3;
        if (M > 4) x[0] = NAN;  // a NaN row
        for (QType t : types) {
            const int64_t bb = block_bytes(static_cast<int>(t));
            std::vector<uint8_t> w(N * nb * bb);
            for (auto& b : w) b = static_cast<uint8_t>(rng());
            for (int64_t i = 0; i < N * nb; ++i) {  // sane scales
                const uint16_t d = f2h(0.01f + std::fabs(nd(rng)) * 0.1f), m = f2h(-0.05f);
                std::memcpy(&w[i * bb], &d, 2);
                if (t == QType::Q4_1) std::memcpy(&w[i * bb + 2], &m, 2);
            }
            for (Act a : acts) {
                std::vector<float> ref(M * N), y(M * N);
                qdot_matmul(x.data(), M, K, w.data(), N, t, ref.data(), 1, CpuPath::Portable, a);
                for (CpuPath p : supported_cpu_paths())
                    for (int th = 1; th <= 4; ++th) {
                        std::fill(y.begin(), y.end(), 0.0f);
                        qdot_matmul(x.data(), M, K, w.data(), N, t, y.data(), th, p, a);
                        ++runs;
                        for (int64_t i = 0; i < M * N; ++i) {
                            const float r = ref[i], v = y[i];
                            if (std::isnan(r) != std::isnan(v) || (!std::isnan(r) && std::fabs(r - v) > 1e-3f * (1 + std::fabs(r)))) {
                                if (bad++ < 5) std::printf("mismatch path %s act %d type %d M%ld N%ld K%ld i%ld: %g vs %g\n", cpu_path_name(p), (int)a, (int)t, (long)M, (long)N, (long)K, (long)i, r, v);
                            }
                        }
                    }
            }
        }
    }
    // quantize edge cases: zeros, subnormals, inf
    std::vector<float> e(96, 0.0f);
    for (int j = 32; j < 64; ++j) e[j] = 1e-40f;
    e[70] = INFINITY;
    std::vector<int16_t> q(192);
    float d[3], s[3];
    for (Act a : acts) quantize_act(e.data(), 1, 96, a, q.data(), d, s);
    std::printf("runs %d, mismatches %d\n", runs, bad);
    return bad != 0;
}
