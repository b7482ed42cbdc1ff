// Incremental output text for one sequence: turns token pieces into chunks that never
// split a UTF-8 character and never show (any part of) a stop sequence.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace llama_crab {

class TextStream {
public:
    // `min_indent` > 0: a line after the first whose first character that is not a space
    // or tab (a newline included) comes before that column ends the text there, as
    // llama.cpp's server's `n_indent` does for code completion.
    explicit TextStream(std::vector<std::string> stop_sequences, int32_t min_indent = 0);

    struct Step {
        std::string emit;           // text safe to hand out now (may be empty)
        bool stopped = false;       // a stop sequence matched; generation must end
        std::string stop_sequence;  // which one (empty: the indentation rule ended it)
    };

    // Append a token's bytes. Text that may still become a stop sequence, or that
    // ends in an incomplete UTF-8 character, is held back until decided. With
    // `match_stops` false (before min_tokens) stop sequences are not looked for: they
    // match only in text pushed with it true.
    Step push(const std::string & piece, bool match_stops = true);

    // Generation ended for another reason: release whatever is held back. A trailing
    // incomplete UTF-8 character becomes U+FFFD so the output is always valid UTF-8.
    std::string flush();

private:
    // Where the indentation rule ends `pending_` (npos: nowhere yet); scans new text only.
    size_t indent_stop();

    std::vector<std::string> stops_;
    int32_t min_indent_ = 0;
    bool at_line_start_ = false;  // in the indentation of a line after the first
    int32_t indent_ = 0;          // its width so far
    size_t scanned_ = 0;          // bytes of pending_ already scanned
    std::string pending_;  // decoded text not yet emitted (complete characters only)
    std::string partial_;  // bytes of a UTF-8 character not yet complete
};

// Length of the longest prefix of `s` made of complete UTF-8 sequences. Invalid lead
// bytes count as complete (they are replaced later), so this never stalls.
size_t utf8_complete_prefix(const std::string & s);

// Replace invalid UTF-8 with U+FFFD so the text can always cross into Python.
std::string utf8_sanitize(const std::string & s);

}  // namespace llama_crab
