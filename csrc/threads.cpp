// The thread pool of genfuse's CPU kernels: see threads.h.
#include "threads.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GENFUSE_X86 1
#endif

namespace genfuse {

namespace {


inline void cpu_relax() {
#ifdef GENFUSE_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
}

class Pool {
public:
    // Runs fn(chunk) for every chunk in [0, chunks), on the calling thread and up to `helpers`
    // workers. Chunks are claimed one at a time from a shared counter, so a worker that wakes
    // late (descheduled on a busy machine) costs nothing: the caller simply does more chunks.
    // The caller only ever waits for chunks a worker has already claimed.
    void run(int chunks, int helpers, const std::function<void(int)>& fn) {
        if (helpers <= 0 || chunks <= 1) {
            for (int c = 0; c < chunks; ++c) fn(c);
            return;
        }
        std::lock_guard<std::mutex> serial(run_mu_);  // one job at a time across Python threads
        grow(helpers);
        uint32_t gen;
        {
            std::lock_guard<std::mutex> lk(mu_);
            gen = ++gen_;
            job_ = &fn;
            chunks_ = chunks;
            helpers_ = helpers;
            done_.store(0, std::memory_order_relaxed);
            state_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);
            wake_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        work(gen, chunks, fn);
        for (int spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) {
            if (spins & 63) cpu_relax();
            else std::this_thread::yield();  // let a descheduled worker finish its chunk
        }
    }

private:
    // Claims the next chunk of job `gen`; -1 once they are all claimed or a newer job started.
    int claim(uint32_t gen, int chunks) {
        uint64_t s = state_.load(std::memory_order_acquire);
        for (;;) {
            if (static_cast<uint32_t>(s >> 32) != gen || static_cast<int>(s & 0xffffffffu) >= chunks) return -1;
            if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) return static_cast<int>(s & 0xffffffffu);
        }
    }

    void work(uint32_t gen, int chunks, const std::function<void(int)>& fn) {
        for (int c; (c = claim(gen, chunks)) >= 0;) {
            fn(c);
            done_.fetch_add(1, std::memory_order_acq_rel);
        }
    }

    void grow(int n) {
        while (static_cast<int>(workers_.size()) < n) {
            // The wake count is read here, before run() bumps it: read by the new thread itself,
            // it could already be the bumped one, and that job would never be seen.
            const int id = static_cast<int>(workers_.size()) + 1;
            const uint64_t seen = wake_.load(std::memory_order_acquire);
            workers_.emplace_back([this, id, seen] { loop(id, seen); });
        }
    }

    void loop(int id, uint64_t seen) {
        for (bool spin = true;;) {
            // Spin a little first: a decode step's next matmul comes within microseconds. A worker
            // the last job did not ask for (a smaller `threads` than the pool has) goes straight
            // to sleep, so that it does not take a core from the threads that do work.
            for (int i = 0; spin && i < 2000 && wake_.load(std::memory_order_acquire) == seen; ++i) cpu_relax();
            const std::function<void(int)>* job;
            uint32_t gen;
            int chunks, helpers;
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return wake_.load(std::memory_order_acquire) != seen; });
                seen = wake_.load(std::memory_order_acquire);
                if (stop_) return;
                job = job_;
                gen = gen_;
                chunks = chunks_;
                helpers = helpers_;
            }
            spin = id <= helpers;
            if (spin) work(gen, chunks, *job);  // claims nothing if that job is over
        }
    }

    std::mutex run_mu_, mu_;
    std::condition_variable cv_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* job_ = nullptr;
    uint32_t gen_ = 0;
    int chunks_ = 0, helpers_ = 0;
    bool stop_ = false;                  // never set: the pool lives as long as the process
    std::atomic<uint64_t> wake_{0};      // bumped once per job: what sleeping workers wait on
    std::atomic<uint64_t> state_{0};     // (job generation << 32) | next unclaimed chunk
    std::atomic<int> done_{0};           // chunks of the current job finished
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

int64_t chunk_size_impl(int64_t n, int64_t weights_per_item, int threads, int64_t align) {
    if (threads <= 1 || n * weights_per_item < 65536) return n;
    const int64_t per = (n + int64_t{threads} * 8 - 1) / (int64_t{threads} * 8);
    return std::max(align, (per + align - 1) / align * align);
}

int clamp_threads_impl(int threads) {
    static const int hw = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    return std::clamp(threads, 1, hw);
}

}  // namespace

void parallel_for(int chunks, int helpers, const std::function<void(int)>& fn) { pool().run(chunks, helpers, fn); }

int64_t chunk_size(int64_t n, int64_t work_per_item, int threads, int64_t align) {
    return chunk_size_impl(n, work_per_item, threads, align);
}

int clamp_threads(int threads) { return clamp_threads_impl(threads); }

}  // namespace genfuse
