#include "sampler_chain.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>

namespace llama_crab {

namespace {

// Problems that would make llama.cpp misbehave rather than merely sample oddly: the
// typed stages in Python check the documented ranges first; this is the engine's own
// guard for any caller (the low-level API included).
std::string finite_in(const char * name, float v, float lo, float hi) {
    if (!std::isfinite(v) || v < lo || v > hi) {
        return std::string(name) + ": must be a finite number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
    }
    return "";
}

std::string int_in(const char * name, int64_t v, int64_t lo, int64_t hi) {
    if (v < lo || v > hi) {
        return std::string(name) + ": must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
    }
    return "";
}

// A last_n of -1 means the whole context; larger than the context buys nothing but memory.
int32_t resolve_last_n(int32_t last_n, int32_t n_ctx) {
    if (last_n < 0) return n_ctx;
    return std::min(last_n, n_ctx);
}

}  // namespace

const std::vector<std::string> & stage_kinds() {
    static const std::vector<std::string> kinds = {
        "greedy", "dist", "top_k", "top_p", "min_p", "typical", "temp", "dynamic_temp", "xtc",
        "top_n_sigma", "mirostat", "mirostat_v2", "penalties", "dry", "adaptive_p",
    };
    return kinds;
}

bool is_selector(const std::string & kind) {
    return kind == "greedy" || kind == "dist" || kind == "mirostat" || kind == "mirostat_v2" || kind == "adaptive_p";
}

std::string stage_problem(const SamplerStage & s) {
    const auto & k = s.kind;
    auto first = [&](std::initializer_list<std::string> checks) {
        for (const auto & c : checks) {
            if (!c.empty()) return c;
        }
        return std::string();
    };
    if (k == "greedy" || k == "dist") return "";
    // Counts beyond the vocabulary or the context are harmless (clamped), so only the sign matters.
    if (k == "top_k") return int_in("k", s.k, 0, INT32_MAX);
    if (k == "top_p" || k == "min_p") return first({finite_in("p", s.p, 0, 1), int_in("min_keep", s.min_keep, 0, 1024)});
    if (k == "typical") {
        if (!(s.p > 0.0f)) return "p: must be in (0, 1]";
        return first({finite_in("p", s.p, 0, 1), int_in("min_keep", s.min_keep, 0, 1024)});
    }
    if (k == "temp") return finite_in("t", s.t, 0, 100);
    if (k == "dynamic_temp") {
        return first({finite_in("t", s.t, 0, 100), finite_in("range", s.range, 0, 100), finite_in("exponent", s.exponent, 0, 100)});
    }
    if (k == "xtc") {
        return first({finite_in("probability", s.probability, 0, 1), finite_in("threshold", s.threshold, 0, 1),
                      int_in("min_keep", s.min_keep, 0, 1024)});
    }
    if (k == "top_n_sigma") {
        if (!(s.n > 0.0f)) return "n: must be in (0, 100]";
        return finite_in("n", s.n, 0, 100);
    }
    if (k == "mirostat") return first({finite_in("tau", s.tau, 0, 100), finite_in("eta", s.eta, 0, 10), int_in("m", s.m, 1, 1000)});
    if (k == "mirostat_v2") return first({finite_in("tau", s.tau, 0, 100), finite_in("eta", s.eta, 0, 10)});
    if (k == "penalties") {
        if (!(s.repeat > 0.0f)) return "repeat: must be in (0, 10]";
        return first({int_in("last_n", s.last_n, -1, INT32_MAX), finite_in("repeat", s.repeat, 0, 10),
                      finite_in("frequency", s.frequency, -2, 2), finite_in("presence", s.presence, -2, 2)});
    }
    if (k == "dry") {
        const std::string p = first({finite_in("multiplier", s.multiplier, 0, 100), finite_in("base", s.base, 1, 100),
                   int_in("allowed_length", s.allowed_length, 0, 1000), int_in("last_n", s.last_n, -1, INT32_MAX),
                   int_in("sequence_breakers", static_cast<int64_t>(s.sequence_breakers.size()), 0, kMaxSequenceBreakers)});
        if (!p.empty()) return p;
        for (size_t i = 0; i < s.sequence_breakers.size(); ++i) {
            const auto & b = s.sequence_breakers[i];
            if (b.empty() || b.size() > 160) {
                return "sequence_breakers[" + std::to_string(i) + "]: must be a non-empty string of at most 40 characters";
            }
        }
        return "";
    }
    if (k == "adaptive_p") return first({finite_in("target", s.target, 0, 1), finite_in("decay", s.decay, 0, 0.99f)});
    return "kind: unknown sampler stage '" + k + "'";
}

std::string sequence_breaker_problem(const std::vector<SamplerStage> & stages) {
    static const std::vector<std::string> defaults = SamplerStage().sequence_breakers;
    int64_t n = 0, n_long = 0;
    for (const auto & s : stages) {
        if (s.kind != "dry") continue;
        for (const auto & b : s.sequence_breakers.empty() ? defaults : s.sequence_breakers) {
            n++;
            // One UTF-8 character: its lead byte's length.
            const auto lead = static_cast<unsigned char>(b.empty() ? 0 : b[0]);
            const size_t one = lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
            if (b.size() > one) n_long++;
        }
    }
    if (n > kMaxSequenceBreakers || n_long > kMaxLongSequenceBreakers) {
        return "at most " + std::to_string(kMaxSequenceBreakers) + " DRY sequence breakers in all, at most " +
               std::to_string(kMaxLongSequenceBreakers) + " of them longer than one character";
    }
    return "";
}

std::string chain_problem(const std::vector<SamplerStage> & stages, size_t max_stages) {
    if (stages.size() > max_stages) {
        return ": at most " + std::to_string(max_stages) + " stages (got " + std::to_string(stages.size()) + ")";
    }
    const std::string breakers = sequence_breaker_problem(stages);
    if (!breakers.empty()) return ": " + breakers;
    for (size_t i = 0; i < stages.size(); ++i) {
        const std::string where = "[" + std::to_string(i) + "]";
        const std::string problem = stage_problem(stages[i]);
        if (!problem.empty()) {
            return where + (problem.rfind("kind:", 0) == 0 ? ": " + problem.substr(6) : "." + problem);
        }
        if (is_selector(stages[i].kind) && i + 1 != stages.size()) {
            return where + ": " + stages[i].kind + " picks the token, so it must be the last stage";
        }
    }
    return "";
}

llama_sampler * build_stage(const SamplerStage & s, const llama_vocab * vocab, uint32_t seed, int32_t n_ctx) {
    const std::string & k = s.kind;
    const size_t min_keep = static_cast<size_t>(std::max(s.min_keep, 0));
    if (k == "greedy") return llama_sampler_init_greedy();
    if (k == "dist") return llama_sampler_init_dist(seed);
    if (k == "top_k") return llama_sampler_init_top_k(s.k);
    if (k == "top_p") return llama_sampler_init_top_p(s.p, min_keep);
    if (k == "min_p") return llama_sampler_init_min_p(s.p, min_keep);
    if (k == "typical") return llama_sampler_init_typical(s.p, min_keep);
    if (k == "temp") return llama_sampler_init_temp(s.t);
    if (k == "dynamic_temp") return llama_sampler_init_temp_ext(s.t, s.range, s.exponent);
    if (k == "xtc") return llama_sampler_init_xtc(s.probability, s.threshold, min_keep, seed);
    if (k == "top_n_sigma") return llama_sampler_init_top_n_sigma(s.n);
    if (k == "mirostat") return llama_sampler_init_mirostat(llama_vocab_n_tokens(vocab), seed, s.tau, s.eta, s.m);
    if (k == "mirostat_v2") return llama_sampler_init_mirostat_v2(seed, s.tau, s.eta);
    if (k == "penalties") {
        return llama_sampler_init_penalties(llama_vocab_n_tokens(vocab), resolve_last_n(s.last_n, n_ctx), s.repeat,
                                            s.frequency, s.presence);
    }
    if (k == "dry") {
        // No breakers means common's defaults, as over the wire (an empty repeated field).
        static const std::vector<std::string> defaults = SamplerStage().sequence_breakers;
        const auto & strings = s.sequence_breakers.empty() ? defaults : s.sequence_breakers;
        std::vector<const char *> breakers;
        breakers.reserve(strings.size());
        for (const auto & b : strings) breakers.push_back(b.c_str());
        return llama_sampler_init_dry(vocab, s.multiplier, s.base, s.allowed_length, resolve_last_n(s.last_n, n_ctx),
                                      breakers.data(), breakers.size());
    }
    if (k == "adaptive_p") return llama_sampler_init_adaptive_p(s.target, s.decay, seed);
    throw std::invalid_argument("kind: unknown sampler stage '" + k + "'");
}

void append_stages(llama_sampler * chain, const std::vector<SamplerStage> & stages, const llama_vocab * vocab,
                   uint32_t seed, int32_t n_ctx) {
    for (const auto & stage : stages) {
        llama_sampler_chain_add(chain, build_stage(stage, vocab, seed, n_ctx));
    }
    if (stages.empty() || !is_selector(stages.back().kind)) {
        llama_sampler_chain_add(chain, llama_sampler_init_dist(seed));
    }
}

namespace {

struct EogBan {
    std::vector<llama_token> eog;  // every end-of-generation token id
    int32_t n_tokens = 0;
    int32_t n_accepted = 0;
};

const char * eog_ban_name(const llama_sampler *) { return "eog_ban"; }

void eog_ban_accept(llama_sampler * smpl, llama_token) {
    static_cast<EogBan *>(smpl->ctx)->n_accepted++;
}

void eog_ban_apply(llama_sampler * smpl, llama_token_data_array * cur) {
    const auto * ban = static_cast<const EogBan *>(smpl->ctx);
    if (ban->n_accepted >= ban->n_tokens) return;
    // Candidates straight from the logits are indexed by token id; otherwise scan.
    const bool by_id = !cur->sorted && cur->size > 0 && cur->data[cur->size - 1].id == static_cast<llama_token>(cur->size - 1);
    for (llama_token t : ban->eog) {
        if (by_id) {
            if (static_cast<size_t>(t) < cur->size && cur->data[t].id == t) cur->data[t].logit = -INFINITY;
            continue;
        }
        for (size_t i = 0; i < cur->size; ++i) {
            if (cur->data[i].id == t) cur->data[i].logit = -INFINITY;
        }
    }
}

void eog_ban_reset(llama_sampler * smpl) {
    static_cast<EogBan *>(smpl->ctx)->n_accepted = 0;
}

llama_sampler * eog_ban_clone(const llama_sampler * smpl);

void eog_ban_free(llama_sampler * smpl) {
    delete static_cast<EogBan *>(smpl->ctx);
}

llama_sampler_i eog_ban_iface = [] {
    llama_sampler_i i{};
    i.name = eog_ban_name;
    i.accept = eog_ban_accept;
    i.apply = eog_ban_apply;
    i.reset = eog_ban_reset;
    i.clone = eog_ban_clone;
    i.free = eog_ban_free;
    return i;
}();

llama_sampler * eog_ban_clone(const llama_sampler * smpl) {
    return llama_sampler_init(&eog_ban_iface, new EogBan(*static_cast<const EogBan *>(smpl->ctx)));
}

}  // namespace

llama_sampler * init_eog_ban(const llama_vocab * vocab, int32_t n_tokens) {
    auto * ban = new EogBan();
    ban->n_tokens = n_tokens;
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    for (llama_token t = 0; t < n_vocab; ++t) {
        if (llama_vocab_is_eog(vocab, t)) ban->eog.push_back(t);
    }
    return llama_sampler_init(&eog_ban_iface, ban);
}

}  // namespace llama_crab
