// Cost bounds for a request's GBNF grammar, checked before llama.cpp parses it.
//
// llama.cpp expands `x{m,n}` repetitions into up to max(m, n) generated rules while it
// parses (each bounded at 2000 by llama.cpp itself, but not their sum), so a short text
// can still cost seconds and hundreds of MB. Bounding the text and the summed repetition
// counts keeps parsing and per-step grammar work small for every request.
#pragma once

#include <cstddef>
#include <string>

namespace llama_crab {

struct GrammarLimits {
    size_t max_bytes = 0;        // 0: unbounded
    size_t max_repetitions = 0;  // sum over all {m,n} of max(m, n); 0: unbounded
    // llama.cpp parses groups recursively: ~30,000 nested parentheses overflow the
    // stack and kill the process. Real grammars nest a few levels.
    size_t max_nesting = 100;
};

struct GrammarShape {
    size_t repetitions = 0;  // sum over all {m,n} of max(m, n) ({m,} counts m + 1)
    size_t nesting = 0;      // deepest parenthesis nesting
    // A {m,n} with n < m: llama.cpp computes n - m unsigned and loops ~2^64 times.
    bool inverted_repetition = false;
};

// Empty when `gbnf` is within the limits, else why not (for an INVALID_ARGUMENT).
std::string grammar_cost_problem(const std::string & gbnf, const GrammarLimits & limits);

// What drives llama.cpp's parse cost, read from the text alone, ignoring what sits inside
// string literals, character classes and comments.
GrammarShape grammar_shape(const std::string & gbnf);

}  // namespace llama_crab
