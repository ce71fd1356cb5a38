// The paged KV-cache block manager: see block_manager.h, and runtime/block_manager.py for the
// rules. Every mutating call checks everything first and mutates after, so a call that throws
// leaves every state as it was.
#include "block_manager.h"

#include <algorithm>
#include <cstring>

namespace genfuse {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

// The argument is named as the caller wrote it: token_ids[i] for a list, token_id (i < 0).
[[noreturn, gnu::noinline, gnu::cold]] void throw_bad_token(int64_t t, int64_t i) {
    throw std::invalid_argument((i < 0 ? std::string("token_id") : "token_ids[" + str(i) + "]") + "=" + str(t) +
                                " is outside the token id range [0, " + str(kTokenMax) + "]");
}

inline void check_token(int64_t t, int64_t i = -1) {
    if (t < 0 || t > kTokenMax) throw_bad_token(t, i);
}

}  // namespace

uint64_t hash_block_tokens(uint64_t parent_hash, const int32_t* tokens, int64_t n, int hash_bits) {
    uint64_t h = parent_hash;
    for (int64_t i = 0; i < n; ++i) h = (h ^ static_cast<uint64_t>(tokens[i])) * 0x100000001b3ULL;
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    return hash_bits >= 64 ? h : (h & ((uint64_t{1} << hash_bits) - 1));
}

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching,
                           int64_t hash_bits)
    : num_blocks_(num_blocks), block_size_(block_size), caching_(enable_prefix_caching),
      hash_bits_(static_cast<int>(hash_bits)) {
    if (num_blocks < 1 || block_size < 1)
        throw std::invalid_argument("num_blocks=" + str(num_blocks) + " and block_size=" +
                                    str(block_size) + " must be >= 1");
    // Both are >= 1 and each below 2**63, so the quotient test cannot overflow.
    if (num_blocks > kMaxSlots / block_size)
        throw std::invalid_argument("num_blocks=" + str(num_blocks) + " * block_size=" + str(block_size) +
                                    " exceeds 2**31 slots (slot ids are int32)");
    if (hash_bits < 1 || hash_bits > 64)
        throw std::invalid_argument("hash_bits=" + str(hash_bits) + " is outside [1, 64]");
}

// ---- lookups -------------------------------------------------------------------------------

// ---- the sequence slots --------------------------------------------------

int32_t BlockManager::slot(int64_t seq_id) const {
    const int32_t s = index_.find(seq_id);
    if (s < 0) throw UnknownSequence(seq_id);
    return s;
}

int32_t BlockManager::new_slot(int64_t seq_id) {
    int32_t s;
    if (!free_slots_.empty()) {
        s = free_slots_.back();
        free_slots_.pop_back();
    } else {
        s = static_cast<int32_t>(seqs_.size());
        seqs_.emplace_back();
        tails_.resize(tails_.size() + static_cast<size_t>(block_size_));
    }
    index_.insert(seq_id, s);
    return s;
}

std::optional<uint64_t> BlockManager::block_hash(int64_t block_id) const {
    if (block_id < 0 || block_id >= num_blocks_)
        throw std::invalid_argument("block id " + str(block_id) + " is outside [0, " +
                                    str(num_blocks_) + ")");
    if (block_id >= fresh_ || node_of_[block_id] < 0) return std::nullopt;
    return nodes_[node_of_[block_id]].hash;
}

uint64_t BlockManager::node_hash(int32_t parent, const int32_t* tokens) const {
    return hash_block_tokens(parent < 0 ? kRootHash : nodes_[parent].hash, tokens, block_size_,
                             hash_bits_);
}

int32_t BlockManager::find_node(int32_t parent, const int32_t* tokens, uint64_t h) const {
    const size_t bytes = static_cast<size_t>(block_size_) * sizeof(int32_t);
    for (int32_t n = buckets_.find(h); n >= 0; n = nodes_[n].next) {
        if (nodes_[n].parent == parent &&
            std::memcmp(&node_tokens_[static_cast<size_t>(n) * block_size_], tokens, bytes) == 0)
            return n;
    }
    return -1;
}

// ---- the free queue: never-used blocks [fresh_, num_blocks_), then a doubly linked list -----

void BlockManager::queue_push_back(int32_t b) {
    prev_[b] = tail_;
    next_[b] = -1;
    if (tail_ >= 0) next_[tail_] = b; else head_ = b;
    tail_ = b;
    ++free_len_;
}

void BlockManager::queue_remove(int32_t b) {
    if (prev_[b] >= 0) next_[prev_[b]] = next_[b]; else head_ = next_[b];
    if (next_[b] >= 0) prev_[next_[b]] = prev_[b]; else tail_ = prev_[b];
    prev_[b] = next_[b] = -1;
    --free_len_;
}

int32_t BlockManager::pop_free() {
    if (fresh_ < num_blocks_) {
        const auto b = static_cast<int32_t>(fresh_++);
        ref_.push_back(1);
        node_of_.push_back(-1);
        prev_.push_back(-1);
        next_.push_back(-1);
        return b;
    }
    const int32_t b = head_;  // callers checked num_free_blocks(), so the list is not empty
    queue_remove(b);
    if (const int32_t n = node_of_[b]; n >= 0) {  // evict: the block forgets its content
        node_of_[b] = -1;
        if (nodes_[n].block == b) {
            nodes_[n].block = -1;
            --num_registered_;
        }
        release(n);
    }
    ref_[b] = 1;
    return b;
}

void BlockManager::take(int32_t b) {
    if (ref_[b] == 0) queue_remove(b);
    ++ref_[b];
}

void BlockManager::release(int32_t n) {
    while (n >= 0) {
        Node& node = nodes_[n];
        if (--node.refs > 0) return;
        // Unlink n from its bucket.
        int32_t* head = buckets_.find_ptr(node.hash);
        if (*head == n) {
            if (node.next >= 0) *head = node.next; else buckets_.erase(node.hash);
        } else {
            int32_t m = *head;
            while (nodes_[m].next != n) m = nodes_[m].next;
            nodes_[m].next = node.next;
        }
        const int32_t parent = node.parent;
        node = Node{};
        free_nodes_.push_back(n);
        n = parent;
    }
}

void BlockManager::fill(const std::vector<int32_t>& table, size_t i, const int32_t* tokens) {
    const int32_t parent = i ? node_of_[table[i - 1]] : -1;
    const uint64_t h = node_hash(parent, tokens);
    int32_t n = find_node(parent, tokens, h);
    if (n < 0) {
        if (!free_nodes_.empty()) {
            n = free_nodes_.back();
            free_nodes_.pop_back();
        } else {
            n = static_cast<int32_t>(nodes_.size());
            nodes_.emplace_back();
            node_tokens_.resize(node_tokens_.size() + static_cast<size_t>(block_size_));
        }
        std::memcpy(&node_tokens_[static_cast<size_t>(n) * block_size_], tokens,
                    static_cast<size_t>(block_size_) * sizeof(int32_t));
        Node& node = nodes_[n];
        node.hash = h;
        node.parent = parent;
        if (parent >= 0) ++nodes_[parent].refs;
        if (int32_t* head = buckets_.find_ptr(h)) {  // a collision: n heads the bucket
            node.next = *head;
            *head = n;
        } else {
            node.next = -1;
            buckets_.insert(h, n);
        }
    }
    const int32_t b = table[i];
    ++nodes_[n].refs;
    node_of_[b] = n;
    if (nodes_[n].block < 0) {  // else another block holds this content: it stays registered
        nodes_[n].block = b;
        ++num_registered_;
    }
}

// ---- the sequence API ------------------------------------------------------------------------

int64_t BlockManager::allocate(int64_t seq_id, const int64_t* tokens64, int64_t n) {
    for (int64_t i = 0; i < n; ++i) check_token(tokens64[i], i);
    if (index_.find(seq_id) >= 0) throw std::invalid_argument("sequence " + str(seq_id) + " is already live");
    const std::vector<int32_t> tokens(tokens64, tokens64 + n);
    const int64_t bs = block_size_;

    // 1. Prefix hits (pure lookups): whole blocks among the first n - 1 tokens.
    std::vector<int32_t> table;
    table.reserve(static_cast<size_t>((n + bs - 1) / bs));
    int64_t free_hits = 0;
    if (caching_) {
        int32_t parent = -1;
        for (int64_t i = 0; n > 0 && i < (n - 1) / bs; ++i) {
            const int32_t* blk = tokens.data() + i * bs;
            const int32_t node = find_node(parent, blk, node_hash(parent, blk));
            if (node < 0 || nodes_[node].block < 0) break;
            table.push_back(nodes_[node].block);
            free_hits += ref_[nodes_[node].block] == 0;
            parent = node;
        }
    }
    // 2. Capacity: hits on free cached blocks leave the queue, so they are not free for us.
    const auto hits = static_cast<int64_t>(table.size());
    const int64_t need = (n + bs - 1) / bs - hits;
    const int64_t avail = num_free_blocks() - free_hits;
    if (need > avail)
        throw OutOfBlocks("allocate(seq " + str(seq_id) + ", " + str(n) + " tokens) needs " +
                          str(need) + " new blocks (" + str(hits) + " cached) but " + str(avail) +
                          " are free");
    // 3. Mutate: take the hits, then the new blocks (which may evict cached ones).
    for (int32_t b : table) take(b);
    for (int64_t i = 0; i < need; ++i) table.push_back(pop_free());
    // 4. Register the new full blocks.
    if (caching_)
        for (int64_t i = hits; i < n / bs; ++i) fill(table, static_cast<size_t>(i), tokens.data() + i * bs);
    const int32_t sl = new_slot(seq_id);
    Seq& s = seqs_[static_cast<size_t>(sl)];
    s.table = std::move(table);
    s.num_tokens = n;
    std::copy(tokens.begin() + (n - n % bs), tokens.end(), tail(sl));
    return hits * bs;
}

int64_t BlockManager::cached_prefix_length(const int64_t* tokens64, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) check_token(tokens64[i], i);
    if (!caching_ || n == 0) return 0;
    const std::vector<int32_t> tokens(tokens64, tokens64 + n);
    const int64_t bs = block_size_;
    int64_t hits = 0;
    int32_t parent = -1;
    for (int64_t i = 0; i < (n - 1) / bs; ++i) {
        const int32_t* blk = tokens.data() + i * bs;
        const int32_t node = find_node(parent, blk, node_hash(parent, blk));
        if (node < 0 || nodes_[node].block < 0) break;
        ++hits;
        parent = node;
    }
    return hits * bs;
}

void BlockManager::extend(int64_t seq_id, const int64_t* tokens, int64_t n, std::vector<CopyPair>& cows) {
    for (int64_t i = 0; i < n; ++i) check_token(tokens[i], i);
    const int32_t sl = slot(seq_id);
    if (n == 0) return;
    const Seq& s = seqs_[static_cast<size_t>(sl)];
    const int64_t bs = block_size_, n0 = s.num_tokens;
    // New blocks: one per block boundary crossed, plus a private copy of a shared partial tail.
    int64_t need = (n0 + n + bs - 1) / bs - (n0 + bs - 1) / bs;
    if (n0 % bs && ref_[s.table.back()] > 1) ++need;
    if (need > num_free_blocks())
        throw OutOfBlocks("extend(seq " + str(seq_id) + ", " + str(n) + " tokens) needs " + str(need) +
                          " new blocks but " + str(num_free_blocks()) + " are free");
    for (int64_t i = 0; i < n; ++i)
        if (auto cow = append_unchecked(sl, static_cast<int32_t>(tokens[i]))) cows.push_back(*cow);
}

bool BlockManager::needs_block(const Seq& s) const {
    return s.num_tokens % block_size_ == 0 || ref_[s.table.back()] > 1;
}

std::optional<CopyPair> BlockManager::append_unchecked(int32_t sl, int32_t token) {
    Seq& s = seqs_[static_cast<size_t>(sl)];
    std::optional<CopyPair> cow;
    const int64_t offset = s.num_tokens % block_size_;
    if (offset == 0) {
        s.table.push_back(pop_free());
    } else if (ref_[s.table.back()] > 1) {
        const int32_t src = s.table.back();
        --ref_[src];  // still > 0: src stays with its other holders
        const int32_t dst = pop_free();
        s.table.back() = dst;
        cow = CopyPair{src, dst};
    }
    ++s.num_tokens;
    tail(sl)[offset] = token;
    if (offset + 1 == block_size_ && caching_) fill(s.table, s.table.size() - 1, tail(sl));
    return cow;
}

std::optional<CopyPair> BlockManager::append(int64_t seq_id, int64_t token) {
    check_token(token);
    const int32_t sl = slot(seq_id);
    if (needs_block(seqs_[static_cast<size_t>(sl)]) && num_free_blocks() == 0)
        throw OutOfBlocks("append(seq " + str(seq_id) + ") needs a block and none of the " +
                          str(num_blocks_) + " is free");
    return append_unchecked(sl, static_cast<int32_t>(token));
}

void BlockManager::append_batch(const int64_t* seq_ids, const int64_t* tokens, int64_t n,
                                std::vector<CopyPair>& cows) {
    // Check every pair, then duplicates, then count the blocks needed in order: a copy-on-write
    // by an earlier sequence leaves the shared block with one reference less (scratch_ counts
    // those).
    batch_.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        check_token(tokens[i], i);
        batch_[i] = slot(seq_ids[i]);
    }
    ++epoch_;
    for (int64_t i = 0; i < n; ++i) {
        Seq& s = seqs_[static_cast<size_t>(batch_[i])];
        if (s.mark == epoch_)
            throw std::invalid_argument("sequence " + str(seq_ids[i]) + " appears twice in one append_batch");
        s.mark = epoch_;
    }
    if (scratch_.size() < static_cast<size_t>(fresh_)) scratch_.resize(static_cast<size_t>(fresh_), 0);
    int64_t need = 0;
    for (int64_t i = 0; i < n; ++i) {
        const Seq& s = seqs_[static_cast<size_t>(batch_[i])];
        if (s.num_tokens % block_size_ == 0) {
            ++need;
        } else if (const int32_t last = s.table.back(); ref_[last] - scratch_[last] > 1) {
            ++need;
            ++scratch_[last];
        }
    }
    for (int64_t i = 0; i < n; ++i) {
        const Seq& s = seqs_[static_cast<size_t>(batch_[i])];
        if (!s.table.empty()) scratch_[s.table.back()] = 0;
    }
    if (need > num_free_blocks())
        throw OutOfBlocks("append_batch of " + str(n) + " tokens needs " + str(need) +
                          " new blocks but " + str(num_free_blocks()) + " are free");
    for (int64_t i = 0; i < n; ++i)
        if (auto cow = append_unchecked(batch_[i], static_cast<int32_t>(tokens[i]))) cows.push_back(*cow);
}

void BlockManager::fork(int64_t src_id, int64_t dst_id) {
    const int32_t src = slot(src_id);
    if (index_.find(dst_id) >= 0) throw std::invalid_argument("sequence " + str(dst_id) + " is already live");
    const int32_t dst = new_slot(dst_id);  // may grow seqs_ and tails_: index them afresh
    Seq& d = seqs_[static_cast<size_t>(dst)];
    d.table = seqs_[static_cast<size_t>(src)].table;
    d.num_tokens = seqs_[static_cast<size_t>(src)].num_tokens;
    std::copy(tail(src), tail(src) + block_size_, tail(dst));
    for (int32_t b : d.table) ++ref_[b];
}

void BlockManager::free(int64_t seq_id) {
    const int32_t sl = slot(seq_id);
    Seq& s = seqs_[static_cast<size_t>(sl)];
    for (auto b = s.table.rbegin(); b != s.table.rend(); ++b)
        if (--ref_[*b] == 0) queue_push_back(*b);
    s.table.clear();  // keeps its capacity for the next sequence in this slot
    s.num_tokens = 0;
    index_.erase(seq_id);
    free_slots_.push_back(sl);
}

// ---- batch views -----------------------------------------------------------------------------

void BlockManager::block_table_array(const int64_t* seq_ids, int64_t n, int64_t width,
                                     int32_t* out, bool zeroed) const {
    if (width < 0 || width > num_blocks_)
        throw std::invalid_argument("width=" + str(width) + " is outside [0, num_blocks=" +
                                    str(num_blocks_) + "]");
    for (int64_t i = 0; i < n; ++i) {
        const std::vector<int32_t>& table = seq(seq_ids[i]).table;
        if (static_cast<int64_t>(table.size()) > width)
            throw std::invalid_argument("sequence " + str(seq_ids[i]) + " has " + str(table.size()) +
                                        " blocks, more than width=" + str(width));
        int32_t* row = out + i * width;
        if (!table.empty()) std::memcpy(row, table.data(), table.size() * sizeof(int32_t));
        if (!zeroed && width > static_cast<int64_t>(table.size()))
            std::memset(row + table.size(), 0, static_cast<size_t>(width - table.size()) * sizeof(int32_t));
    }
}

void BlockManager::slot_mapping(const int64_t* seq_ids, int64_t n, int32_t* out) const {
    for (int64_t i = 0; i < n; ++i) {
        const Seq& s = seq(seq_ids[i]);
        if (s.num_tokens == 0)
            throw std::invalid_argument("sequence " + str(seq_ids[i]) + " has no token, so no last slot");
        const int64_t last = s.num_tokens - 1;
        out[i] = static_cast<int32_t>(s.table[last / block_size_] * block_size_ + last % block_size_);
    }
}

}  // namespace genfuse
