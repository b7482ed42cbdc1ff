#include "embedder.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "batch_add.h"

namespace llama_crab {

namespace {

std::string meta(const llama_model * model, const std::string & key) {
    char buf[128];
    const int32_t n = llama_model_meta_val_str(model, key.c_str(), buf, sizeof buf);
    return n >= 0 ? std::string(buf) : std::string();
}

void l2_normalize(float * v, int32_t n) {
    double sum = 0.0;
    for (int32_t i = 0; i < n; ++i) sum += static_cast<double>(v[i]) * v[i];
    // A zero vector stays zero, as llama.cpp's common_embd_normalize leaves it.
    const double norm = std::sqrt(sum);
    if (norm <= 0.0) return;
    for (int32_t i = 0; i < n; ++i) v[i] = static_cast<float>(v[i] / norm);
}

}  // namespace

const char * pooling_name(Pooling pooling) {
    switch (pooling) {
        case Pooling::None: return "none";
        case Pooling::Mean: return "mean";
        case Pooling::Cls: return "cls";
        case Pooling::Last: return "last";
        case Pooling::Model: return "model";
    }
    return "?";
}

bool model_is_causal(const llama_model * model) {
    const std::string arch = meta(model, "general.architecture");
    return meta(model, arch + ".attention.causal") != "false";
}

Pooling model_default_pooling(const llama_model * model) {
    const std::string pooling = meta(model, meta(model, "general.architecture") + ".pooling_type");
    if (pooling == "1") return Pooling::Mean;
    if (pooling == "2") return Pooling::Cls;
    if (pooling == "3") return Pooling::Last;
    return model_is_causal(model) ? Pooling::Last : Pooling::Mean;
}

Embedder::Embedder(llama_model * model, const EmbedderParams & params) : params_(params) {
    causal_ = model_is_causal(model);
    default_pooling_ = model_default_pooling(model);

    const auto n_ctx_train = static_cast<uint32_t>(std::max(1, llama_model_n_ctx_train(model)));
    const uint32_t n_ctx = params.n_ctx > 0 ? params.n_ctx : std::min<uint32_t>(n_ctx_train, 512);

    llama_context_params cp = llama_context_default_params();
    cp.embeddings = true;
    cp.pooling_type = LLAMA_POOLING_TYPE_NONE;  // every token's state; pooled below
    cp.n_ctx = n_ctx;
    // An encoder sees a sequence whole: it must fit one micro-batch.
    cp.n_batch = n_ctx;
    cp.n_ubatch = n_ctx;
    cp.n_seq_max = static_cast<uint32_t>(std::min<size_t>(64, llama_max_parallel_sequences()));
    cp.kv_unified = true;
    cp.n_threads = params.n_threads;
    cp.n_threads_batch = params.n_threads;
    cp.flash_attn_type =
        params.deterministic ? LLAMA_FLASH_ATTN_TYPE_ENABLED : static_cast<llama_flash_attn_type>(params.flash_attn);
    cp.no_perf = true;
    ctx_ = llama_init_from_model(model, cp);
    if (!ctx_) throw std::runtime_error("cannot create llama.cpp's embedding context");
    if (params.deterministic) llama_set_cpu_reference_kernels(ctx_, true);
    n_ctx_ = static_cast<int32_t>(llama_n_batch(ctx_));
    n_seq_max_ = static_cast<int32_t>(llama_n_seq_max(ctx_));
    n_embd_ = llama_model_n_embd_out(model);
    n_vocab_ = llama_vocab_n_tokens(llama_model_get_vocab(model));
    batch_ = llama_batch_init(n_ctx_, 0, 1);
}

Embedder::~Embedder() {
    llama_batch_free(batch_);
    if (ctx_) llama_free(ctx_);
}

void Embedder::validate(const std::vector<std::vector<llama_token>> & inputs) const {
    if (inputs.empty()) throw std::invalid_argument("inputs: at least one input is required");
    if (inputs.size() > params_.max_inputs) {
        throw std::invalid_argument("inputs: " + std::to_string(inputs.size()) + " inputs, more than the " +
                                    std::to_string(params_.max_inputs) + " one request may embed");
    }
    uint64_t total = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
        const std::string field = "inputs[" + std::to_string(i) + "]";
        const auto & tokens = inputs[i];
        if (tokens.empty()) throw std::invalid_argument(field + ": empty (no tokens to embed)");
        if (tokens.size() > static_cast<size_t>(n_ctx_)) {
            throw std::invalid_argument(field + ": " + std::to_string(tokens.size()) +
                                        " tokens, more than the embedding context's " + std::to_string(n_ctx_));
        }
        for (llama_token t : tokens) {
            if (t < 0 || t >= n_vocab_) {
                throw std::invalid_argument(field + ": token id " + std::to_string(t) + " is not in the vocabulary");
            }
        }
        total += tokens.size();
    }
    if (total > params_.max_tokens) {
        throw std::invalid_argument("inputs: " + std::to_string(total) + " tokens in all, more than the " +
                                    std::to_string(params_.max_tokens) + " one request may embed");
    }
}

EmbedResult Embedder::embed(const std::vector<std::vector<llama_token>> & inputs, Pooling pooling, bool normalize) {
    validate(inputs);
    const auto p = static_cast<int32_t>(pooling);
    if (p < static_cast<int32_t>(Pooling::Model) || p > static_cast<int32_t>(Pooling::Last)) {
        throw std::invalid_argument("pooling: unknown pooling " + std::to_string(p));
    }
    if (pooling == Pooling::Model) pooling = default_pooling_;
    if (pooling == Pooling::Cls && causal_) {
        // The first token of a causal model has seen nothing but itself.
        throw std::invalid_argument("pooling: cls needs a bidirectional (encoder) model; use mean or last");
    }
    EmbedResult out;
    out.n_embd = n_embd_;
    out.pooling = static_cast<int32_t>(pooling);
    out.embeddings.resize(inputs.size());
    // Whole inputs per decode, in order, as many as fit the batch and the sequence ids.
    size_t first = 0;
    while (first < inputs.size()) {
        size_t count = 0;
        int32_t tokens = 0;
        while (first + count < inputs.size() && static_cast<int32_t>(count) < n_seq_max_ &&
               tokens + static_cast<int32_t>(inputs[first + count].size()) <= n_ctx_) {
            tokens += static_cast<int32_t>(inputs[first + count].size());
            ++count;
        }
        run_batch(inputs, first, count, pooling, normalize, out);
        first += count;
    }
    return out;
}

void Embedder::run_batch(const std::vector<std::vector<llama_token>> & inputs, size_t first, size_t count, Pooling pooling,
                         bool normalize, EmbedResult & out) {
    // Each batch starts from an empty cache: inputs never see each other.
    if (llama_memory_t mem = llama_get_memory(ctx_)) llama_memory_clear(mem, true);
    batch_.n_tokens = 0;
    for (size_t k = 0; k < count; ++k) {
        const auto & tokens = inputs[first + k];
        for (size_t p = 0; p < tokens.size(); ++p) {
            batch_add(batch_, tokens[p], static_cast<llama_pos>(p), static_cast<llama_seq_id>(k), true);
        }
    }
    if (llama_decode(ctx_, batch_) != 0) throw std::runtime_error("llama.cpp failed to compute the embeddings");

    int32_t row = 0;
    for (size_t k = 0; k < count; ++k) {
        const auto n = static_cast<int32_t>(inputs[first + k].size());
        Embedding & e = out.embeddings[first + k];
        e.n_tokens = n;
        out.prompt_tokens += n;
        auto token_row = [&](int32_t i) {
            const float * v = llama_get_embeddings_ith(ctx_, row + i);
            if (!v) throw std::runtime_error("llama.cpp returned no embedding");
            return v;
        };
        if (pooling == Pooling::None) {
            e.n_rows = n;
            e.values.resize(static_cast<size_t>(n) * n_embd_);
            for (int32_t i = 0; i < n; ++i) {
                float * dst = e.values.data() + static_cast<size_t>(i) * n_embd_;
                std::copy_n(token_row(i), n_embd_, dst);
                if (normalize) l2_normalize(dst, n_embd_);
            }
        } else {
            e.n_rows = 1;
            e.values.assign(static_cast<size_t>(n_embd_), 0.0f);
            if (pooling == Pooling::Mean) {
                std::vector<double> sum(static_cast<size_t>(n_embd_), 0.0);
                for (int32_t i = 0; i < n; ++i) {
                    const float * v = token_row(i);
                    for (int32_t j = 0; j < n_embd_; ++j) sum[static_cast<size_t>(j)] += v[j];
                }
                for (int32_t j = 0; j < n_embd_; ++j) e.values[static_cast<size_t>(j)] = static_cast<float>(sum[static_cast<size_t>(j)] / n);
            } else {
                std::copy_n(token_row(pooling == Pooling::Cls ? 0 : n - 1), n_embd_, e.values.data());
            }
            if (normalize) l2_normalize(e.values.data(), n_embd_);
        }
        row += n;
    }
}

}  // namespace llama_crab
