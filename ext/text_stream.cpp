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

TextStream::TextStream(std::vector<std::string> stop_sequences, int32_t min_indent)
    : stops_(std::move(stop_sequences)), min_indent_(min_indent) {
    stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
}

size_t TextStream::indent_stop() {
    if (min_indent_ <= 0) return std::string::npos;
    for (; scanned_ < pending_.size(); ++scanned_) {
        const char c = pending_[scanned_];
        if (at_line_start_) {
            if (c == ' ' || c == '\t') {
                ++indent_;
                continue;
            }
            if (indent_ < min_indent_) return scanned_;
            at_line_start_ = false;
        }
        if (c == '\n') {
            at_line_start_ = true;
            indent_ = 0;
        }
    }
    return std::string::npos;
}

TextStream::Step TextStream::push(const std::string & piece, bool match_stops) {
    Step step;
    partial_ += piece;
    const size_t complete = utf8_complete_prefix(partial_);
    pending_ += utf8_sanitize(partial_.substr(0, complete));
    partial_.erase(0, complete);
    if (!match_stops) {
        // Before min_tokens: no stop sequence can end here, so nothing is held back; the
        // indentation rule keeps its place in the lines.
        for (size_t pos; (pos = indent_stop()) != std::string::npos;) {
            // A short line before min_tokens is let through; its first character may
            // itself be the newline that starts the next line.
            at_line_start_ = pending_[pos] == '\n';
            indent_ = 0;
            scanned_ = pos + 1;
        }
        step.emit = std::move(pending_);
        pending_.clear();
        scanned_ = 0;
        return step;
    }
    const size_t indent_pos = indent_stop();

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
    if (indent_pos != std::string::npos && (!best || indent_pos < best_pos)) {
        step.emit = pending_.substr(0, indent_pos);
        step.stopped = true;
        pending_.clear();
        partial_.clear();
        return step;
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
    scanned_ -= std::min(scanned_, cut);
    return step;
}

std::string TextStream::flush() {
    std::string out = pending_ + utf8_sanitize(partial_);
    pending_.clear();
    partial_.clear();
    return out;
}

}  // namespace llama_crab
