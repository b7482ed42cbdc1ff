#include "text_stream.h"

#include <algorithm>

namespace llama_crab {

namespace {

// Expected length of a UTF-8 sequence from its lead byte; 0 for a continuation or invalid byte.
size_t utf8_seq_len(unsigned char c) {
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) return 2;
    if ((c & 0xF0) == 0xE0) return 3;
    if ((c & 0xF8) == 0xF0) return 4;
    return 0;
}

const char kReplacement[] = "\xEF\xBF\xBD";

}  // namespace

size_t utf8_complete_prefix(const std::string & s) {
    size_t i = 0;
    while (i < s.size()) {
        const size_t len = utf8_seq_len(static_cast<unsigned char>(s[i]));
        if (len == 0) {  // stray byte: let the sanitizer replace it
            ++i;
            continue;
        }
        if (i + len > s.size()) {
            // Incomplete only if every byte so far is a continuation byte.
            for (size_t j = i + 1; j < s.size(); ++j) {
                if ((static_cast<unsigned char>(s[j]) & 0xC0) != 0x80) return s.size();
            }
            return i;
        }
        i += len;
    }
    return i;
}

std::string utf8_sanitize(const std::string & s) {
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        const size_t len = utf8_seq_len(c);
        bool ok = len != 0 && i + len <= s.size();
        for (size_t j = 1; ok && j < len; ++j) {
            ok = (static_cast<unsigned char>(s[i + j]) & 0xC0) == 0x80;
        }
        if (ok) {
            out.append(s, i, len);
            i += len;
        } else {
            out += kReplacement;
            ++i;
        }
    }
    return out;
}

TextStream::TextStream(std::vector<std::string> stop_sequences) : stops_(std::move(stop_sequences)) {
    stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
}

TextStream::Step TextStream::push(const std::string & piece, bool match_stops) {
    Step step;
    partial_ += piece;
    const size_t complete = utf8_complete_prefix(partial_);
    pending_ += utf8_sanitize(partial_.substr(0, complete));
    partial_.erase(0, complete);
    if (!match_stops) {
        // Before min_tokens: no stop sequence can end here, so nothing is held back.
        step.emit = std::move(pending_);
        pending_.clear();
        return step;
    }

    // Earliest full match wins; on a tie at one position, the longer stop sequence.
    size_t best_pos = std::string::npos;
    const std::string * best = nullptr;
    for (const auto & stop : stops_) {
        const size_t pos = pending_.find(stop);
        if (pos == std::string::npos) continue;
        if (pos < best_pos || (pos == best_pos && stop.size() > best->size())) {
            best_pos = pos;
            best = &stop;
        }
    }
    if (best) {
        step.emit = pending_.substr(0, best_pos);
        step.stopped = true;
        step.stop_sequence = *best;
        pending_.clear();
        partial_.clear();
        return step;
    }

    // Hold back the longest suffix that is a proper prefix of some stop sequence.
    size_t hold = 0;
    for (const auto & stop : stops_) {
        const size_t max_k = std::min(stop.size() - 1, pending_.size());
        for (size_t k = max_k; k > hold; --k) {
            if (pending_.compare(pending_.size() - k, k, stop, 0, k) == 0) {
                hold = k;
                break;
            }
        }
    }
    // Never cut inside a UTF-8 character: move the cut left to a character boundary.
    size_t cut = pending_.size() - hold;
    while (cut > 0 && (static_cast<unsigned char>(pending_[cut]) & 0xC0) == 0x80 && cut < pending_.size()) {
        --cut;
    }
    step.emit = pending_.substr(0, cut);
    pending_.erase(0, cut);
    return step;
}

std::string TextStream::flush() {
    std::string out = pending_ + utf8_sanitize(partial_);
    pending_.clear();
    partial_.clear();
    return out;
}

}  // namespace llama_crab
