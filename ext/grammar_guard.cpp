#include "grammar_guard.h"

#include <algorithm>
#include <cctype>

namespace llama_crab {

namespace {

// Skip a quoted literal or a character class starting at s[i] (the opening char);
// returns the index just past its end (or the end of the text if unterminated).
size_t skip_quoted(const std::string & s, size_t i, char close) {
    for (++i; i < s.size(); ++i) {
        if (s[i] == '\\') {
            ++i;
        } else if (s[i] == close) {
            return i + 1;
        }
    }
    return s.size();
}

// Saturating parse of a decimal integer at s[i]; advances i.
size_t read_count(const std::string & s, size_t & i) {
    size_t n = 0;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) {
        n = std::min<size_t>(n * 10 + static_cast<size_t>(s[i] - '0'), 1u << 30);
        ++i;
    }
    return n;
}

}  // namespace

GrammarShape grammar_shape(const std::string & s) {
    GrammarShape shape;
    size_t & total = shape.repetitions;
    size_t depth = 0;
    size_t i = 0;
    while (i < s.size()) {
        const char c = s[i];
        if (c == '(') {
            shape.nesting = std::max(shape.nesting, ++depth);
            ++i;
        } else if (c == ')') {
            depth -= depth > 0 ? 1 : 0;
            ++i;
        } else if (c == '"') {
            i = skip_quoted(s, i, '"');
        } else if (c == '[') {
            i = skip_quoted(s, i, ']');
        } else if (c == '#') {
            while (i < s.size() && s[i] != '\n') ++i;
        } else if (c == '{') {
            ++i;
            while (i < s.size() && s[i] == ' ') ++i;
            const size_t lo = read_count(s, i);
            while (i < s.size() && s[i] == ' ') ++i;
            size_t count = lo;
            if (i < s.size() && s[i] == ',') {
                ++i;
                while (i < s.size() && s[i] == ' ') ++i;
                const bool open_ended = i < s.size() && s[i] == '}';
                const size_t hi = open_ended ? lo + 1 : read_count(s, i);
                shape.inverted_repetition |= hi < lo;
                count = std::max(lo, hi);
            }
            total = std::min<size_t>(total + count, size_t(1) << 40);
        } else {
            ++i;
        }
    }
    return shape;
}

std::string grammar_cost_problem(const std::string & gbnf, const GrammarLimits & limits) {
    if (limits.max_bytes && gbnf.size() > limits.max_bytes) {
        return "is " + std::to_string(gbnf.size()) + " bytes; the server allows at most " +
               std::to_string(limits.max_bytes);
    }
    const GrammarShape shape = grammar_shape(gbnf);
    if (shape.inverted_repetition) {
        return "a {m,n} repetition has n < m";
    }
    if (limits.max_repetitions && shape.repetitions > limits.max_repetitions) {
        return "its {m,n} repetitions expand to " + std::to_string(shape.repetitions) +
               " copies in all; the server allows at most " + std::to_string(limits.max_repetitions);
    }
    if (limits.max_nesting && shape.nesting > limits.max_nesting) {
        return "parentheses nest " + std::to_string(shape.nesting) + " deep; at most " +
               std::to_string(limits.max_nesting) + " are allowed";
    }
    return "";
}

}  // namespace llama_crab
