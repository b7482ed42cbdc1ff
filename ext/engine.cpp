#include "engine.h"

#include <time.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <cmath>
#include <mutex>

#include "batch_add.h"
#include "common.h"
#include "grammar_guard.h"
#include "json-schema-to-grammar.h"
#include "json.h"
#include "log_bridge.h"
#include "sampling.h"
#include "text_stream.h"
#include "thread_governor.h"

namespace llama_crab {

namespace {

double ms_between(Request::clock::time_point a, Request::clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
}

std::once_flag g_backend_once;

// CPU time of the calling thread: the cost guard must not fire because the host was busy.
double thread_cpu_ms() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) / 1e6;
}

}  // namespace

// One llama.cpp sequence: its KV outlives the requests it serves (the prefix cache).
struct Sequence {
    llama_seq_id id = 0;
    std::vector<llama_token> tokens;  // tokens whose KV the sequence holds, in position order
    size_t tokens_before_batch = 0;   // tokens.size() before the batch in flight (rolled back on failure)
    uint64_t last_used = 0;           // for least-recently-used choices
};

// Where a slot's request is. FREE: none. ADMITTED: its KV is matched to the prompt
// (prepare) before the next batch. PREFILLING: prompt pieces go into batches.
// DECODING: prompt done, one sampled token per batch.
enum class SlotState { FREE, ADMITTED, PREFILLING, DECODING };

// A slot: a sequence, and the request in flight on it.
struct Engine::Slot {
    Sequence seq;
    SlotState state = SlotState::FREE;
    int32_t n_cached = 0;  // prompt tokens the current request reused

    std::shared_ptr<Request> req;  // null when free
    size_t n_prompt_done = 0;      // prompt tokens already put into a batch
    llama_pos n_past = 0;          // next position in this sequence
    llama_token next_token = 0;    // sampled, to be fed in the next batch
    int32_t i_batch = -1;          // row of this slot's logits in the current batch, -1 if none
    bool in_batch = false;
    bool paused = false;           // consumer too far behind: skipped until it catches up
    Request::clock::time_point paused_since{};
    std::unique_ptr<TextStream> text;
    std::vector<int32_t> generated;
    std::string delivered_text;
    std::string chat_pending_text;      // chat: released text not yet in a chunk
    std::vector<int32_t> chunk_tokens;  // generated but not yet handed out in a chunk
    std::vector<TokenLogprob> chunk_logprobs, all_logprobs;
    // Speculative decoding: the draft following next_token in the batch in flight (its
    // rows are i_batch + 1 ...), and this request's drafted and accepted counts.
    std::vector<llama_token> draft;
    int32_t n_drafted = 0, n_draft_accepted = 0;

    // Forget the request; the sequence stays.
    void reset() {
        req.reset();
        state = SlotState::FREE;
        n_cached = 0;
        n_prompt_done = 0;
        n_past = 0;
        i_batch = -1;
        in_batch = false;
        paused = false;
        text.reset();
        generated.clear();
        delivered_text.clear();
        chat_pending_text.clear();
        chunk_tokens.clear();
        chunk_logprobs.clear();
        all_logprobs.clear();
        draft.clear();
        n_drafted = 0;
        n_draft_accepted = 0;
    }
};

Engine::Engine(const EngineParams & params)
    : params_(params),
      governor_(params.adaptive_threads ? std::max(params.n_threads, params.n_threads_batch) : 1),
      n_threads_now_(std::max(params.n_threads, params.n_threads_batch)) {
    std::call_once(g_backend_once, [] {
        llama_backend_init();
#if defined(__GLIBC__)
        // The prompt cache allocates and frees sequence states of several MB all the
        // time. glibc raises its mmap threshold after such a free, so later ones come
        // from the heap and fragment it: RSS creeps. A fixed threshold keeps every
        // buffer over 1 MiB in its own mapping, returned to the OS when freed.
        mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
    });

    if (params.deterministic) {
        // Only the CPU kernels are made batch-invariant; a GPU's pick kernels by batch size.
        if (params.n_gpu_layers != 0 && llama_supports_gpu_offload()) {
            throw std::invalid_argument("deterministic: needs the CPU backend (set n_gpu_layers to 0 on a GPU build)");
        }
        // Without flash attention, KQ is a matmul whose kernel (llamafile's or ggml's) depends
        // on how many rows a sequence has in the batch.
        if (params.flash_attn == 0) {
            throw std::invalid_argument("deterministic: needs flash attention (flash_attn auto or on)");
        }
    }
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = params.n_gpu_layers;
    // Repacked weights run a GEMM kernel on rows in groups of 4 and a GEMV on the rest,
    // which round differently: a row's result would depend on its place in the batch.
    if (params.deterministic) mp.use_extra_bufts = false;
    mp.load_mode = params.use_mmap ? (params.use_mlock ? LLAMA_LOAD_MODE_MMAP_MLOCK : LLAMA_LOAD_MODE_MMAP)
                                   : (params.use_mlock ? LLAMA_LOAD_MODE_MLOCK : LLAMA_LOAD_MODE_NONE);
    clear_last_log_error();
    model_ = llama_model_load_from_file(params.model_path.c_str(), mp);
    if (!model_) {
        const std::string detail = last_log_error();
        throw ModelLoadError("cannot load model '" + params.model_path + "': not a valid GGUF model" +
                             (detail.empty() ? std::string() : " (" + detail + ")"));
    }
    vocab_ = llama_model_get_vocab(model_);
    n_vocab_ = llama_vocab_n_tokens(vocab_);
    // An encoder (BERT) has no KV cache to generate with: it only embeds.
    generates_ = model_is_causal(model_) && llama_model_has_decoder(model_) && !llama_model_has_encoder(model_);
    try {
        chat_templates_ = std::make_unique<ChatTemplates>(model_, params.chat_template);
    } catch (const std::exception & e) {
        llama_model_free(model_);
        throw std::invalid_argument(std::string("chat_template: cannot parse it: ") + e.what());
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = params.n_ctx;
    cp.n_batch = params.n_batch;
    cp.n_ubatch = std::min(params.n_ubatch, params.n_batch);
    cp.n_seq_max = static_cast<uint32_t>(params.n_parallel);
    cp.n_threads = params.n_threads;
    cp.n_threads_batch = params.n_threads_batch;
    cp.flash_attn_type = params.deterministic ? LLAMA_FLASH_ATTN_TYPE_ENABLED : static_cast<llama_flash_attn_type>(params.flash_attn);
    // Separate KV per slot: no cross-talk and no fragmentation between sequences.
    cp.kv_unified = false;
    // Sliding-window layers normally drop old positions, which a cached prefix needs.
    // Deterministic mode also needs it: a ring of reused cells changes the order attention
    // visits a restored prefix in.
    cp.swa_full = params.cache_prompt || params.deterministic;
    cp.no_perf = true;
    ctx_ = llama_init_from_model(model_, cp);
    if (!ctx_) {
        llama_model_free(model_);
        const std::string detail = last_log_error();
        throw ModelLoadError("cannot create a llama.cpp context for '" + params.model_path + "'" +
                             (detail.empty() ? std::string() : " (" + detail + ")"));
    }
    n_ctx_seq_ = static_cast<int32_t>(llama_n_ctx_seq(ctx_));
    if (params.deterministic) llama_set_cpu_reference_kernels(ctx_, true);
    try {
        speculator_ = std::make_unique<Speculator>(params.speculative, static_cast<uint32_t>(params.n_parallel), ctx_);
    } catch (...) {
        llama_free(ctx_);
        ctx_ = nullptr;
        llama_model_free(model_);
        model_ = nullptr;
        throw;
    }
    n_threads_active_ = params.n_threads;
    llama_set_abort_callback(ctx_, &Engine::abort_callback, this);

    batch_ = llama_batch_init(static_cast<int32_t>(llama_n_batch(ctx_)), 0, 1);
    slots_.resize(static_cast<size_t>(params.n_parallel));
    for (size_t i = 0; i < slots_.size(); ++i) {
        slots_[i].seq.id = static_cast<llama_seq_id>(i);
    }
    if (params.cache_prompt && params.cache_ram_bytes > 0) {
        ram_cache_ = std::make_unique<PromptCache>(static_cast<size_t>(params.cache_ram_bytes));
    }
    thread_ = std::thread(&Engine::run, this);
}

Engine::~Engine() {
    close();
}

void Engine::close() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        closing_ = true;
        stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) {
        thread_.join();
    }
    {
        // Waits for an embed call in progress: its context goes before the model.
        std::lock_guard<std::mutex> lock(embedder_mu_);
        embedding_closed_ = true;
        embedder_.reset();
    }
    chat_templates_.reset();
    speculator_.reset();  // its draft context, before the target's
    if (ctx_) {
        llama_batch_free(batch_);
        llama_free(ctx_);
        ctx_ = nullptr;
    }
    if (model_) {
        llama_model_free(model_);
        model_ = nullptr;
        vocab_ = nullptr;
    }
}

common_sampler * Engine::make_sampler(const SamplingParams & p) const {
    const std::string chain_issue = chain_problem(p.sampler_chain, 16);
    if (!chain_issue.empty()) throw std::invalid_argument("sampler_chain" + chain_issue);
    const std::vector<SamplerStage> stages = expand_stages(p);
    if (p.sampler_chain.empty()) {
        const std::string problem = chain_problem(stages, 64);
        if (!problem.empty()) throw std::invalid_argument("samplers" + problem);
    }
    const uint32_t seed = p.has_seed ? p.seed : params_.seed;

    // llama.cpp's common sampler keeps what it does best: the grammar (lazy, triggers,
    // rejection fast path), logit bias and the model's suppressed tokens. Its own chain
    // is built empty (bias, then dist) and the typed stages replace the dist below.
    common_params_sampling sp;
    sp.seed = seed;
    sp.no_perf = true;
    sp.samplers.clear();
    sp.mirostat = 0;
    for (const auto & [token, bias] : p.logit_bias) {
        sp.logit_bias.push_back({token, bias});
    }
    if (p.ignore_eos) {
        for (llama_token t = 0; t < n_vocab_; ++t) {
            if (llama_vocab_is_eog(vocab_, t)) sp.logit_bias.push_back({t, -INFINITY});
        }
    }
    if (!p.grammar.empty()) {
        sp.grammar = common_grammar(static_cast<common_grammar_type>(p.grammar_type), p.grammar);
        sp.grammar_lazy = p.grammar_lazy;
        sp.generation_prompt = p.generation_prompt;
        for (const auto & word : p.preserved_tokens) {
            const auto ids = common_tokenize(vocab_, word, false, true);
            if (ids.size() == 1) sp.preserved_tokens.insert(ids[0]);
        }
        for (const auto & t : p.grammar_triggers) {
            common_grammar_trigger trigger{static_cast<common_grammar_trigger_type>(t.type), t.value};
            if (trigger.type == COMMON_GRAMMAR_TRIGGER_TYPE_WORD) {
                // A trigger word that is one preserved token triggers on that token, as
                // llama.cpp's server does: the model emits it whole, never as text.
                const auto ids = common_tokenize(vocab_, t.value, false, true);
                if (ids.size() == 1 && sp.preserved_tokens.count(ids[0])) {
                    trigger.type = COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN;
                    trigger.token = ids[0];
                }
            }
            sp.grammar_triggers.push_back(std::move(trigger));
        }
    }

    clear_last_log_error();
    common_sampler * smpl = nullptr;
    try {
        smpl = common_sampler_init(model_, sp);
    } catch (const std::exception & e) {
        if (!p.grammar.empty()) {
            const std::string detail = last_log_error();
            throw InvalidGrammarError(detail.empty() ? e.what() : detail);
        }
        throw std::invalid_argument(e.what());
    }
    if (!smpl) {
        const std::string detail = last_log_error();
        if (!p.grammar.empty()) {
            throw InvalidGrammarError(detail.empty() ? "failed to parse grammar" : detail);
        }
        throw std::invalid_argument("cannot build the sampler chain" + (detail.empty() ? "" : ": " + detail));
    }
    try {
        llama_sampler * chain = common_sampler_get(smpl);
        llama_sampler_free(llama_sampler_chain_remove(chain, llama_sampler_chain_n(chain) - 1));
        if (p.min_tokens > 0 && !p.ignore_eos) llama_sampler_chain_add(chain, init_eog_ban(vocab_, p.min_tokens));
        append_stages(chain, stages, vocab_, seed, n_ctx_seq_);
    } catch (...) {
        common_sampler_free(smpl);
        throw;
    }
    if (!p.grammar.empty() && params_.max_sample_ms > 0) {
        try {
            probe_grammar_cost(p.grammar);
        } catch (...) {
            common_sampler_free(smpl);
            throw;
        }
    }
    return smpl;
}

void Engine::probe_grammar_cost(const std::string & grammar) const {
    // A step where the model's favourite token breaks the grammar applies the grammar to
    // the whole vocabulary, on the scheduler thread, while every stream waits. Time that
    // once here, on the submitting thread, and refuse a grammar that costs more than a
    // step may: the cost then never reaches the shared batch.
    llama_sampler * g = llama_sampler_init_grammar(vocab_, grammar.c_str(), "root");
    if (!g) throw InvalidGrammarError("failed to parse grammar");
    std::vector<llama_token_data> data(static_cast<size_t>(n_vocab_));
    for (int32_t i = 0; i < n_vocab_; ++i) data[static_cast<size_t>(i)] = {i, 0.0f, 0.0f};
    // In slices, so that the probe itself stops once over budget: its cost is bounded too.
    constexpr size_t slice = 4096;
    const double start = thread_cpu_ms();
    double cost = 0.0;
    for (size_t off = 0; off < data.size() && cost <= params_.max_sample_ms; off += slice) {
        llama_token_data_array cur{data.data() + off, std::min(slice, data.size() - off), -1, false};
        llama_sampler_apply(g, &cur);
        cost = thread_cpu_ms() - start;
    }
    llama_sampler_free(g);
    if (cost > params_.max_sample_ms) {
        char why[200];
        snprintf(why, sizeof why,
                 "too costly: applying it to the vocabulary once takes over %.0f ms of CPU; the server allows %.0f ms per step",
                 params_.max_sample_ms, params_.max_sample_ms);
        throw InvalidGrammarError(why);
    }
}

void Engine::validate(const std::vector<llama_token> & prompt, const SamplingParams & params) const {
    // Everything here would otherwise reach llama.cpp as an out-of-bounds index or an
    // unbounded cost; the Python layer checks the same with friendlier messages.
    if (prompt.empty()) {
        throw std::invalid_argument("prompt: must not be empty");
    }
    if (static_cast<int32_t>(prompt.size()) >= n_ctx_seq_) {
        throw std::invalid_argument("prompt: longer than a sequence's context");
    }
    for (llama_token t : prompt) {
        if (t < 0 || t >= n_vocab_) {
            throw std::invalid_argument("prompt: token id " + std::to_string(t) + " is not in the vocabulary");
        }
    }
    for (const auto & [token, bias] : params.logit_bias) {
        if (token < 0 || token >= n_vocab_) {
            throw std::invalid_argument("logit_bias: token id " + std::to_string(token) + " is not in the vocabulary");
        }
        if (std::isnan(bias) || bias == INFINITY) {
            throw std::invalid_argument("logit_bias: bias must be a number or -inf");
        }
    }
    if (params.max_tokens < 1) {
        throw std::invalid_argument("max_tokens: must be >= 1");
    }
    if (params.min_indent < 0 || params.min_indent > 1024) {
        throw std::invalid_argument("infill.indent: must be in [0, 1024]");
    }
    if (params.logprobs > 100) {
        throw std::invalid_argument("logprobs: at most 100 alternatives");
    }
    const std::string problem = grammar_cost_problem(
        params.grammar, GrammarLimits{params_.max_grammar_bytes, params_.max_grammar_repetitions, 100});
    if (!problem.empty()) {
        throw InvalidGrammarError(problem);
    }
}

ChatPrompt Engine::apply_chat(const ChatInputs & inputs) const {
    ensure_open();
    return chat_templates_->apply(inputs);
}

std::shared_ptr<Request> Engine::submit_chat(const ChatInputs & inputs, SamplingParams params) {
    ensure_open();
    if (!params.grammar.empty()) throw std::invalid_argument("grammar: not with chat (use response_format)");
    if (!params.json_schema.empty()) throw std::invalid_argument("json_schema: not with chat (use response_format)");
    const ChatPrompt chat = chat_templates_->apply(inputs);
    // Special tokens come as text: parse them. BOS as the vocabulary asks, like llama.cpp's
    // server: rendering drops a BOS the template wrote when the tokenizer adds one.
    std::vector<llama_token> prompt = common_tokenize(vocab_, chat.prompt, true, true);
    for (const auto & stop : chat.additional_stops) params.stop_sequences.push_back(stop);
    if (!chat.grammar.empty()) {
        params.grammar = chat.grammar;
        params.grammar_type = chat.grammar_type;
        params.grammar_lazy = chat.grammar_lazy;
        params.grammar_triggers = chat.grammar_triggers;
        params.preserved_tokens = chat.preserved_tokens;
        params.generation_prompt = chat.generation_prompt;
        params.grammar_field = inputs.json_schema.empty() ? "tools" : "response_format";
    }
    return submit(std::move(prompt), params, std::make_unique<ChatStream>(chat));
}

std::vector<llama_token> Engine::infill_prompt(const InfillInput & input, int32_t max_tokens) const {
    ensure_open();
    if (!generates_) throw std::invalid_argument("infill: this model is an encoder; it cannot generate text");
    return format_infill(vocab_, input, static_cast<int32_t>(params_.n_batch), max_tokens, n_ctx_seq_);
}

std::shared_ptr<Request> Engine::submit(std::vector<llama_token> prompt, SamplingParams params,
                                        std::unique_ptr<ChatStream> chat) {
    if (!generates_) {
        throw std::invalid_argument("prompt: this model is an encoder that computes embeddings (Embed); it cannot generate text");
    }
    if (!params.json_schema.empty()) {
        // Converted here, on the caller's thread, by llama.cpp's own converter; the
        // grammar it yields is then bounded like any other.
        if (!params.grammar.empty()) throw std::invalid_argument("json_schema: cannot be combined with grammar");
        const std::string problem = json_schema_problem(params.json_schema);
        if (!problem.empty()) throw std::invalid_argument("json_schema: " + problem);
        params.grammar = json_schema_to_grammar(common_json::parse(params.json_schema), true);
        params.grammar_field = "json_schema";
    }
    validate(prompt, params);
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (closing_) throw EngineClosedError("the engine is closed");
        if (params_.max_queue > 0 && static_cast<int32_t>(queue_.size()) >= params_.max_queue) {
            throw QueueFullError("the wait queue is full (" + std::to_string(params_.max_queue) + " requests waiting)");
        }
    }
    // Built outside the lock: grammar parsing can take a while and only reads the model.
    common_sampler * smpl = make_sampler(params);
    std::shared_ptr<Request> req;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (closing_) {
            common_sampler_free(smpl);
            throw EngineClosedError("the engine is closed");
        }
        if (params_.max_queue > 0 && static_cast<int32_t>(queue_.size()) >= params_.max_queue) {
            common_sampler_free(smpl);
            throw QueueFullError("the wait queue is full (" + std::to_string(params_.max_queue) + " requests waiting)");
        }
        req = std::make_shared<Request>(next_id_++, std::move(prompt), params, smpl);
        req->chat = std::move(chat);
        queue_.push_back(req);
        requests_total_++;
        prompt_tokens_total_ += req->prompt.size();
    }
    cv_.notify_all();
    return req;
}

void Engine::admit_locked() {
    // A request cancelled while waiting never takes a slot.
    for (auto it = queue_.begin(); it != queue_.end();) {
        if ((*it)->cancelled() || stop_) {
            Event ev;
            ev.is_final = true;
            ev.stop_reason = StopReason::CANCELLED;
            ev.prompt_tokens = static_cast<int32_t>((*it)->prompt.size());
            ev.queue_ms = ms_between((*it)->t_submit, Request::clock::now());
            ev.total_ms = ev.queue_ms;
            ev.logprobs = (*it)->params.logprobs >= 0 ? std::optional<std::vector<TokenLogprob>>(std::vector<TokenLogprob>{})
                                                      : std::nullopt;
            (*it)->push(std::move(ev));
            it = queue_.erase(it);
        } else {
            ++it;
        }
    }
    while (!queue_.empty()) {
        Slot * slot = pick_slot(*queue_.front());
        if (!slot) break;
        slot->reset();
        slot->req = std::move(queue_.front());
        queue_.pop_front();
        slot->req->t_admit = Request::clock::now();
        slot->text = std::make_unique<TextStream>(slot->req->params.stop_sequences, slot->req->params.min_indent);
        slot->state = SlotState::ADMITTED;  // KV work happens outside the lock (prepare)
        slot->seq.last_used = ++use_clock_;
        busy_slots_++;
    }
}

bool Engine::caching(const Request & req) const {
    return params_.cache_prompt && req.params.cache_prompt;
}

Engine::Slot * Engine::pick_slot(const Request & req) {
    // The free slot whose kept tokens share the longest prefix with the prompt. Ties (and
    // no match): the one that keeps the busy slots closest together, then the least
    // recently used, whose KV is the least likely to be wanted again. Closeness matters
    // because llama.cpp's per-sequence KV views span every stream from the lowest busy
    // sequence to the highest: 4 streams on slots {0,5,6,7} attend over 8 streams' worth.
    // Measured at 4 streams on 8 slots: rounds alternated between ~150 and ~105 tok/s as
    // plain LRU moved the set between {1,2,3,4} and {5,6,7,0}.
    int lo = -1, hi = -1;
    for (size_t i = 0; i < slots_.size(); ++i) {
        if (!slots_[i].req) continue;
        if (lo < 0) lo = static_cast<int>(i);
        hi = static_cast<int>(i);
    }
    auto span_with = [&](size_t i) {
        const int k = static_cast<int>(i);
        return lo < 0 ? 1 : std::max(hi, k) - std::min(lo, k) + 1;
    };
    Slot * best = nullptr;
    size_t best_prefix = 0;
    int best_span = 0;
    for (size_t i = 0; i < slots_.size(); ++i) {
        Slot & slot = slots_[i];
        if (slot.req) continue;
        const size_t prefix = caching(req) ? common_prefix(slot.seq.tokens, req.prompt) : 0;
        const int span = span_with(i);
        const bool better = !best || prefix > best_prefix ||
                            (prefix == best_prefix && (span < best_span ||
                                                       (span == best_span && slot.seq.last_used < best->seq.last_used)));
        if (better) {
            best = &slot;
            best_prefix = prefix;
            best_span = span;
        }
    }
    return best;
}

void Engine::save_to_ram(const Slot & slot) {
    // Worth keeping only if it is not already there and long enough that recomputing it
    // costs more than copying its state out and back (a short prompt is cheap to redo,
    // and every admission that overwrites a slot would otherwise copy one).
    constexpr size_t min_tokens = 64;
    if (!ram_cache_ || slot.seq.tokens.size() < min_tokens || ram_cache_->covers(slot.seq.tokens)) return;
    const size_t size = llama_state_seq_get_size(ctx_, slot.seq.id);
    if (size == 0 || size > ram_cache_->budget()) return;
    std::vector<uint8_t> state(size);
    if (llama_state_seq_get_data(ctx_, state.data(), size, slot.seq.id) != size) return;
    ram_cache_->put(slot.seq.tokens, std::move(state));
    ram_cache_saves_total_++;
}

bool Engine::restore_from_ram(Slot & slot, const std::vector<uint8_t> & state) {
    llama_memory_seq_rm(llama_get_memory(ctx_), slot.seq.id, -1, -1);
    speculator_->truncate(slot.seq.id, 0);  // a draft model starts over on the restored tokens
    if (llama_state_seq_set_data(ctx_, state.data(), state.size(), slot.seq.id) == 0) {
        llama_memory_seq_rm(llama_get_memory(ctx_), slot.seq.id, -1, -1);
        slot.seq.tokens.clear();
        return false;
    }
    ram_cache_restores_total_++;
    return true;
}

void Engine::prepare(Slot & slot) {
    // Match the slot's KV to the new prompt: keep the common prefix (from the slot, or a
    // longer one from the RAM cache), drop the rest, prefill only what follows. At least
    // the last prompt token is evaluated again: its logits give the first sampled token.
    slot.state = SlotState::PREFILLING;
    const auto & prompt = slot.req->prompt;
    llama_memory_t mem = llama_get_memory(ctx_);
    size_t keep = 0;
    if (caching(*slot.req)) {
        keep = common_prefix(slot.seq.tokens, prompt);
        size_t ram_prefix = 0;
        if (ram_cache_ && ram_cache_->best(prompt, ram_prefix) && ram_prefix > keep) {
            save_to_ram(slot);  // may evict entries: look again afterwards
            const PromptCache::Entry * entry = ram_cache_->best(prompt, ram_prefix);
            if (entry && ram_prefix > keep) {
                std::vector<llama_token> tokens = entry->tokens;
                keep = restore_from_ram(slot, entry->state) ? ram_prefix : 0;
                if (keep) slot.seq.tokens = std::move(tokens);
            }
        } else if (slot.seq.tokens.size() > keep) {
            save_to_ram(slot);  // about to be overwritten
        }
    } else {
        save_to_ram(slot);
    }
    keep = std::min(keep, prompt.size() - 1);
    if (!llama_memory_seq_rm(mem, slot.seq.id, static_cast<llama_pos>(keep), -1)) {
        // This memory cannot drop a partial sequence (e.g. recurrent state): start cold.
        llama_memory_seq_rm(mem, slot.seq.id, -1, -1);
        keep = 0;
    }
    slot.seq.tokens.resize(keep);
    // A draft model keeps what it held of the kept prefix; it catches up on the rest.
    speculator_->truncate(slot.seq.id, static_cast<llama_pos>(keep));
    slot.n_past = static_cast<llama_pos>(keep);
    slot.n_prompt_done = keep;
    slot.n_cached = static_cast<int32_t>(keep);
    cache_hit_tokens_total_ += keep;
    cache_miss_tokens_total_ += prompt.size() - keep;
}

bool Engine::abort_callback(void * data) {
    // Abort a running decode only when nobody in it still wants the result.
    auto * self = static_cast<Engine *>(data);
    bool abort = self->stop_;
    if (!abort) {
        bool any = false;
        abort = true;
        for (const auto & slot : self->slots_) {
            if (!slot.in_batch) continue;
            any = true;
            if (!slot.req->cancelled()) abort = false;
        }
        abort = abort && any;
    }
    if (abort) set_abort_in_progress(true);
    return abort;
}

void Engine::calibrate_step_cost() {
    // Speculation weighs a drafted row against what a row costs: time a step of one row and
    // one of several before serving (a few decodes on a sequence nobody holds yet).
    const int32_t rows = std::min({9, static_cast<int32_t>(llama_n_batch(ctx_)), n_ctx_seq_ - 1});
    if (rows < 2) return;
    const llama_token bos = llama_vocab_bos(vocab_);
    const llama_token token = bos >= 0 ? bos : 0;
    auto time_decode = [&](int32_t n) {
        batch_.n_tokens = 0;
        for (int32_t i = 0; i < n; ++i) batch_add(batch_, token, i, 0, true);
        const auto start = Request::clock::now();
        const int32_t ret = llama_decode(ctx_, batch_);
        const double seconds = ms_between(start, Request::clock::now()) / 1e3;
        llama_memory_seq_rm(llama_get_memory(ctx_), 0, -1, -1);
        batch_.n_tokens = 0;
        return ret == 0 ? seconds : -1.0;
    };
    time_decode(rows);  // the first decode also sets up buffers: not what a step costs
    for (int rep = 0; rep < 2; ++rep) {
        step_cost_.add_measurement(1, time_decode(1));
        step_cost_.add_measurement(rows, time_decode(rows));
    }
}

void Engine::request_drafts(int32_t n_batch) {
    // Every decoding sequence that speculates asks for a draft to follow its sampled token;
    // llama.cpp drafts them all in one call. The rows they take are shared fairly, and a
    // draft never reaches past max_tokens or the sequence's context: every drafted token
    // could be accepted and must still be within the request's limits.
    std::vector<Slot *> decoding;
    for (auto & slot : slots_) {
        if (slot.state == SlotState::DECODING && !slot.paused) decoding.push_back(&slot);
    }
    if (decoding.empty()) return;
    // Prompts waiting to be prefilled keep their per-step budget.
    const bool prefilling = std::any_of(slots_.begin(), slots_.end(), [](const Slot & s) { return s.state == SlotState::PREFILLING; });
    const int32_t step = params_.prefill_step_tokens > 0 ? static_cast<int32_t>(params_.prefill_step_tokens) : n_batch;
    const int32_t reserve = prefilling ? std::min(n_batch, step) : 0;
    const int32_t rows_each =
        (n_batch - reserve - static_cast<int32_t>(decoding.size())) / static_cast<int32_t>(decoding.size());
    // A drafted row pays only if it is accepted more often than the share of a step one
    // more row costs: near 0 for one stream on a GPU, near 1 for a CPU batch of several.
    // Only the decoding rows count: a prompt's rows are work the batch does anyway, and
    // counting them made a stream stop drafting while any other prompt was being prefilled.
    const double break_even = step_cost_.break_even_acceptance(static_cast<int32_t>(decoding.size()));
    bool any = false;
    for (Slot * slot : decoding) {
        slot->draft.clear();
        if (!slot->req->params.speculative) continue;
        const int32_t allowance = speculator_->draft_allowance(slot->seq.id, break_even);
        if (allowance == 0) continue;
        const int32_t left = slot->req->params.max_tokens - static_cast<int32_t>(slot->generated.size()) - 1;
        const int32_t room = n_ctx_seq_ - slot->n_past - 1;
        int32_t n_max = std::min({rows_each, left, room});
        if (allowance > 0) n_max = std::min(n_max, allowance);
        if (n_max <= 0) continue;
        speculator_->request(slot->seq.id, slot->next_token, slot->n_past, &slot->seq.tokens, n_max, &slot->draft);
        any = true;
    }
    if (any) speculator_->draft();
}

bool Engine::build_batch() {
    batch_.n_tokens = 0;
    const int32_t n_batch = static_cast<int32_t>(llama_n_batch(ctx_));
    for (auto & slot : slots_) {
        if (slot.state != SlotState::DECODING) continue;
        if (backlogged(slot)) {
            if (!slot.paused) {
                slot.paused = true;
                slot.paused_since = Request::clock::now();
                paused_slots_++;
                pauses_total_++;
            }
            continue;
        }
        if (slot.paused) {
            slot.paused = false;
            paused_slots_--;
        }
    }
    if (speculator_->enabled()) request_drafts(n_batch);
    for (auto & slot : slots_) {
        if (slot.state != SlotState::DECODING || slot.paused) continue;
        slot.seq.tokens_before_batch = slot.seq.tokens.size();
        slot.seq.tokens.push_back(slot.next_token);
        batch_add(batch_, slot.next_token, slot.n_past++, slot.seq.id, true);
        slot.i_batch = batch_.n_tokens - 1;
        // The draft follows in the next rows, each with its logits: they verify it.
        for (llama_token t : slot.draft) {
            slot.seq.tokens.push_back(t);
            batch_add(batch_, t, slot.n_past++, slot.seq.id, true);
        }
        slot.n_drafted += static_cast<int32_t>(slot.draft.size());
        slot.in_batch = true;
    }
    // Prefill the longest-waiting prompts with what is left of the batch, so decoding
    // slots keep streaming while a long prompt is processed piece by piece.
    std::vector<Slot *> prefilling;
    for (auto & slot : slots_) {
        if (slot.state == SlotState::PREFILLING) prefilling.push_back(&slot);
    }
    std::sort(prefilling.begin(), prefilling.end(), [](const Slot * a, const Slot * b) { return a->req->id < b->req->id; });
    // The budget holds only beside decoding streams: a prompt alone gets whole batches.
    const int32_t prefill_cap = params_.prefill_step_tokens > 0 && batch_.n_tokens > 0
                                    ? std::min(n_batch, static_cast<int32_t>(params_.prefill_step_tokens))
                                    : n_batch;
    int32_t prefilled = 0;
    for (Slot * slot : prefilling) {
        const int32_t budget = std::min(n_batch - batch_.n_tokens, prefill_cap - prefilled);
        if (budget <= 0) break;
        const auto & prompt = slot->req->prompt;
        const size_t n = std::min(static_cast<size_t>(budget), prompt.size() - slot->n_prompt_done);
        const bool last_piece = slot->n_prompt_done + n == prompt.size();
        slot->seq.tokens_before_batch = slot->seq.tokens.size();
        for (size_t i = 0; i < n; ++i) {
            const llama_token token = prompt[slot->n_prompt_done + i];
            slot->seq.tokens.push_back(token);
            batch_add(batch_, token, slot->n_past++, slot->seq.id, last_piece && i + 1 == n);
        }
        slot->n_prompt_done += n;
        prefilled += static_cast<int32_t>(n);
        slot->i_batch = last_piece ? batch_.n_tokens - 1 : -1;
        slot->in_batch = true;
    }
    return batch_.n_tokens > 0;
}

bool Engine::backlogged(const Slot & slot) const {
    return params_.max_buffered_bytes > 0 && slot.req->buffered_bytes() >= params_.max_buffered_bytes;
}

void Engine::cancel_slow_readers() {
    if (params_.slow_reader_timeout_ms < 0) return;
    const auto now = Request::clock::now();
    for (auto & slot : slots_) {
        if (!slot.req || !slot.paused) continue;
        if (ms_between(slot.paused_since, now) >= params_.slow_reader_timeout_ms) {
            slow_reader_cancels_total_++;
            finish(slot, StopReason::CANCELLED);
        }
    }
}

TokenLogprob Engine::logprob_of(int32_t batch_idx, llama_token token, int32_t top_n) {
    // Log-probabilities under the model itself (softmax of the raw logits), not of the
    // sampler-shaped distribution: that is what callers compare across settings.
    const float * logits = llama_get_logits_ith(ctx_, batch_idx);
    const int32_t n_vocab = n_vocab_;
    float max_l = logits[0];
    for (int32_t i = 1; i < n_vocab; ++i) max_l = std::max(max_l, logits[i]);
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - max_l));
    const float lse = max_l + static_cast<float>(std::log(sum));

    TokenLogprob out;
    out.token_id = token;
    out.text = utf8_sanitize(common_token_to_piece(vocab_, token, true));
    out.logprob = std::min(0.0f, logits[token] - lse);
    if (top_n > 0) {
        std::vector<int32_t> idx(static_cast<size_t>(n_vocab));
        for (int32_t i = 0; i < n_vocab; ++i) idx[static_cast<size_t>(i)] = i;
        const int32_t k = std::min(top_n, n_vocab);
        std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
            return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
        });
        for (int32_t i = 0; i < k; ++i) {
            const int32_t t = idx[static_cast<size_t>(i)];
            out.top.push_back({t, utf8_sanitize(common_token_to_piece(vocab_, t, true)), std::min(0.0f, logits[t] - lse)});
        }
    }
    return out;
}

void Engine::emit(Slot & slot, const std::string & text) {
    // Tokens whose text is held back (partial UTF-8, possible stop sequence) ride along
    // with the next chunk that has text.
    if (text.empty()) return;
    Event ev;
    if (slot.req->chat) {
        // A chat chunk is a change of the message: text the parser cannot place yet (a
        // tag begun) rides along with the next chunk that changes it.
        slot.chat_pending_text += text;
        ev.chat_deltas = slot.req->chat->update(slot.delivered_text + slot.chat_pending_text, true);
        if (ev.chat_deltas.empty()) return;
        ev.text = std::move(slot.chat_pending_text);
        slot.chat_pending_text.clear();
    } else {
        ev.text = text;
    }
    push_chunk(slot, std::move(ev));
}

void Engine::push_chunk(Slot & slot, Event ev) {
    ev.token_ids = std::move(slot.chunk_tokens);
    ev.n_tokens = static_cast<int32_t>(slot.generated.size());
    if (slot.req->params.logprobs >= 0) {
        ev.logprobs = std::move(slot.chunk_logprobs);
    }
    slot.chunk_tokens.clear();
    slot.chunk_logprobs.clear();
    slot.delivered_text += ev.text;
    slot.req->push(std::move(ev));
}

void Engine::finish_chat(Slot & slot) {
    // The output is whole: parse it as such (a call the partial parse held back, e.g.
    // one whose name had no arguments yet, is complete now).
    Event ev;
    ev.chat_deltas = slot.req->chat->update(slot.delivered_text + slot.chat_pending_text, false);
    ev.text = std::move(slot.chat_pending_text);
    slot.chat_pending_text.clear();
    if (!ev.chat_deltas.empty()) push_chunk(slot, std::move(ev));
}

void Engine::finish(Slot & slot, StopReason reason, const std::string & stop_sequence, const std::string & error,
                    const std::string & error_field) {
    const Request & req = *slot.req;
    if (error.empty() && (reason == StopReason::LENGTH || reason == StopReason::EOS)) {
        emit(slot, slot.text->flush());
    }
    if (req.chat && error.empty() && reason != StopReason::CANCELLED) {
        finish_chat(slot);
    }
    const auto now = Request::clock::now();
    Event ev;
    ev.is_final = true;
    ev.text = slot.delivered_text;
    ev.token_ids = slot.generated;
    ev.n_tokens = static_cast<int32_t>(slot.generated.size());
    if (req.params.logprobs >= 0) {
        ev.logprobs = std::move(slot.all_logprobs);
    }
    ev.stop_reason = reason;
    ev.stop_sequence = stop_sequence;
    if (req.chat) ev.chat_message = req.chat->message();
    ev.prompt_tokens = static_cast<int32_t>(req.prompt.size());
    ev.error = error;
    ev.error_field = error_field;
    const auto t_admit = req.t_admit.time_since_epoch().count() ? req.t_admit : now;
    ev.queue_ms = ms_between(req.t_submit, t_admit);
    ev.total_ms = ms_between(req.t_submit, now);
    if (req.t_first_token.time_since_epoch().count()) {
        ev.ttft_ms = ms_between(req.t_submit, req.t_first_token);
        const double prompt_ms = ms_between(t_admit, req.t_prompt_done);
        ev.prompt_tps = prompt_ms > 0 ? 1000.0 * static_cast<double>(req.prompt.size()) / prompt_ms : 0.0;
        const double decode_ms = ms_between(req.t_first_token, now);
        ev.decode_tps = (decode_ms > 0 && slot.generated.size() > 1)
                            ? 1000.0 * static_cast<double>(slot.generated.size() - 1) / decode_ms
                            : 0.0;
    }
    completion_tokens_total_ += slot.generated.size();
    // Free the slot and its KV at once so the next request can start; do it before the
    // final event goes out so a caller that sees it also sees the slot free.
    ev.cached_tokens = slot.n_cached;
    ev.draft_tokens = slot.n_drafted;
    ev.draft_accepted_tokens = slot.n_draft_accepted;
    std::shared_ptr<Request> owner = std::move(slot.req);
    if (!params_.cache_prompt || !error.empty()) {
        // Without the cache (or after a failure) the sequence is cleared for the next one.
        llama_memory_seq_rm(llama_get_memory(ctx_), slot.seq.id, -1, -1);
        slot.seq.tokens.clear();
        speculator_->truncate(slot.seq.id, 0);
    }
    slot.seq.last_used = ++use_clock_;
    if (slot.paused) paused_slots_--;
    slot.reset();
    busy_slots_--;
    owner->push(std::move(ev));
}

bool Engine::take_token(Slot & slot, llama_token id, int32_t row, std::string & text) {
    // One token the request's sampler chose (and accepted): end of generation, logprobs,
    // text and stop sequences, limits. Its text joins `text`, emitted by the caller as one
    // chunk per step. False when the request finished on it.
    Request & req = *slot.req;
    if (slot.generated.empty()) {
        req.t_first_token = Request::clock::now();
    }
    if (llama_vocab_is_eog(vocab_, id)) {
        emit(slot, text);
        finish(slot, StopReason::EOS);
        return false;
    }
    slot.generated.push_back(id);
    slot.chunk_tokens.push_back(id);
    if (req.params.logprobs >= 0) {
        TokenLogprob lp = logprob_of(row, id, req.params.logprobs);
        slot.all_logprobs.push_back(lp);
        slot.chunk_logprobs.push_back(std::move(lp));
    }
    const bool match_stops = static_cast<int32_t>(slot.generated.size()) >= req.params.min_tokens;
    TextStream::Step step = slot.text->push(common_token_to_piece(vocab_, id, true), match_stops);
    text += step.emit;
    if (step.stopped) {
        emit(slot, text);
        // No stop sequence: the infill's indentation rule found the end of the block.
        finish(slot, step.stop_sequence.empty() ? StopReason::EOS : StopReason::STOP_SEQUENCE, step.stop_sequence);
        return false;
    }
    // The next token would need one more KV cell; stop when the sequence's context is full.
    if (static_cast<int32_t>(slot.generated.size()) >= req.params.max_tokens || slot.n_past >= n_ctx_seq_) {
        emit(slot, text);
        finish(slot, StopReason::LENGTH);
        return false;
    }
    return true;
}

int32_t Engine::sample_slot(Slot & slot) {
    // Sample at the sampled token's row; with a draft, go on along the draft's rows while
    // the request's own sampler picks the drafted token (llama.cpp's accept rule: what is
    // accepted is exactly what the target alone would have sampled). The first pick that
    // differs, or the one after the whole draft, is the next token. Returns the rows sampled.
    Request & req = *slot.req;
    const size_t n_draft = slot.draft.size();
    std::vector<llama_token> ids;
    int32_t n_accepted = 0;  // draft tokens the sampler picked
    bool no_token_allowed = false;
    for (size_t i = 0; i <= n_draft; ++i) {
        const int32_t row = slot.i_batch + static_cast<int32_t>(i);
        const llama_token id = common_sampler_sample(req.sampler, ctx_, row);
        // A grammar plus logit_bias (or a chain) can leave no token allowed; the sampler then
        // still "selects" a banned one, and accepting it makes llama.cpp's grammar abort the
        // process. A banned pick is exactly a non-finite selected logit: end this sequence.
        const llama_token_data_array * cur = common_sampler_get_candidates(req.sampler, false);
        if (cur->selected < 0 || static_cast<size_t>(cur->selected) >= cur->size ||
            !(cur->data[cur->selected].logit > -INFINITY)) {
            no_token_allowed = true;
            break;
        }
        common_sampler_accept(req.sampler, id, true);
        ids.push_back(id);
        if (i == n_draft || id != slot.draft[i]) break;
        n_accepted++;
    }
    // Keep the KV of the sampled token and the accepted draft; drop the rejected draft.
    if (n_draft > 0) {
        const size_t n_keep = slot.seq.tokens_before_batch + 1 + static_cast<size_t>(n_accepted);
        slot.n_past = static_cast<llama_pos>(n_keep);
        slot.seq.tokens.resize(n_keep);
        llama_memory_seq_rm(llama_get_memory(ctx_), slot.seq.id, slot.n_past, -1);
        slot.n_draft_accepted += n_accepted;
        speculator_->accept(slot.seq.id, static_cast<int32_t>(n_draft), n_accepted);
        slot.draft.clear();
    }
    std::string text;
    for (size_t i = 0; i < ids.size(); ++i) {
        if (!take_token(slot, ids[i], slot.i_batch + static_cast<int32_t>(i), text)) return static_cast<int32_t>(ids.size());
    }
    if (no_token_allowed) {
        emit(slot, text);
        guarded_failures_total_++;
        // A chat grammar comes from the template: only logit_bias can empty it.
        const bool grammar = !req.params.grammar.empty() && !req.chat;
        // ignore_eos / min_tokens ban end-of-generation: a grammar may allow nothing else.
        const bool eog_banned = req.params.ignore_eos || static_cast<int32_t>(slot.generated.size()) < req.params.min_tokens;
        std::string why = grammar ? "no token is allowed: the grammar and logit_bias together exclude every token"
                                  : "no token is allowed: logit_bias (or the sampler chain) excludes every token";
        if (eog_banned) why += " (end-of-generation is banned by ignore_eos or min_tokens)";
        finish(slot, StopReason::CANCELLED, "", why, grammar ? req.params.grammar_field : "logit_bias");
        return static_cast<int32_t>(ids.size()) + 1;
    }
    emit(slot, text);
    slot.next_token = ids.back();  // sampled, not yet decoded: the next batch's token
    return static_cast<int32_t>(ids.size());
}

void Engine::after_decode() {
    for (auto & slot : slots_) {
        if (!slot.req || !slot.in_batch) continue;
        slot.in_batch = false;
        if (slot.i_batch < 0) continue;  // a prompt piece that is not the last one
        if (slot.state == SlotState::PREFILLING) {
            slot.state = SlotState::DECODING;
            slot.req->t_prompt_done = Request::clock::now();
            if (slot.req->params.speculative) speculator_->begin(slot.seq.id, slot.seq.tokens);
        }
        const double cpu_start = thread_cpu_ms();
        int32_t rows = 1;
        try {
            rows = std::max(1, sample_slot(slot));
        } catch (const std::exception & e) {
            // One request's failure (e.g. its sampler) must not take down the others.
            if (slot.req) finish(slot, StopReason::CANCELLED, "", std::string("sampling failed: ") + e.what());
        }
        // Per sampled row: a verified draft samples several tokens in one step, each of which
        // would have been a step of its own without it.
        const double cpu_ms = (thread_cpu_ms() - cpu_start) / rows;
        if (slot.req && params_.max_sample_ms > 0 && cpu_ms > params_.max_sample_ms) {
            // Every other stream waited for this: a request whose grammar or chain costs
            // more than the bound per step does not stay in the shared batch.
            guarded_failures_total_++;
            const bool grammar = !slot.req->params.grammar.empty();
            const std::string field = grammar ? slot.req->params.grammar_field : "samplers";
            char why[160];
            snprintf(why, sizeof why, "too costly: sampling took %.0f ms of CPU in one step; the server allows %.0f ms per step",
                     cpu_ms, params_.max_sample_ms);
            finish(slot, StopReason::CANCELLED, "", why, field);
        }
    }
}

void Engine::fail_batch(const std::string & error) {
    for (auto & slot : slots_) {
        if (!slot.req || !slot.in_batch) continue;
        slot.in_batch = false;
        finish(slot, StopReason::CANCELLED, "", error);  // clears the sequence: its KV is unknown
    }
}

void Engine::run() {
    // On this thread, as every later decode: ggml's OpenMP team belongs to the thread that
    // runs a graph, and decoding first on the loader thread left every later step ~25%
    // slower (measured: plain decoding 31 against 40 tok/s on a 2-core host).
    if (generates_ && speculator_->enabled()) calibrate_step_cost();
    for (;;) {
        {
            std::unique_lock<std::mutex> lock(mu_);
            admit_locked();
            const bool any_active = std::any_of(slots_.begin(), slots_.end(), [](const Slot & s) { return s.req != nullptr; });
            if (!any_active && tasks_.empty()) {
                if (stop_) {
                    for (auto & task : tasks_) task->done.set_exception(std::make_exception_ptr(EngineClosedError("the engine is closed")));
                    tasks_.clear();
                    return;
                }
                cv_.wait(lock, [&] { return stop_ || !queue_.empty() || !tasks_.empty(); });
                continue;
            }
        }
        run_tasks();
        for (auto & slot : slots_) {
            if (slot.req && (slot.req->cancelled() || stop_)) {
                finish(slot, StopReason::CANCELLED);
            } else if (slot.state == SlotState::ADMITTED) {
                prepare(slot);
            }
        }
        cancel_slow_readers();
        if (!build_batch()) {
            // Every active sequence is paused for its reader: nap instead of spinning. A
            // submission wakes us at once; readers catching up are seen within the nap.
            std::unique_lock<std::mutex> lock(mu_);
            cv_.wait_for(lock, std::chrono::milliseconds(2));
            continue;
        }
        governor_.before_decode();
        const int32_t ret = llama_decode(ctx_, batch_);
        const int32_t threads = governor_.after_decode();
        if (params_.adaptive_threads && threads != n_threads_now_) {
            n_threads_now_ = threads;
            llama_set_n_threads(ctx_, std::min(threads, params_.n_threads), std::min(threads, params_.n_threads_batch));
            n_threads_active_ = std::min(threads, params_.n_threads);
        }
        set_abort_in_progress(false);
        decode_steps_total_++;
        if (ret == 0) {
            after_decode();
        } else if (ret == 2) {
            // Aborted because every sequence in the batch was cancelled: the loop's
            // cancellation pass finishes them. What this batch added to their KV is
            // dropped, so what the slots keep is exactly what was decoded before.
            for (auto & slot : slots_) {
                if (!slot.in_batch) continue;
                slot.in_batch = false;
                slot.seq.tokens.resize(slot.seq.tokens_before_batch);
                slot.draft.clear();
                llama_memory_seq_rm(llama_get_memory(ctx_), slot.seq.id, static_cast<llama_pos>(slot.seq.tokens.size()), -1);
            }
        } else {
            fail_batch("llama_decode failed (status " + std::to_string(ret) + ")");
        }
    }
}

void Engine::call_on_scheduler(std::function<void()> fn) {
    auto task = std::make_shared<Task>();
    task->fn = std::move(fn);
    std::future<void> done = task->done.get_future();
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (closing_) throw EngineClosedError("the engine is closed");
        tasks_.push_back(task);
    }
    cv_.notify_all();
    done.get();
}

void Engine::run_tasks() {
    std::deque<std::shared_ptr<Task>> tasks;
    {
        std::lock_guard<std::mutex> lock(mu_);
        tasks.swap(tasks_);
    }
    for (auto & task : tasks) {
        try {
            task->fn();
            task->done.set_value();
        } catch (...) {
            task->done.set_exception(std::current_exception());
        }
    }
}

std::vector<uint8_t> Engine::sequence_state(const std::vector<llama_token> & tokens,
                                            std::vector<llama_token> & state_tokens) {
    std::vector<uint8_t> state;
    call_on_scheduler([&] {
        const Slot * best = nullptr;
        size_t best_prefix = 0;
        for (const auto & slot : slots_) {
            const size_t prefix = slot.req ? 0 : common_prefix(slot.seq.tokens, tokens);
            if (prefix > best_prefix) {
                best = &slot;
                best_prefix = prefix;
            }
        }
        size_t ram_prefix = 0;
        const PromptCache::Entry * entry = ram_cache_ ? ram_cache_->best(tokens, ram_prefix) : nullptr;
        if (entry && ram_prefix > best_prefix) {
            state = entry->state;
            state_tokens = entry->tokens;
        } else if (best) {
            state.resize(llama_state_seq_get_size(ctx_, best->seq.id));
            if (llama_state_seq_get_data(ctx_, state.data(), state.size(), best->seq.id) != state.size()) {
                throw std::runtime_error("cannot read the sequence's state");
            }
            state_tokens = best->seq.tokens;
        }
    });
    return state;
}

void Engine::add_sequence_state(const std::vector<llama_token> & tokens, const std::vector<uint8_t> & state) {
    if (!generates_) throw std::invalid_argument("session: this model is an encoder; it keeps no sequences");
    for (llama_token t : tokens) {
        if (t < 0 || t >= n_vocab_) throw std::invalid_argument("tokens: id " + std::to_string(t) + " is not in the vocabulary");
    }
    if (static_cast<int32_t>(tokens.size()) > n_ctx_seq_) {
        throw std::invalid_argument("tokens: more than a sequence's context holds");
    }
    call_on_scheduler([&] {
        Slot * slot = nullptr;
        for (auto & s : slots_) {
            if (!s.req && (!slot || s.seq.last_used < slot->seq.last_used)) slot = &s;
        }
        if (slot) {
            // Restoring checks the state against this context (llama.cpp refuses a state of
            // another shape); a refused one leaves the slot empty.
            save_to_ram(*slot);
            if (!restore_from_ram(*slot, state)) {
                throw std::invalid_argument("state: llama.cpp refused it (corrupt, or saved with another model)");
            }
            const llama_pos pos_max = llama_memory_seq_pos_max(llama_get_memory(ctx_), slot->seq.id);
            if (pos_max + 1 != static_cast<llama_pos>(tokens.size())) {
                llama_memory_seq_rm(llama_get_memory(ctx_), slot->seq.id, -1, -1);
                slot->seq.tokens.clear();
                throw std::invalid_argument("state: holds " + std::to_string(pos_max + 1) + " positions, its tokens " +
                                            std::to_string(tokens.size()));
            }
            slot->seq.tokens = tokens;
            slot->seq.last_used = ++use_clock_;
        }
        if (ram_cache_) ram_cache_->put(tokens, state);
    });
}

void Engine::ensure_open() const {
    if (!model_) throw EngineClosedError("the engine is closed");
}

std::vector<llama_token> Engine::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    ensure_open();
    return common_tokenize(vocab_, text, add_special, parse_special);
}

std::string Engine::detokenize(const std::vector<llama_token> & tokens, bool remove_special, bool unparse_special) const {
    ensure_open();
    const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
    for (llama_token t : tokens) {
        if (t < 0 || t >= n_vocab) throw std::invalid_argument("tokens: id " + std::to_string(t) + " is not in the vocabulary");
    }
    std::string out(tokens.size() * 4 + 16, '\0');
    int32_t n = llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                                 static_cast<int32_t>(out.size()), remove_special, unparse_special);
    if (n < 0) {
        out.resize(static_cast<size_t>(-n));
        n = llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                             static_cast<int32_t>(out.size()), remove_special, unparse_special);
    }
    out.resize(static_cast<size_t>(std::max(n, 0)));
    return utf8_sanitize(out);
}

int32_t Engine::n_vocab() const {
    return n_vocab_;
}

ModelInfo Engine::model_info() const {
    ensure_open();
    ModelInfo info;
    char buf[512];
    auto meta = [&](const char * key) {
        const int32_t n = llama_model_meta_val_str(model_, key, buf, sizeof buf);
        return n >= 0 ? std::string(buf) : std::string();
    };
    info.name = meta("general.name");
    info.architecture = meta("general.architecture");
    if (llama_model_desc(model_, buf, sizeof buf) >= 0) info.description = buf;
    info.n_params = llama_model_n_params(model_);
    info.n_ctx_train = llama_model_n_ctx_train(model_);
    info.n_ctx = static_cast<int32_t>(llama_n_ctx(ctx_));
    info.n_vocab = llama_vocab_n_tokens(vocab_);
    info.has_chat_template = llama_model_chat_template(model_, nullptr) != nullptr || !params_.chat_template.empty();
    info.supports_tools = info.has_chat_template && chat_templates_->supports_tools();
    info.n_slots = static_cast<int32_t>(slots_.size());
    info.generates = generates_;
    info.supports_infill = generates_ && infill_tokens(vocab_).supported();
    info.n_embd = llama_model_n_embd_out(model_);
    info.embed_pooling = pooling_name(model_default_pooling(model_));
    return info;
}

EmbedResult Engine::embed(const std::vector<std::vector<llama_token>> & inputs, Pooling pooling, bool normalize) {
    std::lock_guard<std::mutex> lock(embedder_mu_);
    // Checked under the lock: close() may be about to free the model.
    if (embedding_closed_) throw EngineClosedError("the engine is closed");
    if (!embedder_) {
        EmbedderParams ep;
        ep.n_ctx = params_.embed_n_ctx;
        ep.n_threads = params_.n_threads_batch;
        ep.flash_attn = params_.flash_attn;
        ep.max_inputs = params_.max_embed_inputs;
        ep.max_tokens = params_.max_embed_tokens;
        ep.deterministic = params_.deterministic;
        embedder_ = std::make_unique<Embedder>(model_, ep);
    }
    EmbedResult result = embedder_->embed(inputs, pooling, normalize);
    embed_inputs_total_ += inputs.size();
    embed_tokens_total_ += static_cast<uint64_t>(result.prompt_tokens);
    return result;
}

Metrics Engine::metrics() const {
    Metrics m;
    {
        std::lock_guard<std::mutex> lock(mu_);
        m.queue_depth = static_cast<int32_t>(queue_.size());
    }
    m.n_slots = static_cast<int32_t>(slots_.size());
    m.busy_slots = busy_slots_.load();
    m.paused_slots = paused_slots_.load();
    m.pauses_total = pauses_total_.load();
    m.slow_reader_cancels_total = slow_reader_cancels_total_.load();
    m.guarded_failures_total = guarded_failures_total_.load();
    m.cache_hit_tokens_total = cache_hit_tokens_total_.load();
    m.cache_miss_tokens_total = cache_miss_tokens_total_.load();
    m.ram_cache_saves_total = ram_cache_saves_total_.load();
    m.ram_cache_restores_total = ram_cache_restores_total_.load();
    if (ram_cache_) {
        m.ram_cache_bytes = ram_cache_->bytes();
        m.ram_cache_entries = ram_cache_->entries();
        m.ram_cache_budget = ram_cache_->budget();
    }
    m.requests_total = requests_total_.load();
    m.prompt_tokens_total = prompt_tokens_total_.load();
    m.completion_tokens_total = completion_tokens_total_.load();
    m.decode_steps_total = decode_steps_total_.load();
    m.n_threads_active = n_threads_active_.load();
    m.draft_tokens_total = speculator_ ? speculator_->drafted_total() : 0;
    m.draft_accepted_tokens_total = speculator_ ? speculator_->accepted_total() : 0;
    m.embed_inputs_total = embed_inputs_total_.load();
    m.embed_tokens_total = embed_tokens_total_.load();
    return m;
}

}  // namespace llama_crab
