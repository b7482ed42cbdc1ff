// nanobind submodule `llama_crab._engine.lowlevel`: the classes of lowlevel.h as Python
// types. Calls that compute (load, context creation, decode, state I/O, sampling without
// a Python stage) release the GIL; each object refuses a second thread while one is inside.
// `llama_crab.lowlevel` (Python) is the documented front: it re-exports these and builds
// Sampler from typed stages.
#include <filesystem>
#include <optional>

#include <nanobind/nanobind.h>
#include <nanobind/stl/filesystem.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "lowlevel.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace ll = llama_crab::lowlevel;

namespace {

PyObject * g_closed = nullptr;
PyObject * g_busy = nullptr;
PyObject * g_decode = nullptr;
PyObject * g_full = nullptr;
PyObject * g_cancelled = nullptr;
PyObject * g_state = nullptr;

// A new exception type in `m` (kept for the life of the process).
PyObject * new_exception(nb::module_ & m, const char * name, PyObject * base, const char * doc) {
    const std::string full = nb::cast<std::string>(m.attr("__name__")) + "." + name;
    PyObject * type = PyErr_NewExceptionWithDoc(full.c_str(), doc, base, nullptr);
    if (!type) throw nb::python_error();
    m.attr(name) = nb::handle(type);
    return type;
}

int32_t in_range(const char * name, int64_t v, int64_t lo, int64_t hi) {
    if (v < lo || v > hi) {
        throw std::invalid_argument(std::string(name) + ": must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                                    "] (got " + std::to_string(v) + ")");
    }
    return static_cast<int32_t>(v);
}

int32_t as_token(int64_t v) { return in_range("token", v, INT32_MIN, INT32_MAX); }

nb::bytes to_bytes(const std::vector<uint8_t> & v) { return nb::bytes(reinterpret_cast<const char *>(v.data()), v.size()); }

std::vector<uint8_t> from_bytes(const nb::bytes & b) {
    const auto * p = static_cast<const uint8_t *>(b.data());
    return std::vector<uint8_t>(p, p + b.size());
}

// The native Sampler plus the Python function of its custom stage, owned here (not inside
// the C++ std::function) so the cyclic GC can see it: a function that refers, through its
// globals or a closure, back to the sampler would otherwise be a leak.
struct PySampler : ll::Sampler {
    nb::object fn;
    PySampler(ll::ModelHandle model, const std::vector<llama_crab::SamplerStage> & stages, nb::object custom,
              uint32_t seed, int32_t n_ctx)
        : ll::Sampler(std::move(model), stages, custom.is_none() ? ll::CustomFn() : python_stage(&fn), seed, n_ctx),
          fn(std::move(custom)) {}

    // The custom stage's function: logits (list[float]) -> token id. Runs with the GIL held
    // (sample keeps it when a custom stage is present).
    static ll::CustomFn python_stage(const nb::object * slot) {
        return [slot](const std::vector<float> & logits) -> llama_token {
            if (!slot->is_valid()) throw ll::ClosedError("Sampler is closed");
            nb::object r = (*slot)(nb::cast(logits));
            int64_t t = 0;
            if (PyBool_Check(r.ptr()) || !nb::try_cast<int64_t>(r, t, false)) {
                const std::string type = nb::cast<std::string>(nb::type_name(r.type()));
                throw nb::type_error(("the custom sampler stage must return an int token id, not " + type).c_str());
            }
            if (t < INT32_MIN || t > INT32_MAX) {
                throw std::out_of_range("the custom sampler stage returned token " + std::to_string(t) +
                                        ", outside the vocabulary");
            }
            return static_cast<llama_token>(t);
        };
    }
};

int sampler_traverse(PyObject * self, visitproc visit, void * arg) {
    Py_VISIT(Py_TYPE(self));
    if (!nb::inst_ready(self)) return 0;
    Py_VISIT(nb::inst_ptr<PySampler>(self)->fn.ptr());
    return 0;
}

int sampler_clear(PyObject * self) {
    if (nb::inst_ready(self)) nb::inst_ptr<PySampler>(self)->fn = nb::object();
    return 0;
}

PyType_Slot sampler_slots[] = {
    {Py_tp_traverse, reinterpret_cast<void *>(sampler_traverse)},
    {Py_tp_clear, reinterpret_cast<void *>(sampler_clear)},
    {0, nullptr},
};

template <typename T>
void add_context_manager(nb::class_<T> & cls, const char * what) {
    cls.def("__enter__", [](T & self) -> T & { return self; }, nb::rv_policy::reference)
        .def(
            "__exit__", [](T & self, nb::handle, nb::handle, nb::handle) { self.close(); }, "exc_type"_a.none(),
            "exc_value"_a.none(), "traceback"_a.none(), what);
}

}  // namespace

void bind_lowlevel(nb::module_ & m) {
    nb::module_ ll_mod = m.def_submodule(
        "lowlevel",
        "Low-level llama.cpp objects (Model, Context, Batch, Sampler) for hand-written loops; "
        "see llama_crab.lowlevel for the documented front.");
    // Importable by name (`import llama_crab._engine.lowlevel`; stub generation imports it
    // as `_engine.lowlevel`). Its name is the installed one even then, so the stubs refer to
    // it as llama_crab._engine.lowlevel, where mypy finds its own stub.
    nb::module_::import_("sys").attr("modules")[ll_mod.attr("__name__")] = ll_mod;
    ll_mod.attr("__name__") = "llama_crab._engine.lowlevel";

    g_closed = new_exception(ll_mod, "ClosedError", PyExc_ValueError, "The object was closed.");
    g_busy = new_exception(ll_mod, "BusyError", PyExc_RuntimeError,
                           "Another thread is inside a call on this object (only Context.cancel() is thread-safe).");
    g_decode = new_exception(ll_mod, "DecodeError", PyExc_RuntimeError, "llama_decode failed; the memory is as before the call.");
    g_full = new_exception(ll_mod, "ContextFullError", g_decode,
                           "The batch does not fit: a position past the context, or no KV cells left.");
    g_cancelled = new_exception(ll_mod, "DecodeCancelledError", g_decode,
                                "Context.cancel() stopped the decode; the memory is as before the call.");
    g_state = new_exception(ll_mod, "StateError", PyExc_RuntimeError,
                            "A state could not be read, written or applied (garbage, another model or context shape, I/O).");
    nb::register_exception_translator([](const std::exception_ptr & p, void *) {
        try {
            std::rethrow_exception(p);
        } catch (const ll::DecodeCancelledError & e) {
            PyErr_SetString(g_cancelled, e.what());
        } catch (const ll::ContextFullError & e) {
            PyErr_SetString(g_full, e.what());
        } catch (const ll::DecodeError & e) {
            PyErr_SetString(g_decode, e.what());
        } catch (const ll::ClosedError & e) {
            PyErr_SetString(g_closed, e.what());
        } catch (const ll::BusyError & e) {
            PyErr_SetString(g_busy, e.what());
        } catch (const ll::StateError & e) {
            PyErr_SetString(g_state, e.what());
        }
    });
    ll_mod.attr("DEFAULT_SEED") = LLAMA_DEFAULT_SEED;

    // ---- Model ----------------------------------------------------------------------------
    nb::class_<ll::Model> model(ll_mod, "Model",
                                "A loaded GGUF model: vocabulary, metadata, chat template. Shared by the Contexts and "
                                "Samplers made from it; close() frees the weights once they are closed too.");
    model
        .def_static(
            "load",
            [](const std::filesystem::path & path, int32_t n_gpu_layers, bool use_mmap, bool use_mlock, bool vocab_only,
               bool use_extra_bufts) {
                ll::ModelParams p;
                p.use_extra_bufts = use_extra_bufts;
                p.path = path.string();
                p.n_gpu_layers = n_gpu_layers;
                p.use_mmap = use_mmap;
                p.use_mlock = use_mlock;
                p.vocab_only = vocab_only;
                nb::gil_scoped_release release;
                return ll::Model(p);
            },
            "path"_a, "n_gpu_layers"_a = 0, "use_mmap"_a = true, "use_mlock"_a = false, "vocab_only"_a = false,
            "use_extra_bufts"_a = true,
            "Load a GGUF file (ModelLoadError if it is not one). n_gpu_layers: layers to offload on a GPU build; "
            "vocab_only: the vocabulary alone (tokenize without weights; no Context); use_extra_bufts: "
            "llama.cpp's repacked CPU weights (False: --no-repack).")
        .def("close", &ll::Model::close, "Drop this handle; the weights go when no Context or Sampler uses them.")
        .def_prop_ro("closed", &ll::Model::closed)
        .def_prop_ro("vocab_only", &ll::Model::vocab_only, "Loaded without weights (tokenizer only).")
        .def_prop_ro("n_vocab", &ll::Model::n_vocab, "Tokens in the vocabulary.")
        .def_prop_ro("n_ctx_train", &ll::Model::n_ctx_train, "Context length the model was trained with.")
        .def_prop_ro("n_embd", &ll::Model::n_embd)
        .def_prop_ro("n_layer", &ll::Model::n_layer)
        .def_prop_ro("n_params", &ll::Model::n_params)
        .def_prop_ro("size", &ll::Model::size, "Bytes of the weights.")
        .def_prop_ro("description", &ll::Model::description, "llama.cpp's one-line description (type, size, quant).")
        .def_prop_ro("add_bos", &ll::Model::add_bos, "tokenize(add_special=True) starts with bos.")
        .def_prop_ro("add_eos", &ll::Model::add_eos, "tokenize(add_special=True) ends with eos.")
        .def("metadata", &ll::Model::metadata, "The GGUF metadata, every value as text.")
        .def("chat_template", &ll::Model::chat_template, "name"_a = nb::none(),
             "The chat template's source (a named one if name is given), or None.")
        .def(
            "tokenize",
            [](const ll::Model & m, const std::string & text, bool add_special, bool parse_special) {
                return m.tokenize(text, add_special, parse_special);
            },
            "text"_a, "add_special"_a = true, "parse_special"_a = false,
            "Token ids of text; add_special adds bos/eos as the model wants, parse_special turns special-token "
            "text (e.g. '<|im_end|>') into those tokens.")
        .def(
            "detokenize",
            [](const ll::Model & m, const std::vector<int64_t> & tokens, bool remove_special, bool unparse_special) {
                std::vector<llama_token> t;
                t.reserve(tokens.size());
                for (int64_t v : tokens) t.push_back(as_token(v));
                return m.detokenize(t, remove_special, unparse_special);
            },
            "tokens"_a, "remove_special"_a = false, "unparse_special"_a = false,
            "The text of tokens (invalid UTF-8 replaced by U+FFFD).")
        .def(
            "token_to_piece", [](const ll::Model & m, int64_t token, bool special) { return m.token_to_piece(as_token(token), special); },
            "token"_a, "special"_a = true,
            "One token's text (invalid UTF-8, e.g. part of a character, replaced by U+FFFD).")
        .def(
            "token_to_bytes",
            [](const ll::Model & m, int64_t token, bool special) {
                const std::string b = m.token_to_bytes(as_token(token), special);
                return nb::bytes(b.data(), b.size());
            },
            "token"_a, "special"_a = true, "One token's raw bytes (join them before decoding UTF-8).")
        .def("is_eog", [](const ll::Model & m, int64_t token) { return m.is_eog(as_token(token)); }, "token"_a,
             "The token ends generation (eos, eot, ...).")
        .def("is_control", [](const ll::Model & m, int64_t token) { return m.is_control(as_token(token)); }, "token"_a);
    for (const char * name : {"bos", "eos", "eot", "sep", "nl", "pad", "mask", "fim_pre", "fim_suf", "fim_mid", "fim_pad",
                              "fim_rep", "fim_sep"}) {
        const std::string key = name;
        model.def_prop_ro(name, [key](const ll::Model & m) { return m.special_token(key); },
                          "This special token's id, or None if the model has none.");
    }
    add_context_manager(model, "Close the model.");

    // ---- Batch ----------------------------------------------------------------------------
    nb::class_<ll::Batch> batch(ll_mod, "Batch",
                                "Tokens to decode, each with a position, its sequence ids and a logits flag. The "
                                "capacity is fixed; Context.decode takes at most the Context's n_batch tokens.");
    batch
        .def(nb::init<int32_t, int32_t>(), "capacity"_a = 512, "n_seq_max"_a = 1,
             "n_seq_max: how many sequence ids one token may carry.")
        .def(
            "add",
            [](ll::Batch & b, int64_t token, int64_t pos, int64_t seq_id, bool logits) {
                b.add(as_token(token), in_range("pos", pos, INT32_MIN, INT32_MAX),
                      {in_range("seq_id", seq_id, INT32_MIN, INT32_MAX)}, logits);
            },
            "token"_a, "pos"_a, "seq_ids"_a = 0, "logits"_a = false)
        .def(
            "add",
            [](ll::Batch & b, int64_t token, int64_t pos, const std::vector<int64_t> & seq_ids, bool logits) {
                std::vector<llama_seq_id> s;
                for (int64_t v : seq_ids) s.push_back(in_range("seq_ids", v, INT32_MIN, INT32_MAX));
                b.add(as_token(token), in_range("pos", pos, INT32_MIN, INT32_MAX), s, logits);
            },
            "token"_a, "pos"_a, "seq_ids"_a, "logits"_a = false,
            "Append a token at position pos of the sequence(s) seq_ids; logits=True keeps its logits "
            "(Context.logits / Sampler.sample read them). IndexError when the batch is full.")
        .def(
            "add_tokens",
            [](ll::Batch & b, const std::vector<int64_t> & tokens, int64_t pos, int64_t seq_id, bool logits_last) {
                std::vector<llama_token> t;
                for (int64_t v : tokens) t.push_back(as_token(v));
                b.add_tokens(t, in_range("pos", pos, INT32_MIN, INT32_MAX), {in_range("seq_id", seq_id, INT32_MIN, INT32_MAX)},
                             logits_last);
            },
            "tokens"_a, "pos"_a = 0, "seq_id"_a = 0, "logits_last"_a = true,
            "Append tokens at positions pos, pos + 1, ... of one sequence, logits for the last one only "
            "(if logits_last). All or nothing.")
        .def("clear", &ll::Batch::clear, "Empty the batch (to fill it again).")
        .def("__len__", &ll::Batch::size)
        .def_prop_ro("capacity", &ll::Batch::capacity)
        .def_prop_ro("n_seq_max", &ll::Batch::n_seq_max)
        .def_prop_ro("n_outputs", &ll::Batch::n_outputs, "Tokens added with logits=True.")
        .def_prop_ro("tokens", [](const ll::Batch & b) { return b.tokens(); })
        .def_prop_ro("positions", [](const ll::Batch & b) { return b.positions(); });

    // ---- Context --------------------------------------------------------------------------
    nb::class_<ll::Context> context(
        ll_mod, "Context",
        "A llama.cpp context of a Model: KV memory for n_seq_max sequences, decode, logits, memory and state "
        "operations. Not thread-safe, except cancel().");
    context
        .def(
            "__init__",
            [](ll::Context * self, const ll::Model & model, int64_t n_ctx, int64_t n_batch, int64_t n_ubatch,
               int64_t n_seq_max, int64_t n_threads, int64_t n_threads_batch, const std::string & flash_attn,
               bool kv_unified, bool swa_full, bool cpu_reference_kernels) {
                ll::ContextParams p;
                p.n_ctx = static_cast<uint32_t>(in_range("n_ctx", n_ctx, 0, 1 << 24));
                p.n_batch = static_cast<uint32_t>(in_range("n_batch", n_batch, 1, 1 << 20));
                p.n_ubatch = static_cast<uint32_t>(in_range("n_ubatch", n_ubatch, 1, 1 << 20));
                p.n_seq_max = static_cast<uint32_t>(in_range("n_seq_max", n_seq_max, 1, 1 << 20));
                p.n_threads = in_range("n_threads", n_threads, 0, 1024);
                p.n_threads_batch = in_range("n_threads_batch", n_threads_batch, 0, 1024);
                if (flash_attn == "auto") p.flash_attn = -1;
                else if (flash_attn == "off") p.flash_attn = 0;
                else if (flash_attn == "on") p.flash_attn = 1;
                else throw std::invalid_argument("flash_attn: must be 'auto', 'on' or 'off'");
                p.kv_unified = kv_unified;
                p.swa_full = swa_full;
                p.cpu_reference_kernels = cpu_reference_kernels;
                ll::ModelHandle handle = model.handle();
                const bool vocab_only = model.vocab_only();
                nb::gil_scoped_release release;
                new (self) ll::Context(std::move(handle), p, vocab_only);
            },
            "model"_a, "n_ctx"_a = 2048, "n_batch"_a = 512, "n_ubatch"_a = 512, "n_seq_max"_a = 1, "n_threads"_a = 0,
            "n_threads_batch"_a = 0, "flash_attn"_a = "auto", "kv_unified"_a = false, "swa_full"_a = true,
            "cpu_reference_kernels"_a = false,
            "A context of model (which it keeps alive). n_ctx: KV cells (0: the training context); each of the "
            "n_seq_max sequences gets n_ctx / n_seq_max of them unless kv_unified. n_threads 0: every core. "
            "swa_full: sliding-window layers keep every position; cpu_reference_kernels: ggml's one-kernel-per-op "
            "CPU path, so a row's logits do not depend on the batch (docs/determinism.md).")
        .def("close", &ll::Context::close, "Free the context (BusyError while another thread decodes).")
        .def_prop_ro("closed", &ll::Context::closed)
        .def_prop_ro("n_ctx", &ll::Context::n_ctx)
        .def_prop_ro("n_ctx_seq", &ll::Context::n_ctx_seq, "Positions one sequence may hold.")
        .def_prop_ro("n_batch", &ll::Context::n_batch)
        .def_prop_ro("n_ubatch", &ll::Context::n_ubatch)
        .def_prop_ro("n_seq_max", &ll::Context::n_seq_max)
        .def_prop_ro("n_threads", &ll::Context::n_threads)
        .def_prop_ro("n_threads_batch", &ll::Context::n_threads_batch)
        .def(
            "set_threads",
            [](ll::Context & c, int64_t n_threads, std::optional<int64_t> n_threads_batch) {
                const int32_t n = in_range("n_threads", n_threads, 1, 1024);
                c.set_threads(n, n_threads_batch ? in_range("n_threads_batch", *n_threads_batch, 1, 1024) : n);
            },
            "n_threads"_a, "n_threads_batch"_a = nb::none())
        .def("decode", &ll::Context::decode, "batch"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Run the model over the batch (the GIL released). Raises ContextFullError, DecodeCancelledError "
             "or DecodeError, leaving the memory as before the call; IndexError/ValueError for a bad token, "
             "sequence id or batch size, checked before anything runs.")
        .def("cancel", &ll::Context::cancel,
             "From any thread: stop the decode in progress (it raises DecodeCancelledError), or the next one if none "
             "is running.")
        .def("logits", &ll::Context::logits, "i"_a = -1,
             "Logits (one per vocabulary token) of position i of the last decoded batch (negative: from the end); "
             "the position must have been added with logits=True.")
        .def("logprobs", &ll::Context::logprobs, "i"_a = -1, "top_n"_a = 10,
             "The top_n (token, log-probability) pairs of position i, most likely first (log-softmax of the logits).")
        .def("seq_rm", &ll::Context::seq_rm, "seq"_a, "p0"_a = -1, "p1"_a = -1,
             "Remove positions [p0, p1) of seq (p0 < 0: from 0, p1 < 0: to the end). False if the memory cannot "
             "remove part of a sequence (recurrent models).")
        .def("seq_cp", &ll::Context::seq_cp, "src"_a, "dst"_a, "p0"_a = -1, "p1"_a = -1,
             "Make dst share src's positions [p0, p1). Without kv_unified only whole sequences (p0 = p1 = -1).")
        .def("seq_keep", &ll::Context::seq_keep, "seq"_a, "Drop every sequence but seq.")
        .def("seq_add", &ll::Context::seq_add, "seq"_a, "p0"_a, "p1"_a, "delta"_a,
             "Shift positions [p0, p1) of seq by delta (context shifting).")
        .def("seq_div", &ll::Context::seq_div, "seq"_a, "p0"_a, "p1"_a, "d"_a,
             "Divide positions [p0, p1) of seq by d (self-extend).")
        .def("seq_pos_min", &ll::Context::seq_pos_min, "seq"_a, "Smallest position seq holds, -1 if empty.")
        .def("seq_pos_max", &ll::Context::seq_pos_max, "seq"_a, "Largest position seq holds, -1 if empty.")
        .def("clear", &ll::Context::clear, "Empty the memory of every sequence.")
        .def(
            "state_get",
            [](ll::Context & c) {
                std::vector<uint8_t> v;
                {
                    nb::gil_scoped_release release;
                    v = c.state_get();
                }
                return to_bytes(v);
            },
            "The whole memory as bytes (no logits).")
        .def(
            "state_set",
            [](ll::Context & c, const nb::bytes & data) {
                std::vector<uint8_t> v = from_bytes(data);
                nb::gil_scoped_release release;
                c.state_set(v);
            },
            "data"_a, "Restore state_get() bytes (StateError, and an empty memory, if they do not fit).")
        .def(
            "state_save",
            [](ll::Context & c, const std::filesystem::path & path, const std::vector<int32_t> & tokens) {
                nb::gil_scoped_release release;
                c.state_save(path.string(), tokens);
            },
            "path"_a, "tokens"_a = std::vector<int32_t>{}, "Write the whole memory and tokens to a file.")
        .def(
            "state_load",
            [](ll::Context & c, const std::filesystem::path & path) {
                nb::gil_scoped_release release;
                return c.state_load(path.string());
            },
            "path"_a, "Restore a state_save() file; returns its tokens.")
        .def(
            "seq_state_get",
            [](ll::Context & c, int32_t seq) {
                std::vector<uint8_t> v;
                {
                    nb::gil_scoped_release release;
                    v = c.seq_state_get(seq);
                }
                return to_bytes(v);
            },
            "seq"_a, "One sequence's memory as bytes.")
        .def(
            "seq_state_set",
            [](ll::Context & c, const nb::bytes & data, int32_t seq) {
                std::vector<uint8_t> v = from_bytes(data);
                nb::gil_scoped_release release;
                c.seq_state_set(v, seq);
            },
            "data"_a, "seq"_a, "Replace sequence seq with seq_state_get() bytes (of any sequence).")
        .def(
            "seq_state_save",
            [](ll::Context & c, const std::filesystem::path & path, int32_t seq, const std::vector<int32_t> & tokens) {
                nb::gil_scoped_release release;
                c.seq_state_save(path.string(), seq, tokens);
            },
            "path"_a, "seq"_a, "tokens"_a = std::vector<int32_t>{}, "Write one sequence's memory and tokens to a file.")
        .def(
            "seq_state_load",
            [](ll::Context & c, const std::filesystem::path & path, int32_t seq) {
                nb::gil_scoped_release release;
                return c.seq_state_load(path.string(), seq);
            },
            "path"_a, "seq"_a, "Replace sequence seq from a seq_state_save() file; returns its tokens.");
    add_context_manager(context, "Close the context.");

    // ---- Sampler --------------------------------------------------------------------------
    nb::class_<PySampler> sampler(
        ll_mod, "Sampler",
        "A llama.cpp sampler chain from typed stages (SamplerStage; llama_crab.lowlevel.Sampler builds them "
        "from a SamplerChain), optionally ending in a Python function from logits to a token id.",
        nb::type_slots(sampler_slots));
    sampler
        .def(
            "__init__",
            [](PySampler * self, const ll::Model & model, const std::vector<llama_crab::SamplerStage> & stages,
               nb::object custom, int64_t seed, int64_t n_ctx) {
                // The engine's own stage type (filled by name from the typed stages, as a
                // request's chain is); each is checked again here, for any caller.
                for (size_t i = 0; i < stages.size(); ++i) {
                    const std::string problem = llama_crab::stage_problem(stages[i]);
                    if (!problem.empty()) {
                        throw std::invalid_argument("stages[" + std::to_string(i) + "]." + problem);
                    }
                }
                const auto & typed = stages;
                if (!custom.is_none() && !PyCallable_Check(custom.ptr())) {
                    throw std::invalid_argument("custom: must be callable");
                }
                if (seed < 0 || seed > 0xFFFFFFFFLL) throw std::invalid_argument("seed: must be in [0, 2**32 - 1]");
                new (self) PySampler(model.handle(), typed, std::move(custom), static_cast<uint32_t>(seed),
                                     in_range("n_ctx", n_ctx, 0, INT32_MAX));
            },
            "model"_a, "stages"_a, "custom"_a.none() = nb::none(), "seed"_a = static_cast<int64_t>(LLAMA_DEFAULT_SEED),
            "n_ctx"_a = 0)
        .def(
            "close",
            [](PySampler & s) {
                s.close();
                s.fn = nb::object();
            })
        .def_prop_ro("closed", [](const PySampler & s) { return s.closed(); })
        .def_prop_ro("has_custom", [](const PySampler & s) { return s.has_custom(); })
        .def(
            "sample",
            [](PySampler & s, ll::Context & ctx, int32_t idx) {
                if (s.has_custom()) return s.sample(ctx, idx);  // calls Python: keep the GIL
                nb::gil_scoped_release release;
                return s.sample(ctx, idx);
            },
            "ctx"_a, "idx"_a = -1, "Pick a token from position idx of ctx's last decode and accept it.")
        .def("accept", [](PySampler & s, int64_t token) { s.accept(as_token(token)); }, "token"_a,
             "Tell the stateful stages (penalties, dry, mirostat) about a token not sampled here (e.g. the prompt).")
        .def("reset", [](PySampler & s) { s.reset(); }, "Forget the accepted tokens and the random state's progress.");
    add_context_manager(sampler, "Close the sampler.");
}
