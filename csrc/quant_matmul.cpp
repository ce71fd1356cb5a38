// CPU matmul against GGML block-quantized weights: see quant_matmul.h for the formats and the
// contract.
//
// Two implementations of every loop: portable C++ (any CPU, and the reference the tests hold the
// fast one to) and AVX + FMA + F16C, chosen at run time. The fast one decodes a block's 32
// weights into four 8-wide float vectors once and multiplies them with up to four rows of x
// (one block of weights feeds every row of a small batch), keeping one vector accumulator per
// row of x. The 4-bit formats use  sum_j (d q_j + m) x_j = d * sum_j q_j x_j + m * sum_j x_j
// with the block sums of x computed once per call, so a block costs one multiply by d, not 32
// (Q4_0 and Q8_0 are read the same way, with an offset: see rows_avx).
//
// Threads: a small persistent pool (workers spin briefly, then sleep on a condition variable),
// so that a decode step's ~120 calls do not each pay for starting threads. Work is split over
// the rows of W; the calling thread takes a share too and the GIL is released by the binding.
#include "quant_matmul.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GENFUSE_X86 1
#define GENFUSE_AVX __attribute__((target("avx,fma,f16c,sse4.1")))
#endif

namespace genfuse {

int64_t block_bytes(int type) {
    switch (static_cast<QType>(type)) {
        case QType::Q4_0: return 18;
        case QType::Q4_1: return 20;
        case QType::Q8_0: return 34;
    }
    return 0;
}

namespace {

// ------------------------------------------------------------------ portable pieces

uint16_t load_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// IEEE half -> float, exactly (subnormals, infinities and NaNs included).
float half_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  // subnormal: shift the mantissa up to an implicit leading one
        exp = 113;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            --exp;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// The 32 weights of one block as float32, computed as gguf.quants does (multiply, then add).
void decode_block(const uint8_t* blk, QType type, float* out) {
    const float d = half_to_float(load_u16(blk));
    if (type == QType::Q8_0) {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
        for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(q[j]) * d;
        return;
    }
    const bool has_min = type == QType::Q4_1;
    const float m = has_min ? half_to_float(load_u16(blk + 2)) : 0.0f;
    const uint8_t* q = blk + (has_min ? 4 : 2);
    for (int i = 0; i < 16; ++i) {
        const int lo = q[i] & 0x0f, hi = q[i] >> 4;
        if (has_min) {
            out[i] = d * static_cast<float>(lo) + m;
            out[i + 16] = d * static_cast<float>(hi) + m;
        } else {
            out[i] = d * static_cast<float>(lo - 8);
            out[i + 16] = d * static_cast<float>(hi - 8);
        }
    }
}

struct Problem {
    const float* x;
    int64_t M, K;
    const uint8_t* w;
    int64_t N;
    QType type;
    float* y;
    int64_t nb;         // blocks per row: K / 32
    int64_t row_bytes;  // nb * block bytes
    const float* xsum;  // (M, nb) block sums of x
};

void rows_portable(const Problem& p, int64_t n0, int64_t n1) {
    float buf[kQBlock];
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = p.w + n * p.row_bytes;
        for (int64_t m = 0; m < p.M; ++m) {
            const float* xr = p.x + m * p.K;
            float acc = 0.0f;
            for (int64_t b = 0; b < p.nb; ++b) {
                decode_block(row + b * (p.row_bytes / p.nb), p.type, buf);
                for (int j = 0; j < 32; ++j) acc += buf[j] * xr[b * 32 + j];
            }
            p.y[m * p.N + n] = acc;
        }
    }
}

// ------------------------------------------------------------------ AVX + FMA + F16C

#ifdef GENFUSE_X86
// Eight bytes (u16 lanes of value 0..255) -> eight floats equal to value * 2^-24, in ONE
// instruction: a u16 below 1024 is the bit pattern of an fp16 subnormal, value * 2^-24 exactly,
// and F16C's vcvtph2ps converts subnormals exactly. The 2^24 goes into the block scale.
GENFUSE_AVX inline __m256 u16x8_to_ps_scaled(__m128i v) { return _mm256_cvtph_ps(v); }

GENFUSE_AVX inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

GENFUSE_AVX inline float f16(const uint8_t* p) { return _cvtsh_ss(load_u16(p)); }

// Rows [n0, n1) of W against MC rows of x starting at m0.
//
// Every format is read as unsigned bytes u plus an offset:  w = d u + m  with
// Q4_1: u = q, m = m;  Q4_0: u = q, m = -8 d;  Q8_0: u = q + 128 (the byte XOR 0x80), m = -128 d.
// So a block contributes  d * sum_j u_j x_j + m * sum_j x_j  (block sums of x precomputed).
template <QType T, int MC>
GENFUSE_AVX void rows_avx(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
    constexpr int64_t bb = T == QType::Q4_0 ? 18 : T == QType::Q4_1 ? 20 : 34;
    constexpr float two24 = 16777216.0f;
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m128i sign = _mm_set1_epi8(static_cast<char>(0x80));
    const __m128i zero = _mm_setzero_si128();
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* blk = p.w + n * p.row_bytes;
        __m256 acc[MC];
        float macc[MC];
        for (int i = 0; i < MC; ++i) {
            acc[i] = _mm256_setzero_ps();
            macc[i] = 0.0f;
        }
        for (int64_t b = 0; b < p.nb; ++b, blk += bb) {
            __m128i a, c;  // bytes of weights 0..15 and 16..31
            const float d = f16(blk);
            float m;
            if (T == QType::Q8_0) {
                a = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)), sign);
                c = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)), sign);
                m = -128.0f * d;
            } else {
                const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + bb - 16));
                a = _mm_and_si128(q, low4);
                c = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
                m = T == QType::Q4_1 ? f16(blk + 2) : -8.0f * d;
            }
            const __m256 f0 = u16x8_to_ps_scaled(_mm_unpacklo_epi8(a, zero));
            const __m256 f1 = u16x8_to_ps_scaled(_mm_unpackhi_epi8(a, zero));
            const __m256 f2 = u16x8_to_ps_scaled(_mm_unpacklo_epi8(c, zero));
            const __m256 f3 = u16x8_to_ps_scaled(_mm_unpackhi_epi8(c, zero));
            const __m256 dv = _mm256_set1_ps(d * two24);
            for (int i = 0; i < MC; ++i) {
                const float* xb = p.x + (m0 + i) * p.K + b * 32;
                const __m256 s01 = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xb + 8), _mm256_mul_ps(f0, _mm256_loadu_ps(xb)));
                const __m256 s23 = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xb + 24), _mm256_mul_ps(f2, _mm256_loadu_ps(xb + 16)));
                acc[i] = _mm256_fmadd_ps(dv, _mm256_add_ps(s01, s23), acc[i]);
                macc[i] += m * p.xsum[(m0 + i) * p.nb + b];
            }
        }
        for (int i = 0; i < MC; ++i) p.y[(m0 + i) * p.N + n] = hsum(acc[i]) + macc[i];
    }
}

template <QType T>
GENFUSE_AVX void rows_avx_all_m(const Problem& p, int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
        switch (std::min<int64_t>(4, p.M - m0)) {
            case 4: rows_avx<T, 4>(p, m0, n0, n1); break;
            case 3: rows_avx<T, 3>(p, m0, n0, n1); break;
            case 2: rows_avx<T, 2>(p, m0, n0, n1); break;
            default: rows_avx<T, 1>(p, m0, n0, n1); break;
        }
    }
}

bool cpu_has_avx() {
    static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("sse4.1");
    return ok;
}
#else
bool cpu_has_avx() { return false; }
#endif

void rows_any(const Problem& p, int64_t n0, int64_t n1, bool portable) {
#ifdef GENFUSE_X86
    if (!portable && cpu_has_avx()) {
        switch (p.type) {
            case QType::Q4_0: return rows_avx_all_m<QType::Q4_0>(p, n0, n1);
            case QType::Q4_1: return rows_avx_all_m<QType::Q4_1>(p, n0, n1);
            case QType::Q8_0: return rows_avx_all_m<QType::Q8_0>(p, n0, n1);
        }
    }
#endif
    rows_portable(p, n0, n1);
}

// ------------------------------------------------------------------ the thread pool

class Pool {
public:
    // Runs fn(part) for part in [0, parts): part 0 on the caller, the others on workers.
    void run(int parts, const std::function<void(int)>& fn) {
        if (parts <= 1) {
            fn(0);
            return;
        }
        std::lock_guard<std::mutex> serial(run_mu_);  // one job at a time across Python threads
        grow(parts - 1);
        {
            std::lock_guard<std::mutex> lk(mu_);
            job_ = &fn;
            active_ = parts - 1;
            remaining_.store(parts - 1, std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        fn(0);
        while (remaining_.load(std::memory_order_acquire) != 0) {
#ifdef GENFUSE_X86
            _mm_pause();
#else
            std::this_thread::yield();
#endif
        }
    }

    ~Pool() {
        {
            std::lock_guard<std::mutex> lk(mu_);
            stop_ = true;
            generation_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }

private:
    void grow(int n) {
        while (static_cast<int>(workers_.size()) < n) {
            // The generation is read here, before run() bumps it: read by the new thread itself,
            // it could already be the bumped one, and the job would never be seen.
            const int id = static_cast<int>(workers_.size()) + 1;
            const uint64_t seen = generation_.load(std::memory_order_acquire);
            workers_.emplace_back([this, id, seen] { loop(id, seen); });
        }
    }

    void loop(int id, uint64_t seen) {
        for (;;) {
            // Spin for a few microseconds first: the next matmul of a decode step is that close.
            for (int i = 0; i < 20000 && generation_.load(std::memory_order_acquire) == seen; ++i) {
#ifdef GENFUSE_X86
                _mm_pause();
#else
                std::this_thread::yield();
#endif
            }
            const std::function<void(int)>* job;
            int active;
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
                seen = generation_.load(std::memory_order_acquire);
                if (stop_) return;
                job = job_;
                active = active_;
            }
            if (id <= active) {
                (*job)(id);
                remaining_.fetch_sub(1, std::memory_order_acq_rel);
            }
        }
    }

    std::mutex run_mu_, mu_;
    std::condition_variable cv_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* job_ = nullptr;
    int active_ = 0;
    bool stop_ = false;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> remaining_{0};
};

Pool& pool() {
    // Leaked on purpose: joining threads from a static destructor at interpreter exit can hang.
    // A forked child has none of its parent's workers: it starts a pool of its own.
    static Pool* p = nullptr;
    static pid_t owner = 0;
    static std::mutex mu;
    std::lock_guard<std::mutex> lk(mu);
    if (p == nullptr || owner != getpid()) {
        p = new Pool();
        owner = getpid();
    }
    return *p;
}

// Splits [0, n) into `parts` ranges aligned to `align`.
void split(int64_t n, int parts, int part, int64_t align, int64_t* lo, int64_t* hi) {
    const int64_t chunks = (n + align - 1) / align;
    const int64_t per = chunks / parts, extra = chunks % parts;
    const int64_t c0 = part * per + std::min<int64_t>(part, extra);
    const int64_t c1 = c0 + per + (part < extra ? 1 : 0);
    *lo = std::min(n, c0 * align);
    *hi = std::min(n, c1 * align);
}

}  // namespace

bool quant_matmul_uses_avx() { return cpu_has_avx(); }

void quant_matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, QType type,
                  float* y, int threads, bool portable) {
    const int64_t nb = K / kQBlock;
    Problem p{x, M, K, w, N, type, y, nb, nb * block_bytes(static_cast<int>(type)), nullptr};
    std::vector<float> xsum;
    {
        xsum.resize(static_cast<size_t>(M * nb));
        for (int64_t m = 0; m < M; ++m)
            for (int64_t b = 0; b < nb; ++b) {
                float s = 0.0f;
                for (int j = 0; j < 32; ++j) s += x[m * K + b * 32 + j];
                xsum[m * nb + b] = s;
            }
        p.xsum = xsum.data();
    }
    // Below ~64k weights a row split is not worth waking a thread for.
    const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, N * K / 65536)));
    pool().run(parts, [&](int part) {
        int64_t n0, n1;
        split(N, parts, part, 8, &n0, &n1);
        if (n0 < n1) rows_any(p, n0, n1, portable);
    });
}

void dequantize_rows(const uint8_t* w, int64_t N, int64_t K, QType type, const int64_t* rows,
                     int64_t n_rows, float* out, int threads) {
    const int64_t nb = K / kQBlock, bb = block_bytes(static_cast<int>(type));
    const int64_t count = rows ? n_rows : N;
    const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count * K / 65536)));
    pool().run(parts, [&](int part) {
        int64_t i0, i1;
        split(count, parts, part, 1, &i0, &i1);
        for (int64_t i = i0; i < i1; ++i) {
            const uint8_t* row = w + (rows ? rows[i] : i) * nb * bb;
            for (int64_t b = 0; b < nb; ++b) decode_block(row + b * bb, type, out + i * K + b * 32);
        }
    });
}

}  // namespace genfuse
