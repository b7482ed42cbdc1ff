// One submitted completion: its inputs, its cancel flag and its output event queue.
// Shared between the caller (Python thread) and the engine's scheduler thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "chat_bridge.h"
#include "llama.h"
#include "sampler_chain.h"

struct common_sampler;

namespace llama_crab {

enum class StopReason { LENGTH, EOS, STOP_SEQUENCE, CANCELLED };

struct SamplingParams {
    int32_t max_tokens = 16;
    std::vector<std::string> stop_sequences;
    // Infill: a line after the first that starts with less indentation than this (spaces
    // or tabs) ends the text there (0: off); set from InfillInput::indent.
    int32_t min_indent = 0;
    int32_t logprobs = -1;  // -1: off; N >= 0: chosen token + top-N alternatives
    float temperature = 0.0f;
    int32_t top_k = 40;
    float top_p = 0.95f;
    float min_p = 0.05f;
    float typical_p = 1.0f;
    float repeat_penalty = 1.0f;
    float presence_penalty = 0.0f;
    float frequency_penalty = 0.0f;
    int32_t penalty_last_n = 64;
    bool has_seed = false;
    uint32_t seed = 0;
    std::vector<std::pair<int32_t, float>> logit_bias;
    std::string grammar;
    std::vector<std::string> samplers;  // empty: llama.cpp common's default order
    bool cache_prompt = true;           // reuse a cached prefix of the prompt (if the engine caches)
    bool speculative = true;            // draft and verify (if the engine speculates)
    // The rest of llama.cpp common's sampling parameters, same names and meanings as
    // CompletionOptions (whose defaults are the ones that count: Python always sets them).
    int32_t min_keep = 0;
    float top_n_sigma = -1.0f;
    float xtc_probability = 0.0f;
    float xtc_threshold = 0.1f;
    float dry_multiplier = 0.0f;
    float dry_base = 1.75f;
    int32_t dry_allowed_length = 2;
    int32_t dry_penalty_last_n = 64;
    std::vector<std::string> dry_sequence_breakers;  // empty: common's defaults
    int32_t mirostat = 0;
    float mirostat_tau = 5.0f;
    float mirostat_eta = 0.1f;
    float dynatemp_range = 0.0f;
    float dynatemp_exponent = 1.0f;
    float adaptive_target = -1.0f;
    float adaptive_decay = 0.9f;
    bool ignore_eos = false;
    int32_t min_tokens = 0;       // end-of-generation and stop sequences wait for this many tokens
    std::string json_schema;      // converted to a grammar at submit; not with `grammar`
    std::vector<SamplerStage> sampler_chain;  // explicit typed chain; wins over the flat fields

    // Set by chat (from the template), never by callers: how the grammar applies.
    int32_t grammar_type = 1;  // common_grammar_type; 1: the caller's own GBNF
    bool grammar_lazy = false;  // applies from the first trigger on
    std::vector<ChatTrigger> grammar_triggers;
    std::vector<std::string> preserved_tokens;  // tokens a trigger may be
    std::string generation_prompt;  // what the prompt ends with, fed to a chat grammar first
    std::string grammar_field = "grammar";  // the request field an error about the grammar names
};

// Names the `samplers` shorthand accepts, in llama.cpp common's default order.
const std::vector<std::string> & sampler_names();

// The stages a request samples with: its `sampler_chain`, else its flat options expanded
// as llama.cpp's common sampler does (greedy when temperature <= 0). Ends in a selector.
std::vector<SamplerStage> expand_stages(const SamplingParams & params);

struct TopLogprob {
    int32_t token_id = 0;
    std::string text;
    float logprob = 0.0f;
};

struct TokenLogprob {
    int32_t token_id = 0;
    std::string text;
    float logprob = 0.0f;
    std::vector<TopLogprob> top;
};

// A chunk (is_final == false) or the final completion (is_final == true).
struct Event {
    bool is_final = false;
    std::string text;                 // chunk text, or the whole generated text when final
    std::vector<int32_t> token_ids;   // this chunk's tokens, or all generated tokens when final
    int32_t n_tokens = 0;             // tokens generated so far (cumulative)
    std::optional<std::vector<TokenLogprob>> logprobs;
    // Chat: the assistant message's changes in this chunk, and the whole message (as
    // delivered) on the final event.
    std::vector<ChatDelta> chat_deltas;
    std::optional<ChatMessage> chat_message;

    // final only
    StopReason stop_reason = StopReason::LENGTH;
    std::string stop_sequence;
    int32_t prompt_tokens = 0;
    int32_t cached_tokens = 0;
    double queue_ms = 0, ttft_ms = 0, prompt_tps = 0, decode_tps = 0, total_ms = 0;
    int32_t draft_tokens = 0, draft_accepted_tokens = 0;  // speculative decoding
    std::string error;  // non-empty if the engine failed this sequence
    // Set with `error` when the request itself caused the failure (e.g. a grammar that
    // leaves no token allowed): the field to blame, so callers get INVALID_ARGUMENT.
    std::string error_field;
};

// Approximate bytes an event holds while it waits for its consumer (backpressure).
size_t event_bytes(const Event & ev);

class Request {
public:
    using clock = std::chrono::steady_clock;

    Request(uint64_t id, std::vector<llama_token> prompt, SamplingParams params, common_sampler * sampler);
    ~Request();
    Request(const Request &) = delete;
    Request & operator=(const Request &) = delete;

    const uint64_t id;
    const std::vector<llama_token> prompt;
    const SamplingParams params;
    common_sampler * const sampler;  // owned; used only by the scheduler thread once submitted
    // Chat requests: parses the output into the assistant message (scheduler thread only).
    std::unique_ptr<ChatStream> chat;

    // Caller side. All are thread-safe; wait() blocks and must be called without the GIL.
    void cancel() { cancelled_.store(true, std::memory_order_relaxed); }
    bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }
    std::vector<Event> poll();
    std::vector<Event> wait(double timeout_s);  // < 0: no timeout
    int fileno() const { return pipe_r_; }
    bool finished() const;

    // Scheduler side.
    void push(Event ev);
    // Bytes of events pushed but not yet taken by the consumer.
    size_t buffered_bytes() const { return buffered_bytes_.load(std::memory_order_relaxed); }

    // Timings, written by the scheduler thread only.
    clock::time_point t_submit = clock::now();
    clock::time_point t_admit{}, t_prompt_done{}, t_first_token{};

private:
    std::vector<Event> take_locked();
    void drain_pipe_locked();

    std::atomic<bool> cancelled_{false};
    std::atomic<size_t> buffered_bytes_{0};
    mutable std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Event> events_;
    bool final_pushed_ = false;
    bool signaled_ = false;  // a byte sits in the pipe
    int pipe_r_ = -1, pipe_w_ = -1;
};

}  // namespace llama_crab
