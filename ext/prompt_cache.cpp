#include "prompt_cache.h"

#include <algorithm>

namespace llama_crab {

size_t common_prefix(const std::vector<llama_token> & a, const std::vector<llama_token> & b) {
    const size_t n = std::min(a.size(), b.size());
    size_t i = 0;
    while (i < n && a[i] == b[i]) ++i;
    return i;
}

const PromptCache::Entry * PromptCache::best(const std::vector<llama_token> & tokens, size_t & prefix) {
    prefix = 0;
    auto found = lru_.end();
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
        const size_t n = common_prefix(it->tokens, tokens);
        if (n > prefix) {
            prefix = n;
            found = it;
        }
    }
    if (found == lru_.end()) return nullptr;
    lru_.splice(lru_.begin(), lru_, found);
    return &lru_.front();
}

bool PromptCache::covers(const std::vector<llama_token> & tokens) const {
    return std::any_of(lru_.begin(), lru_.end(), [&](const Entry & e) {
        return e.tokens.size() >= tokens.size() && common_prefix(e.tokens, tokens) == tokens.size();
    });
}

void PromptCache::erase(std::list<Entry>::iterator it) {
    bytes_ -= it->bytes();
    entries_--;
    lru_.erase(it);
}

void PromptCache::put(std::vector<llama_token> tokens, std::vector<uint8_t> state) {
    Entry entry{std::move(tokens), std::move(state)};
    if (budget_ == 0 || entry.bytes() > budget_) return;
    for (auto it = lru_.begin(); it != lru_.end();) {
        const auto next = std::next(it);
        if (common_prefix(it->tokens, entry.tokens) == it->tokens.size()) erase(it);
        it = next;
    }
    while (!lru_.empty() && bytes() + entry.bytes() > budget_) {
        erase(std::prev(lru_.end()));
    }
    bytes_ += entry.bytes();
    entries_++;
    lru_.push_front(std::move(entry));
}

}  // namespace llama_crab
