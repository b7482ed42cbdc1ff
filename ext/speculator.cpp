#include "speculator.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "batch_add.h"
#include "common.h"
#include "speculative.h"

namespace llama_crab {

namespace {

// A draft model catches up on tokens its target computed without it (a restored prefix, a
// long prompt) at most this many per step, so that catching up never stalls the batch.
constexpr int32_t kCatchUpStep = 128;

// Backoff after a draft none of whose tokens was accepted: skip 1, 2, 4, ... steps (at most
// kMaxSkip) before drafting again; an accepted token resets it.
constexpr int32_t kMaxSkip = 32;

// A sequence's continuation rate weighs each earlier draft this much less per later one.
constexpr double kAcceptanceDecay = 0.85;
// A sequence whose drafts do not pay for their rows probes with one token this often.
constexpr int32_t kProbeEvery = 16;
// The continuation rate's prior: 0.9 with the weight of one drafted token, so a first
// draft accepted whole soon allows long ones, and one rejected at once stops long ones.
constexpr double kPriorAccepted = 0.9, kPriorWeight = 1.0;

void check_range(const char * field, int32_t value, int32_t lo, int32_t hi) {
    if (value < lo || value > hi) {
        throw std::invalid_argument(std::string(field) + ": must be between " + std::to_string(lo) + " and " +
                                    std::to_string(hi) + " (got " + std::to_string(value) + ")");
    }
}

}  // namespace

Speculator::Speculator(const SpeculativeParams & p, uint32_t n_seq, llama_context * ctx_tgt)
    : backoff_(n_seq), dft_n_past_(n_seq, 0) {
    if (p.types.empty()) return;
    check_range("speculative.draft_n_max", p.draft_n_max, 1, 256);
    check_range("speculative.draft_n_min", p.draft_n_min, 0, p.draft_n_max);
    check_range("speculative.ngram_size_n", p.ngram_size_n, 1, 1024);
    check_range("speculative.ngram_size_m", p.ngram_size_m, 1, 1024);
    check_range("speculative.ngram_min_hits", p.ngram_min_hits, 1, 1024);
    check_range("speculative.ngram_mod_n_match", p.ngram_mod_n_match, 1, 1024);
    check_range("speculative.ngram_mod_n_min", p.ngram_mod_n_min, 0, 1024);
    check_range("speculative.ngram_mod_n_max", p.ngram_mod_n_max, std::max(1, p.ngram_mod_n_min), 1024);
    if (!(p.draft_p_min >= 0.0f && p.draft_p_min <= 1.0f)) {
        throw std::invalid_argument("speculative.draft_p_min: must be between 0 and 1");
    }

    common_params_speculative sp;
    sp.types.clear();
    for (const auto & name : p.types) {
        const common_speculative_type type = common_speculative_type_from_name(name);
        const bool supported = type == COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE || type == COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K ||
                               type == COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K4V || type == COMMON_SPECULATIVE_TYPE_NGRAM_MOD ||
                               type == COMMON_SPECULATIVE_TYPE_NGRAM_CACHE || type == COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE;
        if (!supported) {
            throw std::invalid_argument("speculative.types: '" + name +
                                        "' is not one of ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod, "
                                        "ngram-cache, draft-simple");
        }
        if (std::find(sp.types.begin(), sp.types.end(), type) == sp.types.end()) sp.types.push_back(type);
    }
    const bool wants_model =
        std::find(sp.types.begin(), sp.types.end(), COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE) != sp.types.end();
    if (wants_model != !p.draft_model.empty()) {
        throw std::invalid_argument(wants_model ? "speculative.draft_model: draft-simple needs a draft model"
                                                : "speculative.draft_model: a draft model needs the draft-simple type");
    }
    for (auto * map : {&sp.ngram_simple, &sp.ngram_map_k, &sp.ngram_map_k4v}) {
        map->size_n = static_cast<uint16_t>(p.ngram_size_n);
        map->size_m = static_cast<uint16_t>(p.ngram_size_m);
        map->min_hits = static_cast<uint16_t>(p.ngram_min_hits);
    }
    sp.ngram_mod.n_match = p.ngram_mod_n_match;
    sp.ngram_mod.n_min = p.ngram_mod_n_min;
    sp.ngram_mod.n_max = p.ngram_mod_n_max;
    sp.draft.n_max = p.draft_n_max;
    sp.draft.n_min = p.draft_n_min;
    sp.draft.p_min = p.draft_p_min;

    if (wants_model) {
        llama_model_params mp = llama_model_default_params();
        mp.n_gpu_layers = p.draft_n_gpu_layers;
        model_dft_ = llama_model_load_from_file(p.draft_model.c_str(), mp);
        if (!model_dft_) throw std::invalid_argument("speculative.draft_model: cannot load '" + p.draft_model + "'");
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = llama_n_ctx(ctx_tgt);
        cp.n_batch = llama_n_batch(ctx_tgt);
        cp.n_ubatch = llama_n_ubatch(ctx_tgt);
        cp.n_seq_max = n_seq;
        cp.kv_unified = false;
        cp.n_threads = llama_n_threads(ctx_tgt);
        cp.n_threads_batch = llama_n_threads_batch(ctx_tgt);
        cp.no_perf = true;
        ctx_dft_ = llama_init_from_model(model_dft_, cp);
        if (!ctx_dft_) {
            llama_model_free(model_dft_);
            model_dft_ = nullptr;
            throw std::invalid_argument("speculative.draft_model: cannot create a context for '" + p.draft_model + "'");
        }
        sp.draft.ctx_tgt = ctx_tgt;
        sp.draft.ctx_dft = ctx_dft_;
    }
    try {
        spec_ = common_speculative_init(sp, n_seq);
    } catch (const std::exception & e) {
        // llama.cpp refuses a draft vocabulary that does not match the target's here.
        if (ctx_dft_) llama_free(ctx_dft_);
        if (model_dft_) llama_model_free(model_dft_);
        ctx_dft_ = nullptr;
        model_dft_ = nullptr;
        throw std::invalid_argument(std::string("speculative.draft_model: ") + e.what());
    }
}

Speculator::~Speculator() {
    common_speculative_free(spec_);
    if (ctx_dft_) llama_free(ctx_dft_);
    if (model_dft_) llama_model_free(model_dft_);
}

void Speculator::begin(llama_seq_id seq, const std::vector<llama_token> & history) {
    if (!spec_) return;
    backoff_[static_cast<size_t>(seq)] = Backoff{};
    common_speculative_begin(spec_, seq, history);
}

void Speculator::truncate(llama_seq_id seq, llama_pos n_keep) {
    if (!ctx_dft_) return;
    auto & n_past = dft_n_past_[static_cast<size_t>(seq)];
    if (n_past > n_keep) {
        llama_memory_seq_rm(llama_get_memory(ctx_dft_), seq, n_keep, -1);
        n_past = n_keep;
    }
}

int32_t Speculator::draft_allowance(llama_seq_id seq, double break_even) {
    if (!spec_) return 0;
    auto & b = backoff_[static_cast<size_t>(seq)];
    if (b.skip > 0) {
        b.skip--;
        return 0;
    }
    if (b.drafts == 0) return b.cap;  // the first draft, or none verified yet
    // A draft's k-th token is accepted with about q^k (each token only after the one before
    // it), so the longest draft whose every token pays is ln(break_even) / ln(q) tokens.
    // Counting the rejected tail of a long draft as rejected tokens instead (the acceptance
    // ratio) made one long miss, or a draft that held for 20 of its 48 tokens, look like
    // drafting could not pay, and the sequence stopped drafting for good.
    const double q = continuation(seq);
    int32_t paying = b.cap < 0 ? std::numeric_limits<int32_t>::max() : b.cap;
    if (break_even >= 1) {
        paying = 0;
    } else if (break_even > 0) {
        paying = static_cast<int32_t>(std::min<double>(paying, std::log(break_even) / std::log(q)));
    }
    if (paying < 1) {
        // The count restarts when a probe is verified (accept()), not here: a probe that
        // found no n-gram to propose is tried again next step.
        return ++b.steps_below_break_even < kProbeEvery ? 0 : 1;
    }
    b.steps_below_break_even = 0;
    return b.cap < 0 && paying == std::numeric_limits<int32_t>::max() ? -1 : paying;
}

double Speculator::continuation(llama_seq_id seq) const {
    const auto & b = backoff_[static_cast<size_t>(seq)];
    return (b.accepted + kPriorAccepted) / (b.accepted + b.rejections + kPriorWeight);
}

void Speculator::request(llama_seq_id seq, llama_token id_last, llama_pos pos0, const std::vector<llama_token> * history,
                         int32_t n_max, std::vector<llama_token> * out) {
    out->clear();
    if (!spec_ || n_max <= 0) return;
    if (ctx_dft_) {
        // The draft model must hold exactly the tokens before `pos0`: drop what it drafted
        // past them, then catch up on what it never saw (a bounded piece per step).
        auto & n_past = dft_n_past_[static_cast<size_t>(seq)];
        llama_memory_seq_rm(llama_get_memory(ctx_dft_), seq, std::min(n_past, pos0), -1);
        n_past = std::min(n_past, pos0);
        if (n_past < pos0) {
            const int32_t n = std::min<int32_t>(pos0 - n_past, kCatchUpStep);
            llama_batch batch = llama_batch_init(n, 0, 1);
            for (int32_t i = 0; i < n; ++i) {
                batch_add(batch, (*history)[static_cast<size_t>(n_past + i)], n_past + i, seq, false);
            }
            const int32_t ret = llama_decode(ctx_dft_, batch);
            llama_batch_free(batch);
            if (ret != 0) {
                llama_memory_seq_rm(llama_get_memory(ctx_dft_), seq, -1, -1);
                n_past = 0;
                return;
            }
            n_past += n;
            if (n_past < pos0) return;  // still catching up: no draft this step
        }
    }
    auto & dp = common_speculative_get_draft_params(spec_, seq);
    dp.drafting = true;
    dp.n_max = n_max;
    dp.pos0 = pos0;
    dp.id_last = id_last;
    dp.prompt = history;
    dp.result = out;
}

void Speculator::draft() {
    if (spec_) common_speculative_draft(spec_);
}

void Speculator::accept(llama_seq_id seq, int32_t n_drafted, int32_t n_accepted) {
    if (!spec_ || n_drafted <= 0) return;
    drafted_total_.fetch_add(static_cast<uint64_t>(n_drafted), std::memory_order_relaxed);
    accepted_total_.fetch_add(static_cast<uint64_t>(n_accepted), std::memory_order_relaxed);
    common_speculative_accept(spec_, seq, static_cast<uint16_t>(std::min(n_accepted, 65535)));
    // A draft costs its rows in the batch: after one that gained nothing, draft less often.
    auto & b = backoff_[static_cast<size_t>(seq)];
    b.steps_below_break_even = 0;
    b.drafts = b.drafts * kAcceptanceDecay + 1;
    b.accepted = b.accepted * kAcceptanceDecay + n_accepted;
    b.rejections = b.rejections * kAcceptanceDecay + (n_accepted < n_drafted ? 1 : 0);
    if (n_accepted > 0) {
        b.skip = b.penalty = 0;
        // Verifying costs every drafted row, accepted or not: draft about what was accepted.
        // A draft accepted whole lets the next be twice as long, so a one-token probe that
        // happens to land does not buy a full-length draft.
        if (n_accepted < n_drafted) {
            b.cap = 2 * n_accepted + 1;
        } else {
            b.cap = std::max(b.cap, 2 * n_drafted + 1);
        }
    } else if (n_drafted > 0) {
        b.penalty = std::min(kMaxSkip, std::max(1, b.penalty * 2));
        b.skip = b.penalty;
        b.cap = 1;
    }
}

}  // namespace llama_crab

