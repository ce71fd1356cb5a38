// The paged KV-cache block manager with prefix caching: a pure C++17 class (no pybind11, no
// torch). Python sees it as genfuse._C.BlockManager through bind_block_manager.cpp.
//
// runtime/block_manager.py (PyBlockManager) is the readable specification: same API, same block
// ids, same exceptions, and its module docstring states every rule this class follows. In short:
// a pool of blocks with reference counts; a free queue in eviction order (never-used blocks
// first, in id order, then freed blocks, least recently freed first, a sequence's tail before
// its head); full blocks interned as content nodes (parent node, tokens), found through a
// chained 64-bit hash and compared exactly, so different prefixes never share a block.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace genfuse {

// The three ways a call fails, mapped to Python exceptions by the bindings.
struct OutOfBlocks : std::runtime_error {      // -> MemoryError
    using std::runtime_error::runtime_error;
};
struct UnknownSequence : std::runtime_error {  // -> KeyError(seq_id)
    explicit UnknownSequence(int64_t id)
        : std::runtime_error("unknown sequence " + std::to_string(id)), seq_id(id) {}
    int64_t seq_id;
};
// Bad argument values throw std::invalid_argument (-> ValueError).

constexpr int64_t kTokenMax = 2147483647;     // token ids are int32, non-negative
constexpr int64_t kMaxSlots = int64_t{1} << 31;  // num_blocks * block_size: slots fit int32
constexpr uint64_t kRootHash = 0xcbf29ce484222325ULL;  // the parent hash of a first block

// FNV-1a over the tokens from parent_hash, splitmix64 finaliser, low hash_bits bits: identical
// to runtime/block_manager.py:hash_block_tokens.
uint64_t hash_block_tokens(uint64_t parent_hash, const int32_t* tokens, int64_t n, int hash_bits);

namespace detail {

// A flat hash map from 64-bit keys to non-negative int32 values: open addressing, linear
// probing, backward-shift erase, load at most 1/2. It serves the two lookups of the hot path
// (sequence id -> slot, block hash -> node) in one or two cache lines, where std::unordered_map
// chases a heap node per lookup and mallocs one per insert.
template <typename K>
class FlatMap {
  public:
    int32_t find(K key) const {
        const int32_t* v = const_cast<FlatMap*>(this)->find_ptr(key);
        return v ? *v : -1;
    }
    int32_t* find_ptr(K key) {
        if (t_.empty()) return nullptr;
        for (size_t i = home(key);; i = (i + 1) & (t_.size() - 1)) {
            if (t_[i].value < 0) return nullptr;
            if (t_[i].key == key) return &t_[i].value;
        }
    }
    void insert(K key, int32_t value) {  // key must be absent
        if ((size_ + 1) * 2 > t_.size()) {
            std::vector<Entry> old(t_.empty() ? 16 : t_.size() * 2, Entry{K{}, -1});
            old.swap(t_);
            size_ = 0;
            for (const Entry& e : old)
                if (e.value >= 0) insert(e.key, e.value);
        }
        size_t i = home(key);
        while (t_[i].value >= 0) i = (i + 1) & (t_.size() - 1);
        t_[i] = Entry{key, value};
        ++size_;
    }
    void erase(K key) {  // key must be present
        const size_t mask = t_.size() - 1;
        size_t i = home(key);
        while (t_[i].value < 0 || t_[i].key != key) i = (i + 1) & mask;
        // Pull later entries of the run into the hole when the hole lies on their probe path.
        for (size_t j = (i + 1) & mask; t_[j].value >= 0; j = (j + 1) & mask) {
            if (((j - home(t_[j].key)) & mask) >= ((j - i) & mask)) {
                t_[i] = t_[j];
                i = j;
            }
        }
        t_[i].value = -1;
        --size_;
    }

  private:
    struct Entry {
        K key;
        int32_t value;  // -1: empty
    };
    size_t home(K key) const {  // splitmix64 finaliser: sequential ids spread out
        uint64_t x = static_cast<uint64_t>(key);
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
        return static_cast<size_t>(x ^ (x >> 31)) & (t_.size() - 1);
    }
    std::vector<Entry> t_;
    size_t size_ = 0;
};

}  // namespace detail

using CopyPair = std::pair<int32_t, int32_t>;  // (src block, dst block) of a copy-on-write

class BlockManager {
  public:
    BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching = true,
                 int64_t hash_bits = 64);

    int64_t num_blocks() const { return num_blocks_; }
    int64_t block_size() const { return block_size_; }
    bool enable_prefix_caching() const { return caching_; }
    int64_t num_free_blocks() const { return (num_blocks_ - fresh_) + free_len_; }
    int64_t num_cached_blocks() const { return num_registered_; }

    // Tokens are passed as int64 so that out-of-range values reach the range check.
    int64_t allocate(int64_t seq_id, const int64_t* tokens, int64_t n);
    // What allocate(tokens) would return now (whole cached blocks among the first n - 1
    // tokens); changes nothing.
    int64_t cached_prefix_length(const int64_t* tokens, int64_t n) const;
    std::optional<CopyPair> append(int64_t seq_id, int64_t token);
    // append() of each token in order, all or nothing (a prompt's next chunk).
    void extend(int64_t seq_id, const int64_t* tokens, int64_t n, std::vector<CopyPair>& cows);
    void append_batch(const int64_t* seq_ids, const int64_t* tokens, int64_t n,
                      std::vector<CopyPair>& cows);
    void fork(int64_t src_id, int64_t dst_id);
    void free(int64_t seq_id);

    const std::vector<int32_t>& block_table(int64_t seq_id) const { return seq(seq_id).table; }
    int64_t num_tokens(int64_t seq_id) const { return seq(seq_id).num_tokens; }
    std::optional<uint64_t> block_hash(int64_t block_id) const;

    // out: n rows of `width` int32. The padding after each table is written with 0 unless the
    // caller says `out` is already zeroed (a big calloc'ed array: its pages stay untouched).
    void block_table_array(const int64_t* seq_ids, int64_t n, int64_t width, int32_t* out,
                           bool zeroed = false) const;
    void slot_mapping(const int64_t* seq_ids, int64_t n, int32_t* out) const;

  private:
    struct Seq {                      // tokens of the partial last block: tails_ at its slot
        std::vector<int32_t> table;   // block ids in token order
        int64_t num_tokens = 0;
        uint64_t mark = 0;            // append_batch: == epoch_ once seen in this batch
    };
    struct Node {                     // a content node: (parent node, block tokens)
        uint64_t hash = 0;
        int32_t parent = -1;          // node of the previous block, -1 for a first block
        int32_t block = -1;           // registered block holding this content, or -1
        int32_t refs = 0;             // blocks bearing it + child nodes
        int32_t next = -1;            // next node in the same hash bucket (collisions)
    };

    int32_t slot(int64_t seq_id) const;     // throws UnknownSequence
    const Seq& seq(int64_t seq_id) const { return seqs_[static_cast<size_t>(slot(seq_id))]; }
    int32_t new_slot(int64_t seq_id);
    int32_t* tail(int32_t slot) { return &tails_[static_cast<size_t>(slot) * block_size_]; }
    bool needs_block(const Seq& s) const;
    std::optional<CopyPair> append_unchecked(int32_t slot, int32_t token);
    int32_t find_node(int32_t parent, const int32_t* tokens, uint64_t h) const;
    uint64_t node_hash(int32_t parent, const int32_t* tokens) const;
    void fill(const std::vector<int32_t>& table, size_t i, const int32_t* tokens);
    void take(int32_t block);
    int32_t pop_free();
    void queue_push_back(int32_t block);
    void queue_remove(int32_t block);
    void release(int32_t node);

    int64_t num_blocks_, block_size_;
    bool caching_;
    int hash_bits_;

    // Blocks [fresh_, num_blocks_) were never used: the front of the free queue, in id order.
    // Per-block arrays cover [0, fresh_) only, so an unused pool costs nothing.
    int64_t fresh_ = 0;
    std::vector<int32_t> ref_, node_of_, prev_, next_;   // next_/prev_: the free queue links
    int32_t head_ = -1, tail_ = -1;                      // free queue front / back
    int64_t free_len_ = 0;

    std::vector<Node> nodes_;
    std::vector<int32_t> node_tokens_;       // block_size_ tokens per node
    std::vector<int32_t> free_nodes_;
    detail::FlatMap<uint64_t> buckets_;  // hash -> first node with it (then Node::next)
    int64_t num_registered_ = 0;

    std::vector<Seq> seqs_;              // by slot; freed slots are reused
    std::vector<int32_t> free_slots_;
    std::vector<int32_t> tails_;         // block_size_ token ids per slot
    detail::FlatMap<int64_t> index_;     // seq id -> slot
    uint64_t epoch_ = 0;                 // append_batch calls, for the duplicate check
    std::vector<int32_t> batch_;         // append_batch: the slots of the batch
    std::vector<int32_t> scratch_;       // append_batch: refs released by earlier pairs
};

}  // namespace genfuse
