// A request's flat sampling options expanded into typed stages, as llama.cpp's common
// sampler would build them; an explicit `sampler_chain` is taken as given.
#include <stdexcept>

#include "request.h"

namespace llama_crab {

namespace {

SamplerStage stage(const char * kind) {
    SamplerStage s;
    s.kind = kind;
    return s;
}

// One named stage with the flat parameters (the `samplers` shorthand and the default order).
bool add_named(std::vector<SamplerStage> & out, const std::string & name, const SamplingParams & p) {
    SamplerStage s;
    if (name == "penalties") {
        s = stage("penalties");
        s.last_n = p.penalty_last_n;
        s.repeat = p.repeat_penalty;
        s.frequency = p.frequency_penalty;
        s.presence = p.presence_penalty;
    } else if (name == "dry") {
        s = stage("dry");
        s.multiplier = p.dry_multiplier;
        s.base = p.dry_base;
        s.allowed_length = p.dry_allowed_length;
        s.last_n = p.dry_penalty_last_n;
        if (!p.dry_sequence_breakers.empty()) s.sequence_breakers = p.dry_sequence_breakers;
    } else if (name == "top_n_sigma") {
        if (p.top_n_sigma <= 0.0f) return true;  // disabled, as in common
        s = stage("top_n_sigma");
        s.n = p.top_n_sigma;
    } else if (name == "top_k") {
        s = stage("top_k");
        s.k = p.top_k;
    } else if (name == "typical_p" || name == "top_p" || name == "min_p") {
        // The truncations by probability mass: one `p` each, and the shared min_keep.
        s = stage(name == "typical_p" ? "typical" : name.c_str());
        s.p = name == "typical_p" ? p.typical_p : name == "top_p" ? p.top_p : p.min_p;
        s.min_keep = p.min_keep;
    } else if (name == "xtc") {
        s = stage("xtc");
        s.probability = p.xtc_probability;
        s.threshold = p.xtc_threshold;
        s.min_keep = p.min_keep;
    } else if (name == "temperature") {
        s = stage("dynamic_temp");
        s.t = p.temperature;
        s.range = p.dynatemp_range;
        s.exponent = p.dynatemp_exponent;
    } else if (name == "adaptive_p") {
        return true;  // a selector: added last
    } else {
        return false;
    }
    out.push_back(std::move(s));
    return true;
}

}  // namespace

const std::vector<std::string> & sampler_names() {
    // llama.cpp common's default order; `adaptive_p` is the only name not in it.
    static const std::vector<std::string> names = {"penalties", "dry",   "top_n_sigma", "top_k",       "typical_p",
                                                   "top_p",     "min_p", "xtc",         "temperature", "adaptive_p"};
    return names;
}

std::vector<SamplerStage> expand_stages(const SamplingParams & p) {
    if (!p.sampler_chain.empty()) return p.sampler_chain;
    std::vector<SamplerStage> out;
    const bool penalised = p.repeat_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    if (p.samplers.empty() && p.temperature <= 0.0f) {
        // Greedy: the argmax after whatever changes the logits. Skipping the rest of the
        // default chain keeps per-token sampling cost negligible next to the decode.
        if (penalised) add_named(out, "penalties", p);
        if (p.dry_multiplier > 0.0f) add_named(out, "dry", p);
        out.push_back(stage("greedy"));
        return out;
    }
    if (p.mirostat != 0) {
        // As common: mirostat replaces the whole chain, named samplers included.
        SamplerStage t = stage("temp");
        t.t = p.temperature;
        out.push_back(t);
        SamplerStage m = stage(p.mirostat == 1 ? "mirostat" : "mirostat_v2");
        m.tau = p.mirostat_tau;
        m.eta = p.mirostat_eta;
        out.push_back(m);
        return out;
    }
    const auto & names = p.samplers.empty() ? sampler_names() : p.samplers;
    bool adaptive = p.adaptive_target >= 0.0f;
    for (const auto & name : names) {
        if (p.samplers.empty() && name == "adaptive_p") continue;
        if (!add_named(out, name, p)) throw std::invalid_argument("samplers: unknown sampler '" + name + "'");
        if (name == "adaptive_p") adaptive = true;
    }
    if (adaptive) {
        SamplerStage a = stage("adaptive_p");
        a.target = p.adaptive_target < 0.0f ? 0.5f : p.adaptive_target;
        a.decay = p.adaptive_decay;
        out.push_back(a);
    } else {
        out.push_back(stage("dist"));
    }
    return out;
}

}  // namespace llama_crab
