// The one thread pool of genfuse's CPU kernels (quant_matmul.cpp, qdot.cpp).
//
// A small persistent pool: a decode step makes ~120 matmul calls, which must not each pay for
// starting threads. Work is chunks claimed from a shared counter by the calling thread and the
// workers alike, so a worker the OS descheduled (a busy machine) slows nothing down: the caller
// simply does more chunks. Waiting yields: workers spin ~tens of microseconds for the next job
// (the next matmul of a step comes within microseconds), then sleep on a condition variable;
// the caller waits only for chunks a worker already claimed, yielding its core as it does.
#pragma once

#include <cstdint>
#include <functional>

namespace genfuse {

// Runs fn(c) for every c in [0, chunks), on the calling thread and up to `helpers` workers.
// One job at a time across callers (a second caller waits for the first job to end).
void parallel_for(int chunks, int helpers, const std::function<void(int)>& fn);

// Items per chunk for `threads` threads over n items of `work_per_item` each: about 8 chunks a
// thread (a late thread costs at most a chunk or so), a multiple of `align`; n (one chunk) when
// the whole job is under ~64k units of work, which is not worth waking a second thread.
int64_t chunk_size(int64_t n, int64_t work_per_item, int threads, int64_t align);

// `threads` within [1, the machine's hardware threads]: more would only make workers that fight
// the caller for cores (and a huge value thousands of OS threads).
int clamp_threads(int threads);

}  // namespace genfuse
