// The low-level API (`llama_crab._engine.lowlevel`): thin classes over llama.cpp's model,
// context, batch and sampler for people who write their own generation loops.
//
// Nothing here shares state with the Engine: a low-level Context is its own llama.cpp
// context (the engine's scheduler thread stays the only user of the engine's).
//
// Every misuse llama.cpp would abort on (or silently corrupt memory with) is checked
// first and thrown as a C++ exception the binding maps to a Python one:
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError,
//   ClosedError, BusyError, DecodeError (ContextFullError, DecodeCancelledError), StateError.
// The classes know nothing of Python; lowlevel_bindings.cpp adds the GIL handling and
// the Python-callable sampler stage.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "llama.h"
#include "sampler_chain.h"

namespace llama_crab::lowlevel {

// Use of an object after close().
struct ClosedError : std::runtime_error { using std::runtime_error::runtime_error; };
// Use of an object while another thread is inside one of its calls (decode, sample).
struct BusyError : std::runtime_error { using std::runtime_error::runtime_error; };
// llama_decode failed; `code` is its return value (0 when refused before calling it).
struct DecodeError : std::runtime_error {
    int code;
    DecodeError(const std::string & what, int code) : std::runtime_error(what), code(code) {}
};
// The batch does not fit: a position past the per-sequence context, or no KV slot (1).
struct ContextFullError : DecodeError { using DecodeError::DecodeError; };
// Context::cancel() stopped the decode (llama_decode returned 2).
struct DecodeCancelledError : DecodeError { using DecodeError::DecodeError; };
// A state could not be read, written, or applied (garbage, another model, I/O).
struct StateError : std::runtime_error { using std::runtime_error::runtime_error; };

struct ModelParams {
    std::string path;
    int32_t n_gpu_layers = 0;
    bool use_mmap = true;
    bool use_mlock = false;
    bool vocab_only = false;
    // llama.cpp's extra CPU buffer types (repacked weights, AMX): faster prefill, but a row's
    // result then depends on its place in the batch (docs/determinism.md).
    bool use_extra_bufts = true;
};

// The loaded weights; shared by the Model and every Context/Sampler made from it, so
// closing the Model while they live only drops the Model's own reference.
using ModelHandle = std::shared_ptr<llama_model>;

class Model {
public:
    explicit Model(const ModelParams & params);  // throws ModelLoadError
    void close() { handle_.reset(); }
    bool closed() const { return !handle_; }
    bool vocab_only() const { return vocab_only_; }  // no weights: no Context

    const ModelHandle & handle() const;  // throws ClosedError
    const llama_vocab * vocab() const;

    int32_t n_vocab() const;
    int32_t n_ctx_train() const;
    int32_t n_embd() const;
    int32_t n_layer() const;
    uint64_t n_params() const;
    uint64_t size() const;
    std::string description() const;
    std::map<std::string, std::string> metadata() const;
    std::optional<std::string> chat_template(const std::optional<std::string> & name) const;
    bool add_bos() const;
    bool add_eos() const;

    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string detokenize(const std::vector<llama_token> & tokens, bool remove_special, bool unparse_special) const;
    // The raw bytes of one token (may be part of a UTF-8 character).
    std::string token_to_bytes(llama_token token, bool special) const;
    // The same as text, invalid UTF-8 replaced by U+FFFD.
    std::string token_to_piece(llama_token token, bool special) const;
    // Special token ids by name (bos, eos, eot, sep, nl, pad, mask, fim_pre, ...); nullopt if absent.
    std::optional<llama_token> special_token(const std::string & name) const;
    bool is_eog(llama_token token) const;
    bool is_control(llama_token token) const;

    void check_token(llama_token token) const;  // std::out_of_range outside [0, n_vocab)

private:
    ModelHandle handle_;
    bool vocab_only_ = false;
};

// Tokens to decode: each with a position, the sequences it belongs to, and whether its
// logits are wanted. The capacity is fixed at construction.
class Batch {
public:
    Batch(int32_t capacity, int32_t n_seq_max);  // n_seq_max: sequence ids one token may carry
    void add(llama_token token, llama_pos pos, const std::vector<llama_seq_id> & seq_ids, bool logits);
    // tokens at positions pos, pos + 1, ...; logits for the last one if logits_last. All or nothing.
    void add_tokens(const std::vector<llama_token> & tokens, llama_pos pos, const std::vector<llama_seq_id> & seq_ids,
                    bool logits_last);
    void clear();
    int32_t size() const { return static_cast<int32_t>(tokens_.size()); }
    int32_t capacity() const { return capacity_; }
    int32_t n_seq_max() const { return n_seq_max_; }
    int32_t n_outputs() const;

    // A llama_batch view of the contents (valid until the next add/clear).
    llama_batch view();
    const std::vector<llama_token> & tokens() const { return tokens_; }
    const std::vector<llama_pos> & positions() const { return pos_; }
    const std::vector<std::vector<llama_seq_id>> & seq_ids() const { return seq_ids_; }
    const std::vector<int8_t> & logits() const { return logits_; }

    std::atomic<int> in_use{0};  // decodes reading it now: add/clear refuse meanwhile

private:
    void check_free() const;
    int32_t capacity_, n_seq_max_;
    std::vector<llama_token> tokens_;
    std::vector<llama_pos> pos_;
    std::vector<std::vector<llama_seq_id>> seq_ids_;
    std::vector<int32_t> n_seq_id_;
    std::vector<llama_seq_id *> seq_ptrs_;
    std::vector<int8_t> logits_;
};

struct ContextParams {
    uint32_t n_ctx = 2048;  // 0: the model's training context
    uint32_t n_batch = 512;
    uint32_t n_ubatch = 512;
    uint32_t n_seq_max = 1;
    int32_t n_threads = 0;        // 0: every core
    int32_t n_threads_batch = 0;  // 0: n_threads
    int32_t flash_attn = -1;      // llama_flash_attn_type: -1 auto, 0 off, 1 on
    bool kv_unified = false;      // false: each sequence gets n_ctx / n_seq_max cells of its own
    bool swa_full = true;         // sliding-window layers keep every position (llama.cpp's default)
    // ggml's CPU reference kernels: one kernel per op whatever the batch (docs/determinism.md).
    bool cpu_reference_kernels = false;
};

class Context {
public:
    // Holds the model until closed. A vocab_only model (no weights) is refused: llama.cpp
    // would make the context and abort on its first decode.
    Context(ModelHandle model, const ContextParams & params, bool vocab_only = false);
    ~Context();
    Context(const Context &) = delete;
    Context & operator=(const Context &) = delete;

    void close();  // throws BusyError while another thread is inside a call
    bool closed() const { return ctx_ == nullptr; }

    uint32_t n_ctx() const;
    uint32_t n_ctx_seq() const;  // positions per sequence (n_ctx / n_seq_max unless kv_unified)
    uint32_t n_batch() const;
    uint32_t n_ubatch() const;
    uint32_t n_seq_max() const;
    int32_t n_threads() const;
    int32_t n_threads_batch() const;
    void set_threads(int32_t n_threads, int32_t n_threads_batch);

    // Validate, then llama_decode. Call without the GIL. On a cancel or a failure the
    // positions this batch added are removed again, so the memory is as before the call.
    void decode(Batch & batch);
    // Ask the decode in progress (or, if none, the next one) to stop. Any thread.
    void cancel() { cancel_.store(true); }

    // Logits of batch position i (negative: from the end) of the last decode.
    std::vector<float> logits(int32_t i);
    // The top_n (token, log-probability) pairs of position i, most likely first.
    std::vector<std::pair<llama_token, float>> logprobs(int32_t i, int32_t top_n);

    // Memory (KV) operations. p0 < 0: from 0; p1 < 0: to the end.
    bool seq_rm(llama_seq_id seq, llama_pos p0, llama_pos p1);
    void seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1);
    void seq_keep(llama_seq_id seq);
    void seq_add(llama_seq_id seq, llama_pos p0, llama_pos p1, llama_pos delta);
    void seq_div(llama_seq_id seq, llama_pos p0, llama_pos p1, int d);
    llama_pos seq_pos_min(llama_seq_id seq);
    llama_pos seq_pos_max(llama_seq_id seq);
    void clear();

    // State: the whole memory, or one sequence's. A failed set/load leaves the memory
    // (or the sequence) empty and throws StateError.
    std::vector<uint8_t> state_get();
    void state_set(const std::vector<uint8_t> & data);
    void state_save(const std::string & path, const std::vector<llama_token> & tokens);
    std::vector<llama_token> state_load(const std::string & path);
    std::vector<uint8_t> seq_state_get(llama_seq_id seq);
    void seq_state_set(const std::vector<uint8_t> & data, llama_seq_id seq);
    void seq_state_save(const std::string & path, llama_seq_id seq, const std::vector<llama_token> & tokens);
    std::vector<llama_token> seq_state_load(const std::string & path, llama_seq_id seq);

private:
    friend class Sampler;
    static bool abort_callback(void * data);
    llama_context * raw() const;  // throws ClosedError
    llama_memory_t memory() const;
    void check_seq(llama_seq_id seq) const;  // std::out_of_range outside [0, n_seq_max)
    // Logits row of batch position i; the caller has borrowed the context.
    const float * row(int32_t i) const;

    ModelHandle model_;
    bool kv_unified_ = false;
    llama_context * ctx_ = nullptr;
    int32_t n_vocab_ = 0;
    bool causal_ = true;
    std::atomic<bool> busy_{false};
    std::atomic<bool> cancel_{false};
    std::atomic<bool> abort_seen_{false};
    // Logits flags of the last successful decode's batch (empty: no logits to read).
    std::vector<int8_t> outputs_;
};

// A sampler chain built from typed stages (sampler_chain.h), optionally ending in a custom
// selector: a function from the logits (one per vocabulary token, -inf where an earlier
// stage removed it) to a token id.
using CustomFn = std::function<llama_token(const std::vector<float> & logits)>;

class Sampler {
public:
    // n_ctx resolves a last_n of -1 (0: the model's training context).
    Sampler(ModelHandle model, const std::vector<SamplerStage> & stages, CustomFn custom, uint32_t seed,
            int32_t n_ctx);
    ~Sampler();
    Sampler(const Sampler &) = delete;
    Sampler & operator=(const Sampler &) = delete;

    void close();
    bool closed() const { return chain_ == nullptr; }
    bool has_custom() const { return static_cast<bool>(custom_); }

    // Sample from position idx of ctx's last decode, then accept the token.
    llama_token sample(Context & ctx, int32_t idx);
    void accept(llama_token token);
    void reset();

    // Called by the custom stage (the llama_sampler iface): runs custom_ and records errors.
    void apply_custom(llama_token_data_array * cur_p);

private:
    ModelHandle model_;
    int32_t n_vocab_ = 0;
    llama_sampler * chain_ = nullptr;
    CustomFn custom_;
    std::exception_ptr custom_error_;
    std::vector<llama_token_data> cur_;
    std::atomic<bool> busy_{false};
};

}  // namespace llama_crab::lowlevel
