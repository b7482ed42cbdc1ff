// Fill in the middle: the prompt a code model expects for "write what goes between this
// prefix and this suffix", built from the vocabulary's FIM tokens as llama.cpp's server
// builds it (the repo-level pattern of Qwen2.5-Coder's report, arXiv 2409.12186):
//
//   [FIM_REP]project\n [FIM_SEP]file\n extra ... [FIM_SEP]filename\n
//   [FIM_PRE]prefix [FIM_SUF]suffix [FIM_MID]prompt
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "llama.h"

namespace llama_crab {

struct InfillTokens {
    llama_token pre = LLAMA_TOKEN_NULL, suf = LLAMA_TOKEN_NULL, mid = LLAMA_TOKEN_NULL;
    llama_token rep = LLAMA_TOKEN_NULL, sep = LLAMA_TOKEN_NULL;
    bool supported() const { return pre != LLAMA_TOKEN_NULL && suf != LLAMA_TOKEN_NULL && mid != LLAMA_TOKEN_NULL; }
};

InfillTokens infill_tokens(const llama_vocab * vocab);

struct InfillInput {
    std::string prefix, suffix;
    // Text the middle starts with (after FIM_MID), e.g. what the user typed so far.
    std::string prompt;
    // Other files of the project, as (filename, text): context before the prefix.
    std::vector<std::pair<std::string, std::string>> extra;
    std::string filename;  // the file being edited ("filename" when empty)
};

// The token ids to generate from. The prefix keeps its last 3/4 of `n_batch` tokens and
// the suffix its first quarter (less the prompt), as llama.cpp's server does; extra files
// fill what the context has left after a batch and twice `n_predict`, the latest kept.
// Throws std::invalid_argument ("infill: ...") when the vocabulary has no FIM tokens.
std::vector<llama_token> format_infill(const llama_vocab * vocab, const InfillInput & input, int32_t n_batch,
                                       int32_t n_predict, int32_t n_ctx);

}  // namespace llama_crab
