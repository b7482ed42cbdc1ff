// A host-RAM cache of sequence states (KV) keyed by their token prefixes, within a byte
// budget. The engine saves a slot's state here before overwriting it and restores the
// entry sharing the longest prefix with a new prompt when no slot holds a longer one.
// Used by the scheduler thread only; the sizes are atomics so metrics can read them.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <list>
#include <vector>

#include "llama.h"

namespace llama_crab {

// Length of the common prefix of two token sequences.
size_t common_prefix(const std::vector<llama_token> & a, const std::vector<llama_token> & b);

class PromptCache {
public:
    struct Entry {
        std::vector<llama_token> tokens;  // what the state holds, in position order
        std::vector<uint8_t> state;       // llama_state_seq_get_data of those tokens
        size_t bytes() const { return state.size() + tokens.size() * sizeof(llama_token); }
    };

    explicit PromptCache(size_t budget_bytes) : budget_(budget_bytes) {}

    // The entry sharing the longest common prefix with `tokens` (marked most recently
    // used), or nullptr when none shares any; `prefix` gets that length.
    const Entry * best(const std::vector<llama_token> & tokens, size_t & prefix);

    // Store a state, evicting least recently used entries to stay within the budget (a
    // state larger than the whole budget is not stored). Entries whose tokens are a prefix
    // of the new one's are dropped: the new entry serves every prompt they served.
    void put(std::vector<llama_token> tokens, std::vector<uint8_t> state);

    // Whether an entry already holds `tokens` or a longer sequence starting with them.
    bool covers(const std::vector<llama_token> & tokens) const;

    size_t budget() const { return budget_; }
    size_t bytes() const { return bytes_.load(std::memory_order_relaxed); }
    size_t entries() const { return entries_.load(std::memory_order_relaxed); }

private:
    void erase(std::list<Entry>::iterator it);

    size_t budget_;
    std::list<Entry> lru_;  // front: most recently used
    std::atomic<size_t> bytes_{0}, entries_{0};
};

}  // namespace llama_crab
