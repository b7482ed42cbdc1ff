// Speculative decoding's drafting side, over llama.cpp's common/speculative: which
// sequences draft this step, how far, and when a sequence stops paying for it.
//
// The engine asks for drafts (one call for every sequence that wants one), puts each
// sequence's sampled token plus its draft into the shared batch, verifies the draft with the
// request's own sampler, and reports how many draft tokens were accepted. Nothing here
// decodes with the target model or knows about requests.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"

struct common_speculative;

namespace llama_crab {

struct SpeculativeParams {
    // llama.cpp's type names (common_speculative_all_types_str): ngram-simple, ngram-map-k,
    // ngram-map-k4v, ngram-mod, ngram-cache, draft-simple. Empty: no speculation.
    std::vector<std::string> types;
    // A draft model (draft-simple): a .gguf path whose vocabulary matches the target's.
    std::string draft_model;
    int32_t draft_n_max = 16;  // tokens a draft model proposes per step
    int32_t draft_n_min = 0;   // shorter drafts are dropped
    float draft_p_min = 0.75f;  // a draft model stops at a token it is less sure of
    int32_t draft_n_gpu_layers = -1;
    // n-gram lookups (ngram-simple, ngram-map-k, ngram-map-k4v): key length, proposal length,
    // and how often a key must have been seen before its continuation is proposed.
    int32_t ngram_size_n = 12;
    int32_t ngram_size_m = 48;
    int32_t ngram_min_hits = 1;
    // ngram-mod's hashed n-grams: key length and the draft lengths it proposes.
    int32_t ngram_mod_n_match = 24;
    int32_t ngram_mod_n_min = 48;
    int32_t ngram_mod_n_max = 64;
};

class Speculator {
public:
    // Throws std::invalid_argument naming the field for an unknown type or a bad value.
    // `ctx_tgt` is the target's context (a draft model needs it to check the vocabulary).
    Speculator(const SpeculativeParams & params, uint32_t n_seq, llama_context * ctx_tgt);
    ~Speculator();
    Speculator(const Speculator &) = delete;
    Speculator & operator=(const Speculator &) = delete;

    bool enabled() const { return spec_ != nullptr; }
    bool uses_draft_model() const { return ctx_dft_ != nullptr; }

    // A sequence starts generating after `history` (its prompt).
    void begin(llama_seq_id seq, const std::vector<llama_token> & history);
    // The sequence's KV was cut back to `n_keep` tokens, or it was cleared (n_keep 0).
    void truncate(llama_seq_id seq, llama_pos n_keep);

    // How many tokens `seq` may draft this step (-1: as many as the drafter proposes). Its
    // first draft is not limited: that is how the engine learns whether the text repeats.
    // Then a draft is as long as pays: the k-th drafted token is accepted with about q^k, q
    // being the sequence's recent continuation rate (continuation()), and it pays while q^k
    // exceeds `break_even` (the share of a step one more row costs). It is also at most twice
    // the part of the last draft that was accepted, plus one (twice the whole, plus one, after
    // a draft accepted whole), and 0 while the sequence backs off after drafts that gained
    // nothing (each call counts one step of the backoff). Where not even one token pays, it
    // drafts only a one-token probe now and then, so it learns when drafting pays again.
    int32_t draft_allowance(llama_seq_id seq, double break_even);
    // The chance that a drafted token of `seq` is accepted when the one before it was, from
    // its recent drafts (older drafts weighing less; 0.9 before any).
    double continuation(llama_seq_id seq) const;
    // Ask for a draft of at most `n_max` tokens following `id_last` (at position `pos0`),
    // `history` being every token before it. Then one draft() fills every `out`. A draft
    // model first catches up on the history it has not seen (a bounded piece per step,
    // drafting nothing until it has), so its KV always follows the target's.
    void request(llama_seq_id seq, llama_token id_last, llama_pos pos0, const std::vector<llama_token> * history,
                 int32_t n_max, std::vector<llama_token> * out);
    void draft();
    // `n_accepted` of the `n_drafted` tokens were accepted for `seq`.
    void accept(llama_seq_id seq, int32_t n_drafted, int32_t n_accepted);

    uint64_t drafted_total() const { return drafted_total_.load(std::memory_order_relaxed); }
    uint64_t accepted_total() const { return accepted_total_.load(std::memory_order_relaxed); }

private:
    struct Backoff {
        int32_t skip = 0;      // steps left without drafting
        int32_t penalty = 0;   // the next skip after a draft that did not pay
        int32_t cap = -1;      // longest draft allowed next (-1: no cap, until a draft is verified)
        // Recent drafts: how many there were, their accepted tokens, and how many ended in
        // a rejected token (one that was not accepted whole), older drafts weighing less.
        double drafts = 0, accepted = 0, rejections = 0;
        int32_t steps_below_break_even = 0;
    };

    common_speculative * spec_ = nullptr;
    llama_model * model_dft_ = nullptr;
    llama_context * ctx_dft_ = nullptr;
    std::vector<Backoff> backoff_;
    std::vector<llama_pos> dft_n_past_;  // tokens of each sequence the draft model holds
    std::atomic<uint64_t> drafted_total_{0}, accepted_total_{0};
};

}  // namespace llama_crab
