#include "lowlevel.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <mutex>
#include <numeric>
#include <thread>

#include "engine.h"  // ModelLoadError, shared with the engine's loader
#include "log_bridge.h"

namespace llama_crab::lowlevel {

namespace {

std::once_flag g_backend_once;

std::string with_detail(std::string what) {
    const std::string detail = last_log_error();
    if (!detail.empty()) what += " (llama.cpp: " + detail + ")";
    return what;
}

// Borrows an object for one call: refuses a closed one, and a second caller while the
// first (another thread, the GIL released) is still inside.
class Borrow {
public:
    Borrow(std::atomic<bool> & busy, bool closed, const char * cls, const char * what) : busy_(busy) {
        if (closed) throw ClosedError(std::string(cls) + " is closed");
        bool expected = false;
        if (!busy_.compare_exchange_strong(expected, true)) {
            throw BusyError(std::string(cls) + "." + what + ": the " + cls +
                            " is in use by another thread (these objects are not thread-safe; only Context.cancel() is)");
        }
    }
    ~Borrow() { busy_.store(false); }
    Borrow(const Borrow &) = delete;
    Borrow & operator=(const Borrow &) = delete;

private:
    std::atomic<bool> & busy_;
};

// Replace invalid UTF-8 with U+FFFD, one per maximal invalid subpart (as Python's
// bytes.decode("utf-8", "replace") does), so every string handed out decodes.
std::string valid_utf8(const std::string & s) {
    std::string out;
    out.reserve(s.size());
    const auto * p = reinterpret_cast<const unsigned char *>(s.data());
    const size_t n = s.size();
    size_t i = 0;
    while (i < n) {
        const unsigned char c = p[i];
        if (c < 0x80) {
            out += static_cast<char>(c);
            ++i;
            continue;
        }
        size_t need = 0;
        unsigned char lo = 0x80, hi = 0xBF;  // the range of the first continuation byte
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c == 0xE0) { need = 2; lo = 0xA0; }
        else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) need = 2;
        else if (c == 0xED) { need = 2; hi = 0x9F; }
        else if (c == 0xF0) { need = 3; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) need = 3;
        else if (c == 0xF4) { need = 3; hi = 0x8F; }
        size_t k = 1;  // bytes of the (possibly partial) sequence that are valid so far
        while (need != 0 && k <= need && i + k < n) {
            const unsigned char b = p[i + k];
            if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) break;
            ++k;
        }
        if (need != 0 && k == need + 1) {
            out.append(s, i, k);
        } else {
            out += "\xEF\xBF\xBD";
        }
        i += k;
    }
    return out;
}

std::string meta_string(int32_t (*get)(const llama_model *, int32_t, char *, size_t), const llama_model * m, int32_t i) {
    std::vector<char> buf(256);
    int32_t n = get(m, i, buf.data(), buf.size());
    if (n < 0) return "";
    if (static_cast<size_t>(n) >= buf.size()) {
        buf.resize(static_cast<size_t>(n) + 1);
        n = get(m, i, buf.data(), buf.size());
        if (n < 0) return "";
    }
    return std::string(buf.data(), static_cast<size_t>(n));
}

std::optional<std::string> meta_value(const llama_model * m, const std::string & key) {
    std::vector<char> buf(256);
    int32_t n = llama_model_meta_val_str(m, key.c_str(), buf.data(), buf.size());
    if (n < 0) return std::nullopt;
    if (static_cast<size_t>(n) >= buf.size()) {
        buf.resize(static_cast<size_t>(n) + 1);
        n = llama_model_meta_val_str(m, key.c_str(), buf.data(), buf.size());
        if (n < 0) return std::nullopt;
    }
    return std::string(buf.data(), static_cast<size_t>(n));
}

}  // namespace

// ---- Model ---------------------------------------------------------------------------------

Model::Model(const ModelParams & params) {
    std::call_once(g_backend_once, [] { llama_backend_init(); });
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = params.n_gpu_layers;
    mp.load_mode = params.use_mmap ? (params.use_mlock ? LLAMA_LOAD_MODE_MMAP_MLOCK : LLAMA_LOAD_MODE_MMAP)
                                   : (params.use_mlock ? LLAMA_LOAD_MODE_MLOCK : LLAMA_LOAD_MODE_NONE);
    mp.vocab_only = params.vocab_only;
    mp.use_extra_bufts = params.use_extra_bufts;
    clear_last_log_error();
    llama_model * m = llama_model_load_from_file(params.path.c_str(), mp);
    if (!m) {
        throw ModelLoadError(with_detail("cannot load model '" + params.path + "': not a valid GGUF model"));
    }
    handle_ = ModelHandle(m, llama_model_free);
    vocab_only_ = params.vocab_only;
}

const ModelHandle & Model::handle() const {
    if (!handle_) throw ClosedError("Model is closed");
    return handle_;
}

const llama_vocab * Model::vocab() const { return llama_model_get_vocab(handle().get()); }
int32_t Model::n_vocab() const { return llama_vocab_n_tokens(vocab()); }
int32_t Model::n_ctx_train() const { return llama_model_n_ctx_train(handle().get()); }
int32_t Model::n_embd() const { return llama_model_n_embd(handle().get()); }
int32_t Model::n_layer() const { return llama_model_n_layer(handle().get()); }
uint64_t Model::n_params() const { return llama_model_n_params(handle().get()); }
uint64_t Model::size() const { return llama_model_size(handle().get()); }
bool Model::add_bos() const { return llama_vocab_get_add_bos(vocab()); }
bool Model::add_eos() const { return llama_vocab_get_add_eos(vocab()); }

std::string Model::description() const {
    char buf[256];
    const int32_t n = llama_model_desc(handle().get(), buf, sizeof(buf));
    return n > 0 ? valid_utf8(std::string(buf, std::min<size_t>(static_cast<size_t>(n), sizeof(buf) - 1))) : "";
}

std::map<std::string, std::string> Model::metadata() const {
    const llama_model * m = handle().get();
    std::map<std::string, std::string> out;
    const int32_t n = llama_model_meta_count(m);
    for (int32_t i = 0; i < n; ++i) {
        out[valid_utf8(meta_string(llama_model_meta_key_by_index, m, i))] =
            valid_utf8(meta_string(llama_model_meta_val_str_by_index, m, i));
    }
    return out;
}

std::optional<std::string> Model::chat_template(const std::optional<std::string> & name) const {
    const char * t = llama_model_chat_template(handle().get(), name ? name->c_str() : nullptr);
    if (!t) return std::nullopt;
    return valid_utf8(t);
}

void Model::check_token(llama_token token) const {
    const int32_t n = n_vocab();
    if (token < 0 || token >= n) {
        throw std::out_of_range("token " + std::to_string(token) + " is outside the vocabulary [0, " +
                                std::to_string(n) + ")");
    }
}

std::vector<llama_token> Model::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    if (text.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max() / 2)) {
        throw std::invalid_argument("text: too long to tokenize (" + std::to_string(text.size()) + " bytes)");
    }
    const llama_vocab * v = vocab();
    std::vector<llama_token> out(text.size() + 2);
    int32_t n = llama_tokenize(v, text.data(), static_cast<int32_t>(text.size()), out.data(),
                               static_cast<int32_t>(out.size()), add_special, parse_special);
    if (n < 0) {
        if (n == std::numeric_limits<int32_t>::min()) throw std::invalid_argument("text: too many tokens");
        out.resize(static_cast<size_t>(-n));
        n = llama_tokenize(v, text.data(), static_cast<int32_t>(text.size()), out.data(),
                           static_cast<int32_t>(out.size()), add_special, parse_special);
        if (n < 0) throw std::runtime_error("tokenize failed");
    }
    out.resize(static_cast<size_t>(n));
    return out;
}

std::string Model::detokenize(const std::vector<llama_token> & tokens, bool remove_special, bool unparse_special) const {
    for (size_t i = 0; i < tokens.size(); ++i) {
        try {
            check_token(tokens[i]);
        } catch (const std::out_of_range & e) {
            throw std::out_of_range("tokens[" + std::to_string(i) + "]: " + e.what());
        }
    }
    if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
        throw std::invalid_argument("tokens: too many");
    }
    const llama_vocab * v = vocab();
    std::string out(tokens.size() * 8 + 16, '\0');
    int32_t n = llama_detokenize(v, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                                 static_cast<int32_t>(std::min<size_t>(out.size(), INT32_MAX)), remove_special,
                                 unparse_special);
    if (n < 0) {
        out.resize(static_cast<size_t>(-static_cast<int64_t>(n)));
        n = llama_detokenize(v, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                             static_cast<int32_t>(out.size()), remove_special, unparse_special);
        if (n < 0) throw std::runtime_error("detokenize failed");
    }
    out.resize(static_cast<size_t>(n));
    return valid_utf8(out);
}

std::string Model::token_to_bytes(llama_token token, bool special) const {
    check_token(token);
    const llama_vocab * v = vocab();
    std::string out(32, '\0');
    int32_t n = llama_token_to_piece(v, token, out.data(), static_cast<int32_t>(out.size()), 0, special);
    if (n < 0) {
        out.resize(static_cast<size_t>(-n));
        n = llama_token_to_piece(v, token, out.data(), static_cast<int32_t>(out.size()), 0, special);
        if (n < 0) throw std::runtime_error("token_to_piece failed");
    }
    out.resize(static_cast<size_t>(n));
    return out;
}

std::string Model::token_to_piece(llama_token token, bool special) const {
    return valid_utf8(token_to_bytes(token, special));
}

std::optional<llama_token> Model::special_token(const std::string & name) const {
    static const std::map<std::string, llama_token (*)(const llama_vocab *)> getters = {
        {"bos", llama_vocab_bos},         {"eos", llama_vocab_eos},         {"eot", llama_vocab_eot},
        {"sep", llama_vocab_sep},         {"nl", llama_vocab_nl},           {"pad", llama_vocab_pad},
        {"mask", llama_vocab_mask},       {"fim_pre", llama_vocab_fim_pre}, {"fim_suf", llama_vocab_fim_suf},
        {"fim_mid", llama_vocab_fim_mid}, {"fim_pad", llama_vocab_fim_pad}, {"fim_rep", llama_vocab_fim_rep},
        {"fim_sep", llama_vocab_fim_sep},
    };
    auto it = getters.find(name);
    if (it == getters.end()) throw std::invalid_argument("no special token named '" + name + "'");
    const llama_token t = it->second(vocab());
    if (t < 0 || t >= n_vocab()) return std::nullopt;
    return t;
}

bool Model::is_eog(llama_token token) const {
    check_token(token);
    return llama_vocab_is_eog(vocab(), token);
}

bool Model::is_control(llama_token token) const {
    check_token(token);
    return llama_vocab_is_control(vocab(), token);
}

// ---- Batch ---------------------------------------------------------------------------------

Batch::Batch(int32_t capacity, int32_t n_seq_max) : capacity_(capacity), n_seq_max_(n_seq_max) {
    if (capacity < 1) throw std::invalid_argument("capacity: must be >= 1");
    if (n_seq_max < 1 || static_cast<size_t>(n_seq_max) > llama_max_parallel_sequences()) {
        throw std::invalid_argument("n_seq_max: must be in [1, " + std::to_string(llama_max_parallel_sequences()) + "]");
    }
    const auto cap = static_cast<size_t>(capacity);
    tokens_.reserve(cap);
    pos_.reserve(cap);
    seq_ids_.reserve(cap);
    logits_.reserve(cap);
}

void Batch::check_free() const {
    if (in_use.load() != 0) {
        throw BusyError("Batch is being decoded by another thread; it cannot change until that decode returns");
    }
}

void Batch::add(llama_token token, llama_pos pos, const std::vector<llama_seq_id> & seq_ids, bool logits) {
    check_free();
    if (size() >= capacity_) {
        throw std::out_of_range("Batch is full (capacity " + std::to_string(capacity_) + " tokens); decode it, then clear()");
    }
    if (token < 0) throw std::out_of_range("token " + std::to_string(token) + " is negative");
    if (pos < 0) throw std::invalid_argument("pos: must be >= 0 (got " + std::to_string(pos) + ")");
    if (seq_ids.empty()) throw std::invalid_argument("seq_ids: a token belongs to at least one sequence");
    if (seq_ids.size() > static_cast<size_t>(n_seq_max_)) {
        throw std::invalid_argument("seq_ids: at most " + std::to_string(n_seq_max_) +
                                    " per token in this Batch (its n_seq_max)");
    }
    for (llama_seq_id s : seq_ids) {
        if (s < 0) throw std::out_of_range("seq id " + std::to_string(s) + " is negative");
    }
    tokens_.push_back(token);
    pos_.push_back(pos);
    seq_ids_.push_back(seq_ids);
    logits_.push_back(logits ? 1 : 0);
}

void Batch::add_tokens(const std::vector<llama_token> & tokens, llama_pos pos, const std::vector<llama_seq_id> & seq_ids,
                       bool logits_last) {
    check_free();
    if (tokens.size() > static_cast<size_t>(capacity_ - size())) {
        throw std::out_of_range("Batch is too full for " + std::to_string(tokens.size()) + " more tokens (" +
                                std::to_string(size()) + " of " + std::to_string(capacity_) + " used)");
    }
    const int32_t before = size();
    try {
        for (size_t i = 0; i < tokens.size(); ++i) {
            add(tokens[i], pos + static_cast<llama_pos>(i), seq_ids, logits_last && i + 1 == tokens.size());
        }
    } catch (...) {
        tokens_.resize(static_cast<size_t>(before));
        pos_.resize(static_cast<size_t>(before));
        seq_ids_.resize(static_cast<size_t>(before));
        logits_.resize(static_cast<size_t>(before));
        throw;
    }
}

void Batch::clear() {
    check_free();
    tokens_.clear();
    pos_.clear();
    seq_ids_.clear();
    logits_.clear();
}

int32_t Batch::n_outputs() const {
    return static_cast<int32_t>(std::count(logits_.begin(), logits_.end(), 1));
}

llama_batch Batch::view() {
    n_seq_id_.resize(tokens_.size());
    seq_ptrs_.resize(tokens_.size());
    for (size_t i = 0; i < tokens_.size(); ++i) {
        n_seq_id_[i] = static_cast<int32_t>(seq_ids_[i].size());
        seq_ptrs_[i] = seq_ids_[i].data();
    }
    llama_batch b{};
    b.n_tokens = size();
    b.token = tokens_.data();
    b.embd = nullptr;
    b.pos = pos_.data();
    b.n_seq_id = n_seq_id_.data();
    b.seq_id = seq_ptrs_.data();
    b.logits = logits_.data();
    return b;
}

// ---- Context -------------------------------------------------------------------------------

Context::Context(ModelHandle model, const ContextParams & p, bool vocab_only)
    : model_(std::move(model)), kv_unified_(p.kv_unified) {
    if (!model_) throw ClosedError("Model is closed");
    if (vocab_only) throw std::invalid_argument("model: loaded with vocab_only=True, it has no weights to decode with");
    if (p.n_seq_max < 1 || p.n_seq_max > llama_max_parallel_sequences()) {
        throw std::invalid_argument("n_seq_max: must be in [1, " + std::to_string(llama_max_parallel_sequences()) + "]");
    }
    if (p.n_batch < 1) throw std::invalid_argument("n_batch: must be >= 1");
    if (p.n_ubatch < 1) throw std::invalid_argument("n_ubatch: must be >= 1");
    if (p.n_threads < 0 || p.n_threads_batch < 0) throw std::invalid_argument("n_threads: must be >= 0 (0: every core)");
    if (p.flash_attn < -1 || p.flash_attn > 1) throw std::invalid_argument("flash_attn: must be 'auto', 'on' or 'off'");
    if (p.n_ctx != 0 && p.n_ctx / p.n_seq_max < 8) {
        throw std::invalid_argument("n_ctx: must leave at least 8 tokens per sequence (n_ctx / n_seq_max)");
    }
    const llama_model * m = model_.get();
    if (llama_model_has_encoder(m)) {
        throw std::invalid_argument("encoder models are not supported by the low-level Context (decoder-only models only)");
    }
    if (auto arch = meta_value(m, "general.architecture")) {
        if (auto causal = meta_value(m, *arch + ".attention.causal")) causal_ = *causal != "false";
    }
    n_vocab_ = llama_vocab_n_tokens(llama_model_get_vocab(m));

    const int32_t cores = static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = p.n_ctx;
    cp.n_batch = p.n_batch;
    cp.n_ubatch = std::min(p.n_ubatch, p.n_batch);
    cp.n_seq_max = p.n_seq_max;
    cp.n_threads = p.n_threads > 0 ? p.n_threads : cores;
    cp.n_threads_batch = p.n_threads_batch > 0 ? p.n_threads_batch : cp.n_threads;
    cp.flash_attn_type = static_cast<llama_flash_attn_type>(p.flash_attn);
    cp.kv_unified = p.kv_unified;
    cp.swa_full = p.swa_full;
    cp.no_perf = true;
    cp.abort_callback = &Context::abort_callback;
    cp.abort_callback_data = this;
    clear_last_log_error();
    ctx_ = llama_init_from_model(model_.get(), cp);
    if (!ctx_) throw std::runtime_error(with_detail("cannot create a llama.cpp context"));
    if (p.cpu_reference_kernels) llama_set_cpu_reference_kernels(ctx_, true);
}

Context::~Context() {
    if (ctx_) {
        llama_free(ctx_);
        ctx_ = nullptr;
    }
}

void Context::close() {
    if (!ctx_) return;
    Borrow use(busy_, false, "Context", "close");
    llama_free(ctx_);
    ctx_ = nullptr;
    model_.reset();
    outputs_.clear();
}

llama_context * Context::raw() const {
    if (!ctx_) throw ClosedError("Context is closed");
    return ctx_;
}

uint32_t Context::n_ctx() const { return llama_n_ctx(raw()); }
uint32_t Context::n_ctx_seq() const { return llama_n_ctx_seq(raw()); }
uint32_t Context::n_batch() const { return llama_n_batch(raw()); }
uint32_t Context::n_ubatch() const { return llama_n_ubatch(raw()); }
uint32_t Context::n_seq_max() const { return llama_n_seq_max(raw()); }
int32_t Context::n_threads() const { return llama_n_threads(raw()); }
int32_t Context::n_threads_batch() const { return llama_n_threads_batch(raw()); }

void Context::set_threads(int32_t n_threads, int32_t n_threads_batch) {
    Borrow use(busy_, closed(), "Context", "set_threads");
    if (n_threads < 1 || n_threads_batch < 1) throw std::invalid_argument("n_threads: must be >= 1");
    llama_set_n_threads(ctx_, n_threads, n_threads_batch);
}

void Context::check_seq(llama_seq_id seq) const {
    const auto n = static_cast<llama_seq_id>(n_seq_max());
    if (seq < 0 || seq >= n) {
        throw std::out_of_range("seq id " + std::to_string(seq) + " is outside [0, " + std::to_string(n) +
                                ") (the Context's n_seq_max)");
    }
}

bool Context::abort_callback(void * data) {
    auto * self = static_cast<Context *>(data);
    if (self->cancel_.load()) {
        if (!self->abort_seen_.exchange(true)) set_abort_in_progress(true);  // llama.cpp logs it as an error
        return true;
    }
    return false;
}

void Context::decode(Batch & batch) {
    Borrow use(busy_, closed(), "Context", "decode");
    struct InUse {
        Batch & b;
        explicit InUse(Batch & b) : b(b) { b.in_use.fetch_add(1); }
        ~InUse() { b.in_use.fetch_sub(1); }
    } batch_use(batch);

    const int32_t n = batch.size();
    if (n == 0) throw std::invalid_argument("the batch is empty");
    if (static_cast<uint32_t>(n) > llama_n_batch(ctx_)) {
        throw std::invalid_argument("the batch holds " + std::to_string(n) + " tokens, more than the Context's n_batch (" +
                                    std::to_string(llama_n_batch(ctx_)) + ")");
    }
    if (!causal_ && static_cast<uint32_t>(n) > llama_n_ubatch(ctx_)) {
        throw std::invalid_argument("this model attends non-causally: a batch may hold at most n_ubatch (" +
                                    std::to_string(llama_n_ubatch(ctx_)) + ") tokens");
    }
    const auto n_seq = static_cast<llama_seq_id>(llama_n_seq_max(ctx_));
    const auto n_ctx_seq = static_cast<llama_pos>(llama_n_ctx_seq(ctx_));
    std::map<llama_seq_id, llama_pos> first_pos;  // per sequence: its smallest position in the batch
    for (int32_t i = 0; i < n; ++i) {
        const std::string where = "batch[" + std::to_string(i) + "]: ";
        const llama_token t = batch.tokens()[static_cast<size_t>(i)];
        if (t < 0 || t >= n_vocab_) {
            throw std::out_of_range(where + "token " + std::to_string(t) + " is outside the vocabulary [0, " +
                                    std::to_string(n_vocab_) + ")");
        }
        const llama_pos pos = batch.positions()[static_cast<size_t>(i)];
        for (llama_seq_id s : batch.seq_ids()[static_cast<size_t>(i)]) {
            if (s < 0 || s >= n_seq) {
                throw std::out_of_range(where + "seq id " + std::to_string(s) + " is outside [0, " + std::to_string(n_seq) +
                                        ") (the Context's n_seq_max)");
            }
            auto it = first_pos.find(s);
            if (it == first_pos.end() || pos < it->second) first_pos[s] = pos;
        }
        if (pos >= n_ctx_seq) {
            throw ContextFullError(where + "position " + std::to_string(pos) + " is past the context (" +
                                       std::to_string(n_ctx_seq) +
                                       " positions per sequence); drop or shift tokens (seq_rm, seq_add) or use a larger n_ctx",
                                   0);
        }
    }
    if (cancel_.exchange(false)) {
        throw DecodeCancelledError("decode cancelled (Context.cancel() was called before it started); nothing was decoded", 2);
    }

    outputs_.clear();
    clear_last_log_error();
    abort_seen_.store(false);
    const int ret = llama_decode(ctx_, batch.view());
    if (abort_seen_.exchange(false)) set_abort_in_progress(false);

    if (ret == 0) {
        outputs_.assign(batch.logits().begin(), batch.logits().end());
        return;
    }
    std::string rolled_back;
    if (ret == 2 || ret < -1) {
        // Ubatches processed before the abort/failure stay in the memory: drop them, so the
        // memory is as before the call.
        llama_memory_t mem = llama_get_memory(ctx_);
        for (const auto & [s, p0] : first_pos) {
            if (!llama_memory_seq_rm(mem, s, p0, -1)) {
                llama_memory_seq_rm(mem, s, -1, -1);
                rolled_back += " sequence " + std::to_string(s) + " was cleared (its memory cannot drop part of it).";
            }
        }
    }
    if (ret == 2) {
        cancel_.store(false);
        throw DecodeCancelledError("decode cancelled by Context.cancel(); the memory is as before the call." + rolled_back, 2);
    }
    if (ret == 1) {
        throw ContextFullError("no room in the KV cache for this batch (llama_decode returned 1); the memory is as before "
                               "the call: drop tokens (seq_rm) or decode a smaller batch",
                               1);
    }
    if (ret == -1) {
        throw DecodeError(with_detail("llama.cpp refused the batch (llama_decode returned -1); the memory is as before the call"),
                          -1);
    }
    throw DecodeError(with_detail("decode failed (llama_decode returned " + std::to_string(ret) +
                                  "); the memory is as before the call." + rolled_back),
                      ret);
}

const float * Context::row(int32_t i) const {
    if (outputs_.empty()) {
        throw std::invalid_argument("no logits: nothing was decoded since the Context was made, its state was set, or "
                                    "the last decode failed");
    }
    const auto n = static_cast<int32_t>(outputs_.size());
    const int32_t j = i < 0 ? i + n : i;
    if (j < 0 || j >= n) {
        throw std::out_of_range("batch position " + std::to_string(i) + " is outside the last decoded batch (" +
                                std::to_string(n) + " tokens)");
    }
    if (!outputs_[static_cast<size_t>(j)]) {
        throw std::invalid_argument("batch position " + std::to_string(i) +
                                    " was added with logits=False, so llama.cpp kept no logits for it");
    }
    const float * p = llama_get_logits_ith(ctx_, j);
    if (!p) throw std::runtime_error(with_detail("llama.cpp has no logits for batch position " + std::to_string(i)));
    return p;
}

std::vector<float> Context::logits(int32_t i) {
    Borrow use(busy_, closed(), "Context", "logits");
    const float * p = row(i);
    return std::vector<float>(p, p + n_vocab_);
}

std::vector<std::pair<llama_token, float>> Context::logprobs(int32_t i, int32_t top_n) {
    Borrow use(busy_, closed(), "Context", "logprobs");
    if (top_n < 1) throw std::invalid_argument("top_n: must be >= 1");
    const float * p = row(i);
    // log-softmax, stable: log p_t = l_t - (max + log sum exp(l - max))
    float max = -INFINITY;
    for (int32_t t = 0; t < n_vocab_; ++t) {
        if (p[t] > max) max = p[t];
    }
    if (!std::isfinite(max)) throw std::runtime_error("the logits hold no finite value");
    double sum = 0.0;
    for (int32_t t = 0; t < n_vocab_; ++t) sum += std::exp(static_cast<double>(p[t]) - max);
    const double log_z = static_cast<double>(max) + std::log(sum);
    const int32_t k = std::min(top_n, n_vocab_);
    std::vector<llama_token> ids(static_cast<size_t>(n_vocab_));
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [p](llama_token a, llama_token b) {
        return p[a] > p[b] || (p[a] == p[b] && a < b);
    });
    std::vector<std::pair<llama_token, float>> out;
    out.reserve(static_cast<size_t>(k));
    for (int32_t r = 0; r < k; ++r) {
        const llama_token t = ids[static_cast<size_t>(r)];
        out.emplace_back(t, static_cast<float>(static_cast<double>(p[t]) - log_z));
    }
    return out;
}

llama_memory_t Context::memory() const {
    llama_memory_t mem = llama_get_memory(ctx_);
    if (!mem) throw std::runtime_error("this context has no memory (KV cache)");
    return mem;
}

bool Context::seq_rm(llama_seq_id seq, llama_pos p0, llama_pos p1) {
    Borrow use(busy_, closed(), "Context", "seq_rm");
    check_seq(seq);
    return llama_memory_seq_rm(memory(), seq, p0, p1);
}

void Context::seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    Borrow use(busy_, closed(), "Context", "seq_cp");
    check_seq(src);
    check_seq(dst);
    // Separate KV per sequence: llama.cpp copies the whole stream and aborts on a partial range.
    if (!kv_unified_ && src != dst && (p0 > 0 || p1 >= 0)) {
        throw std::invalid_argument("seq_cp: with a KV cache per sequence (kv_unified=False) only whole sequences are "
                                    "copied: pass p0=-1, p1=-1, or create the Context with kv_unified=True");
    }
    llama_memory_seq_cp(memory(), src, dst, p0, p1);
}

void Context::seq_keep(llama_seq_id seq) {
    Borrow use(busy_, closed(), "Context", "seq_keep");
    check_seq(seq);
    llama_memory_t mem = memory();
    llama_memory_seq_keep(mem, seq);
    // With a KV stream per sequence, llama.cpp's seq_keep only looks at seq's own stream.
    const auto n = static_cast<llama_seq_id>(llama_n_seq_max(ctx_));
    for (llama_seq_id s = 0; s < n; ++s) {
        if (s != seq) llama_memory_seq_rm(mem, s, -1, -1);
    }
}

void Context::seq_add(llama_seq_id seq, llama_pos p0, llama_pos p1, llama_pos delta) {
    Borrow use(busy_, closed(), "Context", "seq_add");
    check_seq(seq);
    llama_memory_t mem = memory();
    if (!llama_memory_can_shift(mem)) throw std::invalid_argument("seq_add: this model's memory cannot shift positions");
    llama_memory_seq_add(mem, seq, p0, p1, delta);
}

void Context::seq_div(llama_seq_id seq, llama_pos p0, llama_pos p1, int d) {
    Borrow use(busy_, closed(), "Context", "seq_div");
    check_seq(seq);
    if (d < 1) throw std::invalid_argument("d: must be >= 1");
    llama_memory_t mem = memory();
    if (!llama_memory_can_shift(mem)) throw std::invalid_argument("seq_div: this model's memory cannot shift positions");
    llama_memory_seq_div(mem, seq, p0, p1, d);
}

llama_pos Context::seq_pos_min(llama_seq_id seq) {
    Borrow use(busy_, closed(), "Context", "seq_pos_min");
    check_seq(seq);
    return llama_memory_seq_pos_min(memory(), seq);
}

llama_pos Context::seq_pos_max(llama_seq_id seq) {
    Borrow use(busy_, closed(), "Context", "seq_pos_max");
    check_seq(seq);
    return llama_memory_seq_pos_max(memory(), seq);
}

void Context::clear() {
    Borrow use(busy_, closed(), "Context", "clear");
    llama_memory_clear(memory(), true);
}

// ---- Context state -------------------------------------------------------------------------

std::vector<uint8_t> Context::state_get() {
    Borrow use(busy_, closed(), "Context", "state_get");
    clear_last_log_error();
    std::vector<uint8_t> buf(llama_state_get_size(ctx_));
    const size_t n = llama_state_get_data(ctx_, buf.data(), buf.size());
    if (n == 0) throw StateError(with_detail("cannot read the context state"));
    buf.resize(n);
    return buf;
}

void Context::state_set(const std::vector<uint8_t> & data) {
    Borrow use(busy_, closed(), "Context", "state_set");
    outputs_.clear();  // a state carries no logits
    clear_last_log_error();
    const size_t n = data.empty() ? 0 : llama_state_set_data(ctx_, data.data(), data.size());
    if (n != data.size() || n == 0) {
        llama_memory_clear(memory(), true);
        throw StateError(with_detail("cannot apply the state (" + std::to_string(data.size()) +
                                     " bytes; not a state of this model and context?); the memory was cleared"));
    }
}

void Context::state_save(const std::string & path, const std::vector<llama_token> & tokens) {
    Borrow use(busy_, closed(), "Context", "state_save");
    for (llama_token t : tokens) {
        if (t < 0 || t >= n_vocab_) throw std::out_of_range("tokens: token " + std::to_string(t) + " is outside the vocabulary");
    }
    clear_last_log_error();
    if (!llama_state_save_file(ctx_, path.c_str(), tokens.data(), tokens.size())) {
        throw StateError(with_detail("cannot save the state to '" + path + "'"));
    }
}

std::vector<llama_token> Context::state_load(const std::string & path) {
    Borrow use(busy_, closed(), "Context", "state_load");
    outputs_.clear();
    // The header (magic, version, token count) sizes the token buffer; llama.cpp checks the rest.
    uint32_t header[3] = {0, 0, 0};
    size_t file_size = 0;
    {
        std::ifstream f(path, std::ios::binary | std::ios::ate);
        if (!f) throw StateError("cannot open state file '" + path + "'");
        file_size = static_cast<size_t>(f.tellg());
        f.seekg(0);
        f.read(reinterpret_cast<char *>(header), sizeof(header));
    }
    const size_t capacity = std::min<size_t>(header[2], file_size / sizeof(llama_token));
    std::vector<llama_token> tokens(capacity);
    size_t count = 0;
    clear_last_log_error();
    if (!llama_state_load_file(ctx_, path.c_str(), tokens.data(), tokens.size(), &count)) {
        llama_memory_clear(memory(), true);
        throw StateError(with_detail("cannot load the state file '" + path +
                                     "' (not a state of this model and context?); the memory was cleared"));
    }
    tokens.resize(count);
    return tokens;
}

std::vector<uint8_t> Context::seq_state_get(llama_seq_id seq) {
    Borrow use(busy_, closed(), "Context", "seq_state_get");
    check_seq(seq);
    clear_last_log_error();
    std::vector<uint8_t> buf(llama_state_seq_get_size(ctx_, seq));
    const size_t n = buf.empty() ? 0 : llama_state_seq_get_data(ctx_, buf.data(), buf.size(), seq);
    if (n == 0) throw StateError(with_detail("cannot read the state of sequence " + std::to_string(seq)));
    buf.resize(n);
    return buf;
}

void Context::seq_state_set(const std::vector<uint8_t> & data, llama_seq_id seq) {
    Borrow use(busy_, closed(), "Context", "seq_state_set");
    check_seq(seq);
    clear_last_log_error();
    const size_t n = data.empty() ? 0 : llama_state_seq_set_data(ctx_, data.data(), data.size(), seq);
    if (n != data.size() || n == 0) {
        llama_memory_seq_rm(memory(), seq, -1, -1);
        throw StateError(with_detail("cannot apply the sequence state (" + std::to_string(data.size()) +
                                     " bytes; not a sequence state of this model and context?); sequence " +
                                     std::to_string(seq) + " was emptied"));
    }
}

void Context::seq_state_save(const std::string & path, llama_seq_id seq, const std::vector<llama_token> & tokens) {
    Borrow use(busy_, closed(), "Context", "seq_state_save");
    check_seq(seq);
    for (llama_token t : tokens) {
        if (t < 0 || t >= n_vocab_) throw std::out_of_range("tokens: token " + std::to_string(t) + " is outside the vocabulary");
    }
    clear_last_log_error();
    if (llama_state_seq_save_file(ctx_, path.c_str(), seq, tokens.data(), tokens.size()) == 0) {
        throw StateError(with_detail("cannot save the state of sequence " + std::to_string(seq) + " to '" + path + "'"));
    }
}

std::vector<llama_token> Context::seq_state_load(const std::string & path, llama_seq_id seq) {
    Borrow use(busy_, closed(), "Context", "seq_state_load");
    check_seq(seq);
    clear_last_log_error();
    size_t count = 0;
    if (llama_state_seq_load_file(ctx_, path.c_str(), seq, nullptr, 0, &count) == 0) {
        throw StateError(with_detail("cannot read the sequence state file '" + path + "'"));
    }
    std::vector<llama_token> tokens(count);
    if (llama_state_seq_load_file(ctx_, path.c_str(), seq, tokens.data(), tokens.size(), &count) == 0) {
        llama_memory_seq_rm(memory(), seq, -1, -1);
        throw StateError(with_detail("cannot load the sequence state file '" + path +
                                     "' (not a sequence state of this model and context?); sequence " +
                                     std::to_string(seq) + " was emptied"));
    }
    tokens.resize(count);
    return tokens;
}

// ---- Sampler -------------------------------------------------------------------------------

namespace {

const char * custom_name(const llama_sampler *) { return "llama_crab.custom"; }

void custom_apply(llama_sampler * smpl, llama_token_data_array * cur_p) {
    static_cast<Sampler *>(smpl->ctx)->apply_custom(cur_p);
}

llama_sampler_i make_custom_iface() {
    llama_sampler_i iface{};
    iface.name = custom_name;
    iface.apply = custom_apply;
    return iface;  // accept/reset/clone/free: none (the Sampler owns what the stage uses)
}

llama_sampler_i g_custom_iface = make_custom_iface();

}  // namespace

Sampler::Sampler(ModelHandle model, const std::vector<SamplerStage> & stages, CustomFn custom, uint32_t seed,
                 int32_t n_ctx)
    : model_(std::move(model)), custom_(std::move(custom)) {
    if (!model_) throw ClosedError("Model is closed");
    const std::string problem = chain_problem(stages, 16);
    if (!problem.empty()) throw std::invalid_argument("stages" + problem);
    if (custom_) {
        for (size_t i = 0; i < stages.size(); ++i) {
            if (is_selector(stages[i].kind)) {
                throw std::invalid_argument("stages[" + std::to_string(i) + "]: " + stages[i].kind +
                                            " picks the token, so it cannot come before the custom stage");
            }
        }
    }
    const llama_vocab * vocab = llama_model_get_vocab(model_.get());
    n_vocab_ = llama_vocab_n_tokens(vocab);
    if (n_ctx <= 0) n_ctx = llama_model_n_ctx_train(model_.get());
    llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    chain_ = llama_sampler_chain_init(cp);
    try {
        if (custom_) {
            for (const auto & s : stages) llama_sampler_chain_add(chain_, build_stage(s, vocab, seed, n_ctx));
            llama_sampler_chain_add(chain_, llama_sampler_init(&g_custom_iface, this));
        } else {
            append_stages(chain_, stages, vocab, seed, n_ctx);
        }
    } catch (...) {
        llama_sampler_free(chain_);
        chain_ = nullptr;
        throw;
    }
}

Sampler::~Sampler() {
    if (chain_) llama_sampler_free(chain_);
}

void Sampler::close() {
    if (!chain_) return;
    Borrow use(busy_, false, "Sampler", "close");
    llama_sampler_free(chain_);
    chain_ = nullptr;
    custom_ = nullptr;
    model_.reset();
}

void Sampler::apply_custom(llama_token_data_array * cur_p) {
    // Never let an exception cross llama.cpp's frames: record it, pick something valid,
    // and let sample() rethrow it.
    try {
        std::vector<float> logits(static_cast<size_t>(n_vocab_), -INFINITY);
        for (size_t j = 0; j < cur_p->size; ++j) {
            const llama_token id = cur_p->data[j].id;
            if (id >= 0 && id < n_vocab_) logits[static_cast<size_t>(id)] = cur_p->data[j].logit;
        }
        const llama_token t = custom_(logits);
        if (t < 0 || t >= n_vocab_) {
            throw std::out_of_range("the custom sampler stage returned token " + std::to_string(t) +
                                    ", outside the vocabulary [0, " + std::to_string(n_vocab_) + ")");
        }
        int64_t found = -1;
        for (size_t j = 0; j < cur_p->size; ++j) {
            if (cur_p->data[j].id == t && cur_p->data[j].logit != -INFINITY) {
                found = static_cast<int64_t>(j);
                break;
            }
        }
        if (found < 0) {
            throw std::invalid_argument("the custom sampler stage returned token " + std::to_string(t) +
                                        ", which an earlier stage removed (its logit is -inf)");
        }
        cur_p->selected = found;
    } catch (...) {
        custom_error_ = std::current_exception();
        cur_p->selected = cur_p->size > 0 ? 0 : -1;
    }
}

llama_token Sampler::sample(Context & ctx, int32_t idx) {
    Borrow use(busy_, closed(), "Sampler", "sample");
    Borrow ctx_use(ctx.busy_, ctx.closed(), "Context", "sample");
    if (ctx.model_.get() != model_.get()) {
        throw std::invalid_argument("this Sampler was built for another Model than the Context's");
    }
    const float * logits = ctx.row(idx);
    cur_.resize(static_cast<size_t>(n_vocab_));
    for (llama_token t = 0; t < n_vocab_; ++t) cur_[static_cast<size_t>(t)] = llama_token_data{t, logits[t], 0.0f};
    llama_token_data_array arr{cur_.data(), cur_.size(), -1, false};
    custom_error_ = nullptr;
    llama_sampler_apply(chain_, &arr);
    if (custom_error_) {
        std::exception_ptr e = custom_error_;
        custom_error_ = nullptr;
        std::rethrow_exception(e);
    }
    if (arr.selected < 0 || static_cast<size_t>(arr.selected) >= arr.size) {
        throw std::runtime_error("the sampler chain selected no token");
    }
    const llama_token token = arr.data[arr.selected].id;
    llama_sampler_accept(chain_, token);
    return token;
}

void Sampler::accept(llama_token token) {
    Borrow use(busy_, closed(), "Sampler", "accept");
    if (token < 0 || token >= n_vocab_) {
        throw std::out_of_range("token " + std::to_string(token) + " is outside the vocabulary [0, " +
                                std::to_string(n_vocab_) + ")");
    }
    llama_sampler_accept(chain_, token);
}

void Sampler::reset() {
    Borrow use(busy_, closed(), "Sampler", "reset");
    llama_sampler_reset(chain_);
}

}  // namespace llama_crab::lowlevel
