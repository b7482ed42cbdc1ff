// Embeddings: many inputs in one batch, each its own sequence, on a context of its own.
//
// The generation engine's context is the scheduler thread's alone; this one is the
// embedding callers' (one at a time: the engine holds a lock around each call, which also
// keeps close() from freeing the model under one), on the same model weights. The
// context returns every token's hidden state (pooling NONE) and the pooling is done here,
// so one context serves every pooling a request may ask for. Nothing here knows about
// Python or gRPC.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llama.h"

namespace llama_crab {

// The values of llama_pooling_type that an embedding request may ask for.
enum class Pooling : int32_t { Model = -1, None = 0, Mean = 1, Cls = 2, Last = 3 };

struct EmbedderParams {
    // Tokens one input may have, and one batch holds (0: min(n_ctx_train, 512)). A causal
    // model's context also computes logits for every token, so its output buffer is
    // n_vocab floats per token: 512 keeps that near 300 MB for a 150k vocabulary.
    uint32_t n_ctx = 0;
    int32_t n_threads = 4;
    int32_t flash_attn = -1;
    // Bounds on one call, so one request cannot hold the context for long.
    uint32_t max_inputs = 256;
    uint32_t max_tokens = 16384;
    // Batch-invariant kernels (see EngineParams::deterministic).
    bool deterministic = false;
};

struct Embedding {
    // Pooled: one row of n_embd; Pooling::None: one row per token.
    std::vector<float> values;
    int32_t n_rows = 0;
    int32_t n_tokens = 0;
};

struct EmbedResult {
    std::vector<Embedding> embeddings;
    int32_t n_embd = 0;
    int32_t pooling = 0;  // the pooling applied (the model's, when Pooling::Model was asked)
    int64_t prompt_tokens = 0;
};

class Embedder {
public:
    // Throws std::runtime_error if llama.cpp cannot create the context.
    Embedder(llama_model * model, const EmbedderParams & params);
    ~Embedder();
    Embedder(const Embedder &) = delete;
    Embedder & operator=(const Embedder &) = delete;

    // One call at a time. Throws std::invalid_argument ("inputs[3]: ...")
    // for an empty input, one longer than the context, too many inputs or tokens, a token
    // id out of the vocabulary, or a pooling the model cannot give.
    EmbedResult embed(const std::vector<std::vector<llama_token>> & inputs, Pooling pooling, bool normalize);

    int32_t n_ctx() const { return n_ctx_; }
    int32_t n_embd() const { return n_embd_; }

private:
    void validate(const std::vector<std::vector<llama_token>> & inputs) const;
    void run_batch(const std::vector<std::vector<llama_token>> & inputs, size_t first, size_t count, Pooling pooling,
                   bool normalize, EmbedResult & out);

    llama_context * ctx_ = nullptr;
    llama_batch batch_{};
    EmbedderParams params_;
    int32_t n_ctx_ = 0, n_embd_ = 0, n_vocab_ = 0, n_seq_max_ = 0;
    bool causal_ = true;
    Pooling default_pooling_ = Pooling::Mean;
};

// "none", "mean", "cls", "last", "model".
const char * pooling_name(Pooling pooling);

// Whether the model attends causally (a decoder); BERT-like encoders say otherwise in their GGUF.
bool model_is_causal(const llama_model * model);
// The model's own pooling (its GGUF's pooling_type), or for a model that names none,
// last-token for a causal model and mean otherwise.
Pooling model_default_pooling(const llama_model * model);

}  // namespace llama_crab
