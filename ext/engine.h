// The engine: one model, one llama_context, many sequences.
//
// A single scheduler thread owns the context (llama.cpp contexts are not thread-safe).
// Callers submit requests into a bounded wait queue; each step the scheduler admits
// waiting requests into free slots, builds ONE llama_batch holding a token for every
// decoding slot plus prompt pieces for prefilling slots (continuous batching), decodes,
// then samples, detokenizes and checks stops per slot, pushing chunks to each request.
// Nothing here knows about Python or gRPC.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "chat_bridge.h"
#include "embedder.h"
#include "infill.h"
#include "llama.h"
#include "prompt_cache.h"
#include "request.h"
#include "speculator.h"
#include "step_cost.h"
#include "thread_governor.h"

namespace llama_crab {

struct EngineParams {
    std::string model_path;
    uint32_t n_ctx = 2048;
    uint32_t n_batch = 512;
    uint32_t n_ubatch = 512;
    int32_t n_threads = 4;
    int32_t n_threads_batch = 4;
    int32_t n_gpu_layers = -1;
    bool use_mmap = true;
    bool use_mlock = false;
    int32_t flash_attn = -1;  // llama_flash_attn_type: -1 auto, 0 off, 1 on
    uint32_t seed = LLAMA_DEFAULT_SEED;
    int32_t n_parallel = 1;
    int32_t max_queue = 0;  // 0: unbounded

    // Bounds on what one request may cost the others (0: unbounded).
    uint32_t max_grammar_bytes = 32 * 1024;
    uint32_t max_grammar_repetitions = 10000;  // summed {m,n} counts (see grammar_guard.h)
    // CPU time one sequence's sampling may take in one step; a sequence over it fails
    // (its grammar or sampler chain is too costly to keep in a shared batch).
    double max_sample_ms = 100.0;
    // Backpressure: a sequence whose consumer has not taken this many bytes of events
    // is paused (skipped in the batch, KV kept) until it does.
    uint32_t max_buffered_bytes = 256 * 1024;
    // A sequence paused this long is cancelled (0: at once, i.e. never pause; < 0: never).
    int32_t slow_reader_timeout_ms = 120000;

    // Prefix cache: a finished sequence keeps its tokens and KV; a new request takes the
    // free slot sharing the longest prefix with its prompt and prefills only the rest.
    bool cache_prompt = true;
    // Host-RAM cache of evicted sequence states, in bytes (0: off).
    uint64_t cache_ram_bytes = 512ull << 20;

    // Prompt tokens one step may prefill beside decoding sequences (0: n_batch; a prompt
    // with nobody decoding always gets whole batches). Less keeps the other streams'
    // inter-token latency low while a long prompt arrives; more gets the newcomer's first
    // token sooner. 128 by the mixed-load benchmark (docs/mixed-load.md).
    uint32_t prefill_step_tokens = 128;

    // Drop compute threads while a neighbour process takes their cores, and take them back
    // when cores are idle (see thread_governor.h); false: always n_threads.
    bool adaptive_threads = true;

    // Chat: a Jinja template's source replacing the model's own (empty: the model's).
    std::string chat_template;

    // Speculative decoding (off unless `speculative.types` names one): each decoding
    // sequence puts a draft after its sampled token, verified in the same batch.
    SpeculativeParams speculative;
    // Deterministic mode (CPU): a request's tokens and logprobs do not depend on the batch
    // around it, its prefill chunking, the prefix cache or speculation. One kernel per op
    // for every row (ggml's CPU reference kernels through a patch, docs/determinism.md),
    // no repacked weights, flash attention on, full sliding-window cache.
    bool deterministic = false;

    // Embeddings (a context of their own, created on the first Embed; see embedder.h).
    uint32_t embed_n_ctx = 0;  // tokens one input may have (0: min(n_ctx_train, 512))
    uint32_t max_embed_inputs = 256;
    uint32_t max_embed_tokens = 16384;
};

struct ModelInfo {
    std::string name, architecture, description;
    uint64_t n_params = 0;
    int32_t n_ctx_train = 0, n_ctx = 0, n_vocab = 0, n_slots = 0;
    bool has_chat_template = false;
    bool supports_tools = false;  // the chat template has a tool-call format
    bool generates = true;        // false: an encoder (BERT) that only embeds
    bool supports_infill = false; // the vocabulary has the fill-in-the-middle tokens
    int32_t n_embd = 0;           // the length of an embedding
    std::string embed_pooling;    // the pooling an Embed request gets by default ("mean", ...)
};

struct Metrics {
    int32_t n_slots = 0, busy_slots = 0, queue_depth = 0, paused_slots = 0;
    uint64_t requests_total = 0, prompt_tokens_total = 0, completion_tokens_total = 0, decode_steps_total = 0;
    uint64_t pauses_total = 0, slow_reader_cancels_total = 0, guarded_failures_total = 0;
    // Prompt tokens reused from a slot or the RAM cache, and prompt tokens computed.
    uint64_t cache_hit_tokens_total = 0, cache_miss_tokens_total = 0;
    uint64_t ram_cache_bytes = 0, ram_cache_entries = 0, ram_cache_budget = 0;
    uint64_t ram_cache_saves_total = 0, ram_cache_restores_total = 0;
    int32_t n_threads_active = 0;  // compute threads decoding now (adaptive_threads)
    // Speculative decoding: draft tokens put into batches, and those the target accepted.
    uint64_t draft_tokens_total = 0, draft_accepted_tokens_total = 0;
    // Embeddings: inputs embedded, and their tokens.
    uint64_t embed_inputs_total = 0, embed_tokens_total = 0;
};

struct ModelLoadError : std::runtime_error { using std::runtime_error::runtime_error; };
struct InvalidGrammarError : std::invalid_argument { using std::invalid_argument::invalid_argument; };
struct QueueFullError : std::runtime_error { using std::runtime_error::runtime_error; };
struct EngineClosedError : std::runtime_error { using std::runtime_error::runtime_error; };

class Engine {
public:
    explicit Engine(const EngineParams & params);  // loads the model; throws ModelLoadError
    ~Engine();
    Engine(const Engine &) = delete;
    Engine & operator=(const Engine &) = delete;

    // Thread-safe. Throws InvalidGrammarError, QueueFullError, EngineClosedError, std::invalid_argument.
    std::shared_ptr<Request> submit(std::vector<llama_token> prompt, SamplingParams params,
                                    std::unique_ptr<ChatStream> chat = nullptr);

    // Chat: render the messages with the model's template, then submit like `submit`; the
    // request's chunks carry the assistant message's deltas, its final the message.
    // Thread-safe. Throws std::invalid_argument ("field: problem") for what the template
    // or the tools cannot take, and what `submit` throws.
    std::shared_ptr<Request> submit_chat(const ChatInputs & inputs, SamplingParams params);
    // Fill in the middle: the model's FIM prompt (infill.h), submitted like any prompt
    // (with SamplingParams::min_indent for the end of the block). Throws
    // std::invalid_argument ("infill: ...") for a model without FIM tokens.
    std::vector<llama_token> infill_prompt(const InfillInput & input, int32_t max_tokens) const;
    // The rendered prompt and constraints, without submitting (tests, tooling).
    ChatPrompt apply_chat(const ChatInputs & inputs) const;

    // Cancel everything, stop the scheduler and free the context. Idempotent; call from one thread.
    void close();

    // Thread-safe, read-only uses of the vocabulary.
    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string detokenize(const std::vector<llama_token> & tokens, bool remove_special, bool unparse_special) const;
    int32_t n_vocab() const;
    int32_t n_ctx_per_slot() const { return n_ctx_seq_; }

    ModelInfo model_info() const;
    Metrics metrics() const;

    // Embeddings of whole inputs (token ids), on the embedding context, which the first call
    // creates. Runs on the caller's thread beside the scheduler's decoding. Thread-safe;
    // throws std::invalid_argument ("inputs[2]: ...", "pooling: ...") and EngineClosedError.
    EmbedResult embed(const std::vector<std::vector<llama_token>> & inputs, Pooling pooling, bool normalize);

    // Sessions. The KV state of the longest prefix of `tokens` that a free slot or the RAM
    // cache holds (llama_state_seq_get_data bytes), and in `state_tokens` the tokens it
    // covers; empty when nothing is held. Blocks until the scheduler thread answers.
    std::vector<uint8_t> sequence_state(const std::vector<llama_token> & tokens,
                                        std::vector<llama_token> & state_tokens);
    // Put a saved state back: restored into the least recently used free slot (which
    // checks it; throws std::invalid_argument if llama.cpp refuses it) and kept in the RAM
    // cache, so the session's next request finds its prefix.
    void add_sequence_state(const std::vector<llama_token> & tokens, const std::vector<uint8_t> & state);

private:
    struct Slot;

    void run();
    void admit_locked();
    // Run `fn` on the scheduler thread between steps (it owns the context); rethrows.
    void call_on_scheduler(std::function<void()> fn);
    void run_tasks();
    bool build_batch();
    void after_decode();
    int32_t sample_slot(Slot & slot);
    bool take_token(Slot & slot, llama_token id, int32_t row, std::string & text);
    void request_drafts(int32_t n_batch);
    void calibrate_step_cost();
    void emit(Slot & slot, const std::string & text);
    void push_chunk(Slot & slot, Event ev);
    void finish_chat(Slot & slot);
    void finish(Slot & slot, StopReason reason, const std::string & stop_sequence = "", const std::string & error = "",
                const std::string & error_field = "");
    bool backlogged(const Slot & slot) const;
    Slot * pick_slot(const Request & req);
    void prepare(Slot & slot);
    void save_to_ram(const Slot & slot);
    bool restore_from_ram(Slot & slot, const std::vector<uint8_t> & state);
    bool caching(const Request & req) const;
    void cancel_slow_readers();
    void validate(const std::vector<llama_token> & prompt, const SamplingParams & params) const;
    void fail_batch(const std::string & error);
    TokenLogprob logprob_of(int32_t batch_idx, llama_token token, int32_t top_n);
    common_sampler * make_sampler(const SamplingParams & p) const;
    void probe_grammar_cost(const std::string & grammar) const;
    static bool abort_callback(void * data);
    void ensure_open() const;

    EngineParams params_;
    llama_model * model_ = nullptr;
    llama_context * ctx_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
    int32_t n_ctx_seq_ = 0;
    std::unique_ptr<ChatTemplates> chat_templates_;
    std::unique_ptr<Speculator> speculator_;  // scheduler thread only, after construction
    bool generates_ = true;                   // false for an encoder-only model
    std::mutex embedder_mu_;                  // held by an embed call, and by close()
    std::unique_ptr<Embedder> embedder_;     // guarded by embedder_mu_
    bool embedding_closed_ = false;           // guarded by embedder_mu_
    StepCostModel step_cost_;                 // measured at start, then read-only
    ThreadGovernor governor_;        // scheduler thread only
    int32_t n_threads_now_ = 0;      // scheduler thread only
    std::atomic<int32_t> n_threads_active_{0};
    llama_batch batch_{};
    std::vector<Slot> slots_;
    int32_t n_vocab_ = 0;

    mutable std::mutex mu_;  // guards queue_, closing_, metrics counters read by callers
    std::condition_variable cv_;
    std::deque<std::shared_ptr<Request>> queue_;
    struct Task {
        std::function<void()> fn;
        std::promise<void> done;
    };
    std::deque<std::shared_ptr<Task>> tasks_;  // guarded by mu_
    bool closing_ = false;
    std::atomic<bool> stop_{false};
    uint64_t next_id_ = 1;
    std::atomic<int32_t> busy_slots_{0}, paused_slots_{0};
    std::atomic<uint64_t> pauses_total_{0}, slow_reader_cancels_total_{0}, guarded_failures_total_{0};
    std::atomic<uint64_t> cache_hit_tokens_total_{0}, cache_miss_tokens_total_{0};
    std::atomic<uint64_t> ram_cache_saves_total_{0}, ram_cache_restores_total_{0};
    std::atomic<uint64_t> embed_inputs_total_{0}, embed_tokens_total_{0};
    std::unique_ptr<PromptCache> ram_cache_;
    uint64_t use_clock_ = 0;  // orders slot use for least-recently-used choices
    std::atomic<uint64_t> requests_total_{0}, prompt_tokens_total_{0}, completion_tokens_total_{0}, decode_steps_total_{0};
    std::thread thread_;
};

}  // namespace llama_crab
