// Sampler chains from typed stages: one stage = one llama.cpp sampler with its parameters.
//
// Shared by the engine (a request's explicit chain, or its flat options expanded to the
// same stages) and the low-level `Sampler`. Knows llama.cpp's sampler API, nothing else.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llama.h"

namespace llama_crab {

// One stage. `kind` picks the llama.cpp sampler; each kind reads only its own fields:
//   greedy, dist                       (selectors, no parameters)
//   top_k        k
//   top_p        p, min_keep
//   min_p        p, min_keep
//   typical      p, min_keep
//   temp         t
//   dynamic_temp t, range, exponent
//   xtc          probability, threshold, min_keep
//   top_n_sigma  n
//   mirostat     tau, eta, m           (selector)
//   mirostat_v2  tau, eta              (selector)
//   penalties    last_n, repeat, frequency, presence
//   dry          multiplier, base, allowed_length, last_n, sequence_breakers
//   adaptive_p   target, decay         (selector)
// Defaults are llama.cpp common's. The valid ranges are checked by stage_problem().
struct SamplerStage {
    std::string kind;
    int32_t k = 40;
    float p = 0.95f;
    int32_t min_keep = 0;
    float t = 0.8f;
    float range = 0.0f;
    float exponent = 1.0f;
    float probability = 0.0f;
    float threshold = 0.1f;
    float n = 1.0f;
    float tau = 5.0f;
    float eta = 0.1f;
    int32_t m = 100;
    int32_t last_n = 64;  // -1: the whole context
    float repeat = 1.0f;
    float frequency = 0.0f;
    float presence = 0.0f;
    float multiplier = 0.0f;
    float base = 1.75f;
    int32_t allowed_length = 2;
    std::vector<std::string> sequence_breakers = {"\n", ":", "\"", "*"};
    float target = -1.0f;
    float decay = 0.9f;
};

// DRY sequence breakers are matched against the whole vocabulary when the sampler is
// built (~6 ms for one character, ~80-100 ms for a longer one on a 49k vocabulary), so a
// request, all its DRY stages together, holds at most 8, at most 2 of them longer.
constexpr int64_t kMaxSequenceBreakers = 8;
constexpr int64_t kMaxLongSequenceBreakers = 2;

// Empty when the stages' DRY breakers (an empty list counting as common's defaults) are
// within the bounds above, else why not.
std::string sequence_breaker_problem(const std::vector<SamplerStage> & stages);

// Every kind, in the order documented above.
const std::vector<std::string> & stage_kinds();

// A selector picks the token (it must be the chain's last stage).
bool is_selector(const std::string & kind);

// Empty when the stage is valid, else "<parameter>: <why>" (or "kind: ..." for an
// unknown kind). Ranges are the ones documented in the proto.
std::string stage_problem(const SamplerStage & stage);

// Empty when the chain is valid, else "[i].<parameter>: <why>" naming the first bad
// stage (selectors only last; at most `max_stages` stages).
std::string chain_problem(const std::vector<SamplerStage> & stages, size_t max_stages);

// A new llama.cpp sampler for a valid stage (the caller owns it). `n_ctx` resolves a
// last_n of -1; `seed` seeds the random stages (dist, xtc, mirostat, adaptive_p).
llama_sampler * build_stage(const SamplerStage & stage, const llama_vocab * vocab, uint32_t seed, int32_t n_ctx);

// Append the stages to `chain` (a llama_sampler_chain), then `dist` when the last stage
// is not a selector.
void append_stages(llama_sampler * chain, const std::vector<SamplerStage> & stages, const llama_vocab * vocab,
                   uint32_t seed, int32_t n_ctx);

// A stage that bans every end-of-generation token until it has accepted `n_tokens`
// tokens (`min_tokens`). Put it before the others so no later stage sees them.
llama_sampler * init_eog_ban(const llama_vocab * vocab, int32_t n_tokens);

}  // namespace llama_crab
