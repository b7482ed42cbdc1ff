#include "infill.h"

#include <algorithm>
#include <stdexcept>

#include "common.h"

namespace llama_crab {

InfillTokens infill_tokens(const llama_vocab * vocab) {
    InfillTokens t;
    t.pre = llama_vocab_fim_pre(vocab);
    t.suf = llama_vocab_fim_suf(vocab);
    t.mid = llama_vocab_fim_mid(vocab);
    t.rep = llama_vocab_fim_rep(vocab);
    t.sep = llama_vocab_fim_sep(vocab);
    return t;
}

std::vector<llama_token> format_infill(const llama_vocab * vocab, const InfillInput & input, int32_t n_batch,
                                       int32_t n_predict, int32_t n_ctx) {
    const InfillTokens fim = infill_tokens(vocab);
    if (!fim.supported()) {
        throw std::invalid_argument("infill: the model's vocabulary has no fill-in-the-middle tokens");
    }
    auto tokenize = [&](const std::string & text) { return common_tokenize(vocab, text, false, false); };
    auto append = [](std::vector<llama_token> & to, const std::vector<llama_token> & from) {
        to.insert(to.end(), from.begin(), from.end());
    };

    std::vector<llama_token> extra;
    if (fim.rep != LLAMA_TOKEN_NULL) {
        extra.push_back(fim.rep);
        append(extra, tokenize("myproject\n"));
    }
    for (const auto & [name, text] : input.extra) {
        if (fim.sep != LLAMA_TOKEN_NULL) {
            extra.push_back(fim.sep);
            append(extra, tokenize((name.empty() ? std::string("tmp") : name) + "\n"));
        } else {
            // Models without a file separator get a plain-text one between snippets.
            append(extra, tokenize("\n\n--- snippet ---\n\n"));
        }
        append(extra, tokenize(text));
    }
    if (fim.sep != LLAMA_TOKEN_NULL) {
        extra.push_back(fim.sep);
        append(extra, tokenize((input.filename.empty() ? std::string("filename") : input.filename) + "\n"));
    }

    std::vector<llama_token> prefix = tokenize(input.prefix);
    std::vector<llama_token> suffix = tokenize(input.suffix);
    const std::vector<llama_token> prompt = tokenize(input.prompt);
    // The code nearest the cursor matters most: the prefix's end and the suffix's start.
    const auto n_prefix = std::min<size_t>(prefix.size(), static_cast<size_t>(3 * (n_batch / 4)));
    const auto n_suffix = std::min<size_t>(
        suffix.size(), static_cast<size_t>(std::max<int64_t>(0, n_batch / 4 - (2 + static_cast<int64_t>(prompt.size())))));
    const auto n_extra = std::min<size_t>(
        extra.size(), static_cast<size_t>(std::max<int64_t>(0, int64_t{n_ctx} - n_batch - 2 * int64_t{n_predict})));
    prefix.erase(prefix.begin(), prefix.end() - static_cast<std::ptrdiff_t>(n_prefix));
    suffix.resize(n_suffix);

    std::vector<llama_token> out;
    out.insert(out.end(), extra.end() - static_cast<std::ptrdiff_t>(n_extra), extra.end());
    if (llama_vocab_get_add_bos(vocab)) out.push_back(llama_vocab_bos(vocab));
    out.push_back(fim.pre);
    append(out, prefix);
    out.push_back(fim.suf);
    append(out, suffix);
    out.push_back(fim.mid);
    append(out, prompt);
    return out;
}

}  // namespace llama_crab
