// nanobind module `llama_crab._engine`: a thin skin over the engine. Every call that can
// block or take an engine lock releases the GIL; the scheduler thread never needs it
// except to forward a log line.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "engine.h"
#include "log_bridge.h"
#include "text_stream.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace llama_crab;

namespace {

// The Python callable receiving log lines; deliberately leaked so no Python object is
// destroyed from a non-Python thread or after interpreter shutdown.
nb::object * g_log_callable = nullptr;

void forward_log(int level, const std::string & line, void *) {
    if (!g_log_callable || !Py_IsInitialized()) return;
    nb::gil_scoped_acquire gil;
    try {
        (*g_log_callable)(level, line);
    } catch (nb::python_error & e) {
        e.discard_as_unraisable("llama_crab log bridge");
    }
}

}  // namespace

void bind_lowlevel(nb::module_ & m);  // lowlevel_bindings.cpp

NB_MODULE(_engine, m) {
    m.doc() = "Native llama.cpp engine of llama-crab (continuous batching scheduler).";

    nb::exception<ModelLoadError>(m, "ModelLoadError", PyExc_ValueError);
    nb::exception<InvalidGrammarError>(m, "InvalidGrammarError", PyExc_ValueError);
    nb::exception<QueueFullError>(m, "QueueFullError", PyExc_RuntimeError);
    nb::exception<EngineClosedError>(m, "EngineClosedError", PyExc_RuntimeError);

    nb::enum_<StopReason>(m, "StopReason")
        .value("LENGTH", StopReason::LENGTH)
        .value("EOS", StopReason::EOS)
        .value("STOP_SEQUENCE", StopReason::STOP_SEQUENCE)
        .value("CANCELLED", StopReason::CANCELLED);

    nb::class_<SpeculativeParams>(m, "SpeculativeParams", "Speculative decoding: llama.cpp's draft types and their knobs.")
        .def(nb::init<>())
        .def_rw("types", &SpeculativeParams::types)
        .def_rw("draft_model", &SpeculativeParams::draft_model)
        .def_rw("draft_n_max", &SpeculativeParams::draft_n_max)
        .def_rw("draft_n_min", &SpeculativeParams::draft_n_min)
        .def_rw("draft_p_min", &SpeculativeParams::draft_p_min)
        .def_rw("draft_n_gpu_layers", &SpeculativeParams::draft_n_gpu_layers)
        .def_rw("ngram_size_n", &SpeculativeParams::ngram_size_n)
        .def_rw("ngram_size_m", &SpeculativeParams::ngram_size_m)
        .def_rw("ngram_min_hits", &SpeculativeParams::ngram_min_hits)
        .def_rw("ngram_mod_n_match", &SpeculativeParams::ngram_mod_n_match)
        .def_rw("ngram_mod_n_min", &SpeculativeParams::ngram_mod_n_min)
        .def_rw("ngram_mod_n_max", &SpeculativeParams::ngram_mod_n_max);

    nb::class_<EngineParams>(m, "EngineParams")
        .def(nb::init<>())
        .def_rw("model_path", &EngineParams::model_path)
        .def_rw("n_ctx", &EngineParams::n_ctx)
        .def_rw("n_batch", &EngineParams::n_batch)
        .def_rw("n_ubatch", &EngineParams::n_ubatch)
        .def_rw("n_threads", &EngineParams::n_threads)
        .def_rw("n_threads_batch", &EngineParams::n_threads_batch)
        .def_rw("n_gpu_layers", &EngineParams::n_gpu_layers)
        .def_rw("use_mmap", &EngineParams::use_mmap)
        .def_rw("use_mlock", &EngineParams::use_mlock)
        .def_rw("flash_attn", &EngineParams::flash_attn)
        .def_rw("seed", &EngineParams::seed)
        .def_rw("n_parallel", &EngineParams::n_parallel)
        .def_rw("max_queue", &EngineParams::max_queue)
        .def_rw("max_grammar_bytes", &EngineParams::max_grammar_bytes)
        .def_rw("max_grammar_repetitions", &EngineParams::max_grammar_repetitions)
        .def_rw("max_sample_ms", &EngineParams::max_sample_ms)
        .def_rw("max_buffered_bytes", &EngineParams::max_buffered_bytes)
        .def_rw("slow_reader_timeout_ms", &EngineParams::slow_reader_timeout_ms)
        .def_rw("cache_prompt", &EngineParams::cache_prompt)
        .def_rw("cache_ram_bytes", &EngineParams::cache_ram_bytes)
        .def_rw("chat_template", &EngineParams::chat_template)
        .def_rw("adaptive_threads", &EngineParams::adaptive_threads)
        .def_rw("deterministic", &EngineParams::deterministic)
        .def_rw("prefill_step_tokens", &EngineParams::prefill_step_tokens)
        .def_rw("embed_n_ctx", &EngineParams::embed_n_ctx)
        .def_rw("max_embed_inputs", &EngineParams::max_embed_inputs)
        .def_rw("max_embed_tokens", &EngineParams::max_embed_tokens)
        .def_rw("speculative", &EngineParams::speculative);

    nb::class_<SamplingParams>(m, "SamplingParams")
        .def(nb::init<>())
        .def_rw("max_tokens", &SamplingParams::max_tokens)
        .def_rw("stop_sequences", &SamplingParams::stop_sequences)
        .def_rw("min_indent", &SamplingParams::min_indent)
        .def_rw("logprobs", &SamplingParams::logprobs)
        .def_rw("temperature", &SamplingParams::temperature)
        .def_rw("top_k", &SamplingParams::top_k)
        .def_rw("top_p", &SamplingParams::top_p)
        .def_rw("min_p", &SamplingParams::min_p)
        .def_rw("typical_p", &SamplingParams::typical_p)
        .def_rw("repeat_penalty", &SamplingParams::repeat_penalty)
        .def_rw("presence_penalty", &SamplingParams::presence_penalty)
        .def_rw("frequency_penalty", &SamplingParams::frequency_penalty)
        .def_rw("penalty_last_n", &SamplingParams::penalty_last_n)
        .def_rw("has_seed", &SamplingParams::has_seed)
        .def_rw("seed", &SamplingParams::seed)
        .def_rw("logit_bias", &SamplingParams::logit_bias)
        .def_rw("grammar", &SamplingParams::grammar)
        .def_rw("samplers", &SamplingParams::samplers)
        .def_rw("cache_prompt", &SamplingParams::cache_prompt)
        .def_rw("speculative", &SamplingParams::speculative)
        .def_rw("min_keep", &SamplingParams::min_keep)
        .def_rw("top_n_sigma", &SamplingParams::top_n_sigma)
        .def_rw("xtc_probability", &SamplingParams::xtc_probability)
        .def_rw("xtc_threshold", &SamplingParams::xtc_threshold)
        .def_rw("dry_multiplier", &SamplingParams::dry_multiplier)
        .def_rw("dry_base", &SamplingParams::dry_base)
        .def_rw("dry_allowed_length", &SamplingParams::dry_allowed_length)
        .def_rw("dry_penalty_last_n", &SamplingParams::dry_penalty_last_n)
        .def_rw("dry_sequence_breakers", &SamplingParams::dry_sequence_breakers)
        .def_rw("mirostat", &SamplingParams::mirostat)
        .def_rw("mirostat_tau", &SamplingParams::mirostat_tau)
        .def_rw("mirostat_eta", &SamplingParams::mirostat_eta)
        .def_rw("dynatemp_range", &SamplingParams::dynatemp_range)
        .def_rw("dynatemp_exponent", &SamplingParams::dynatemp_exponent)
        .def_rw("adaptive_target", &SamplingParams::adaptive_target)
        .def_rw("adaptive_decay", &SamplingParams::adaptive_decay)
        .def_rw("ignore_eos", &SamplingParams::ignore_eos)
        .def_rw("min_tokens", &SamplingParams::min_tokens)
        .def_rw("json_schema", &SamplingParams::json_schema)
        .def_rw("sampler_chain", &SamplingParams::sampler_chain);

    nb::class_<SamplerStage>(m, "SamplerStage", "One stage of a sampler chain: a llama.cpp sampler and its parameters.")
        .def(nb::init<>())
        .def_rw("kind", &SamplerStage::kind)
        .def_rw("k", &SamplerStage::k)
        .def_rw("p", &SamplerStage::p)
        .def_rw("min_keep", &SamplerStage::min_keep)
        .def_rw("t", &SamplerStage::t)
        .def_rw("range", &SamplerStage::range)
        .def_rw("exponent", &SamplerStage::exponent)
        .def_rw("probability", &SamplerStage::probability)
        .def_rw("threshold", &SamplerStage::threshold)
        .def_rw("n", &SamplerStage::n)
        .def_rw("tau", &SamplerStage::tau)
        .def_rw("eta", &SamplerStage::eta)
        .def_rw("m", &SamplerStage::m)
        .def_rw("last_n", &SamplerStage::last_n)
        .def_rw("repeat", &SamplerStage::repeat)
        .def_rw("frequency", &SamplerStage::frequency)
        .def_rw("presence", &SamplerStage::presence)
        .def_rw("multiplier", &SamplerStage::multiplier)
        .def_rw("base", &SamplerStage::base)
        .def_rw("allowed_length", &SamplerStage::allowed_length)
        .def_rw("sequence_breakers", &SamplerStage::sequence_breakers)
        .def_rw("target", &SamplerStage::target)
        .def_rw("decay", &SamplerStage::decay);
    m.def("stage_kinds", &stage_kinds, "Every sampler stage kind the engine builds.");
    m.def("sampler_names", &sampler_names, "Names the `samplers` shorthand accepts, in llama.cpp's default order.");

    nb::class_<ChatToolCall>(m, "ChatToolCall")
        .def(nb::init<>())
        .def_rw("id", &ChatToolCall::id)
        .def_rw("name", &ChatToolCall::name)
        .def_rw("arguments", &ChatToolCall::arguments);

    nb::class_<ChatMessage>(m, "ChatMessage")
        .def(nb::init<>())
        .def_rw("role", &ChatMessage::role)
        .def_rw("content", &ChatMessage::content)
        .def_rw("reasoning_content", &ChatMessage::reasoning_content)
        .def_rw("name", &ChatMessage::name)
        .def_rw("tool_call_id", &ChatMessage::tool_call_id)
        .def_rw("tool_calls", &ChatMessage::tool_calls);

    nb::class_<ChatTool>(m, "ChatTool")
        .def(nb::init<>())
        .def_rw("name", &ChatTool::name)
        .def_rw("description", &ChatTool::description)
        .def_rw("parameters", &ChatTool::parameters);

    nb::class_<ChatInputs>(m, "ChatInputs")
        .def(nb::init<>())
        .def_rw("messages", &ChatInputs::messages)
        .def_rw("tools", &ChatInputs::tools)
        .def_rw("tool_choice", &ChatInputs::tool_choice)
        .def_rw("parallel_tool_calls", &ChatInputs::parallel_tool_calls)
        .def_rw("json_schema", &ChatInputs::json_schema)
        .def_rw("add_generation_prompt", &ChatInputs::add_generation_prompt)
        .def_rw("enable_thinking", &ChatInputs::enable_thinking);

    nb::class_<ChatTrigger>(m, "ChatTrigger")
        .def_ro("type", &ChatTrigger::type)
        .def_ro("value", &ChatTrigger::value);

    nb::class_<ChatPrompt>(m, "ChatPrompt")
        .def_ro("prompt", &ChatPrompt::prompt)
        .def_ro("format", &ChatPrompt::format)
        .def_ro("grammar", &ChatPrompt::grammar)
        .def_ro("grammar_lazy", &ChatPrompt::grammar_lazy)
        .def_ro("grammar_triggers", &ChatPrompt::grammar_triggers)
        .def_ro("preserved_tokens", &ChatPrompt::preserved_tokens)
        .def_ro("additional_stops", &ChatPrompt::additional_stops)
        .def_ro("generation_prompt", &ChatPrompt::generation_prompt);

    nb::class_<ChatDelta>(m, "ChatDelta")
        .def_ro("reasoning_content", &ChatDelta::reasoning_content)
        .def_ro("content", &ChatDelta::content)
        .def_ro("tool_index", &ChatDelta::tool_index)
        .def_ro("tool_id", &ChatDelta::tool_id)
        .def_ro("tool_name", &ChatDelta::tool_name)
        .def_ro("tool_arguments", &ChatDelta::tool_arguments);

    m.def("json_schema_problem", &json_schema_problem, "schema"_a, nb::call_guard<nb::gil_scoped_release>(),
          "'' if llama.cpp can turn the JSON schema text into a grammar, else why not.");

    nb::class_<TopLogprob>(m, "TopLogprob")
        .def_ro("token_id", &TopLogprob::token_id)
        .def_ro("text", &TopLogprob::text)
        .def_ro("logprob", &TopLogprob::logprob);

    nb::class_<TokenLogprob>(m, "TokenLogprob")
        .def_ro("token_id", &TokenLogprob::token_id)
        .def_ro("text", &TokenLogprob::text)
        .def_ro("logprob", &TokenLogprob::logprob)
        .def_ro("top", &TokenLogprob::top);

    nb::class_<Event>(m, "Event")
        .def_ro("is_final", &Event::is_final)
        .def_ro("text", &Event::text)
        .def_ro("token_ids", &Event::token_ids)
        .def_ro("n_tokens", &Event::n_tokens)
        .def_ro("logprobs", &Event::logprobs)
        .def_ro("stop_reason", &Event::stop_reason)
        .def_ro("stop_sequence", &Event::stop_sequence)
        .def_ro("prompt_tokens", &Event::prompt_tokens)
        .def_ro("cached_tokens", &Event::cached_tokens)
        .def_ro("queue_ms", &Event::queue_ms)
        .def_ro("ttft_ms", &Event::ttft_ms)
        .def_ro("prompt_tps", &Event::prompt_tps)
        .def_ro("decode_tps", &Event::decode_tps)
        .def_ro("total_ms", &Event::total_ms)
        .def_ro("draft_tokens", &Event::draft_tokens)
        .def_ro("draft_accepted_tokens", &Event::draft_accepted_tokens)
        .def_ro("error", &Event::error)
        .def_ro("error_field", &Event::error_field)
        .def_ro("chat_deltas", &Event::chat_deltas)
        .def_ro("chat_message", &Event::chat_message);

    nb::class_<Request>(m, "Request")
        .def_ro("id", &Request::id)
        .def_prop_ro("prompt_tokens", [](const Request & r) { return r.prompt.size(); })
        .def("poll", &Request::poll, "Events ready now (non-blocking).")
        .def("wait", &Request::wait, "timeout_s"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Block until an event is ready or timeout_s passes (< 0: no timeout).")
        .def("cancel", &Request::cancel, "Ask the engine to stop this request at its next step.")
        .def("fileno", &Request::fileno, "A file descriptor that is readable while events wait.")
        .def("finished", &Request::finished)
        .def("buffered_bytes", &Request::buffered_bytes, "Bytes of events waiting to be taken.")
        .def("close", &Request::cancel, "Cancel if still running; resources go with the last reference.");

    nb::class_<ModelInfo>(m, "ModelInfo")
        .def_ro("name", &ModelInfo::name)
        .def_ro("architecture", &ModelInfo::architecture)
        .def_ro("description", &ModelInfo::description)
        .def_ro("n_params", &ModelInfo::n_params)
        .def_ro("n_ctx_train", &ModelInfo::n_ctx_train)
        .def_ro("n_ctx", &ModelInfo::n_ctx)
        .def_ro("n_vocab", &ModelInfo::n_vocab)
        .def_ro("has_chat_template", &ModelInfo::has_chat_template)
        .def_ro("supports_tools", &ModelInfo::supports_tools)
        .def_ro("generates", &ModelInfo::generates)
        .def_ro("supports_infill", &ModelInfo::supports_infill)
        .def_ro("n_embd", &ModelInfo::n_embd)
        .def_ro("embed_pooling", &ModelInfo::embed_pooling)
        .def_ro("n_slots", &ModelInfo::n_slots);

    nb::class_<InfillInput>(m, "InfillInput", "Fill in the middle: the code before and after the cursor.")
        .def(nb::init<>())
        .def_rw("prefix", &InfillInput::prefix)
        .def_rw("suffix", &InfillInput::suffix)
        .def_rw("prompt", &InfillInput::prompt)
        .def_rw("extra", &InfillInput::extra)
        .def_rw("filename", &InfillInput::filename);

    nb::class_<Metrics>(m, "Metrics")
        .def_ro("n_slots", &Metrics::n_slots)
        .def_ro("busy_slots", &Metrics::busy_slots)
        .def_ro("queue_depth", &Metrics::queue_depth)
        .def_ro("requests_total", &Metrics::requests_total)
        .def_ro("prompt_tokens_total", &Metrics::prompt_tokens_total)
        .def_ro("completion_tokens_total", &Metrics::completion_tokens_total)
        .def_ro("decode_steps_total", &Metrics::decode_steps_total)
        .def_ro("paused_slots", &Metrics::paused_slots)
        .def_ro("pauses_total", &Metrics::pauses_total)
        .def_ro("slow_reader_cancels_total", &Metrics::slow_reader_cancels_total)
        .def_ro("guarded_failures_total", &Metrics::guarded_failures_total)
        .def_ro("cache_hit_tokens_total", &Metrics::cache_hit_tokens_total)
        .def_ro("cache_miss_tokens_total", &Metrics::cache_miss_tokens_total)
        .def_ro("ram_cache_bytes", &Metrics::ram_cache_bytes)
        .def_ro("ram_cache_entries", &Metrics::ram_cache_entries)
        .def_ro("ram_cache_budget", &Metrics::ram_cache_budget)
        .def_ro("draft_tokens_total", &Metrics::draft_tokens_total)
        .def_ro("draft_accepted_tokens_total", &Metrics::draft_accepted_tokens_total)
        .def_ro("embed_inputs_total", &Metrics::embed_inputs_total)
        .def_ro("embed_tokens_total", &Metrics::embed_tokens_total)
        .def_ro("ram_cache_saves_total", &Metrics::ram_cache_saves_total)
        .def_ro("ram_cache_restores_total", &Metrics::ram_cache_restores_total)
        .def_ro("n_threads_active", &Metrics::n_threads_active);

    nb::class_<Engine>(m, "Engine")
        .def(nb::init<const EngineParams &>(), "params"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Load the model and start the scheduler thread.")
        .def(
            "submit",
            [](Engine & e, std::vector<llama_token> prompt, const SamplingParams & params) {
                return e.submit(std::move(prompt), params);
            },
            "prompt"_a, "params"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("submit_chat", &Engine::submit_chat, "inputs"_a, "params"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("infill_prompt", &Engine::infill_prompt, "input"_a, "max_tokens"_a, nb::call_guard<nb::gil_scoped_release>(),
             "The token ids an infill request generates from.")
        .def(
            "embed",
            [](Engine & e, const std::vector<std::vector<llama_token>> & inputs, int32_t pooling, bool normalize) {
                EmbedResult r;
                {
                    nb::gil_scoped_release release;
                    r = e.embed(inputs, static_cast<Pooling>(pooling), normalize);
                }
                // Float32 bytes per input: Python hands them to protobuf, base64 or numpy
                // without a Python float per value on the way.
                std::vector<std::tuple<nb::bytes, int32_t, int32_t>> rows;
                rows.reserve(r.embeddings.size());
                for (const auto & emb : r.embeddings) {
                    rows.emplace_back(nb::bytes(reinterpret_cast<const char *>(emb.values.data()), emb.values.size() * sizeof(float)),
                                      emb.n_rows, emb.n_tokens);
                }
                return std::make_tuple(rows, r.n_embd, r.pooling, r.prompt_tokens);
            },
            "inputs"_a, "pooling"_a, "normalize"_a,
            "([(float32 bytes, rows, tokens) per input], n_embd, pooling applied, prompt tokens).")
        .def("apply_chat", &Engine::apply_chat, "inputs"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("close", &Engine::close, nb::call_guard<nb::gil_scoped_release>())
        .def("tokenize", &Engine::tokenize, "text"_a, "add_special"_a, "parse_special"_a,
             nb::call_guard<nb::gil_scoped_release>())
        .def("detokenize", &Engine::detokenize, "tokens"_a, "remove_special"_a, "unparse_special"_a,
             nb::call_guard<nb::gil_scoped_release>())
        .def("n_vocab", &Engine::n_vocab)
        .def("n_ctx_per_slot", &Engine::n_ctx_per_slot)
        .def("model_info", &Engine::model_info, nb::call_guard<nb::gil_scoped_release>())
        .def("metrics", &Engine::metrics, nb::call_guard<nb::gil_scoped_release>())
        .def(
            "sequence_state",
            [](Engine & e, const std::vector<llama_token> & tokens) {
                std::vector<llama_token> state_tokens;
                std::vector<uint8_t> state;
                {
                    nb::gil_scoped_release release;
                    state = e.sequence_state(tokens, state_tokens);
                }
                return std::make_pair(state_tokens, nb::bytes(reinterpret_cast<const char *>(state.data()), state.size()));
            },
            "tokens"_a, "(tokens the state covers, llama.cpp sequence state bytes) for the longest held prefix of tokens.")
        .def(
            "add_sequence_state",
            [](Engine & e, const std::vector<llama_token> & tokens, nb::bytes state) {
                std::vector<uint8_t> data(reinterpret_cast<const uint8_t *>(state.c_str()),
                                          reinterpret_cast<const uint8_t *>(state.c_str()) + state.size());
                nb::gil_scoped_release release;
                e.add_sequence_state(tokens, data);
            },
            "tokens"_a, "state"_a, "Restore a saved sequence state into a free slot and the RAM cache.");

    // The chunking rules on their own, so tests can feed exact byte sequences.
    nb::class_<TextStream>(m, "TextStream")
        .def(nb::init<std::vector<std::string>, int32_t>(), "stop_sequences"_a, "min_indent"_a = 0)
        .def(
            "push",
            [](TextStream & s, nb::bytes piece) {
                TextStream::Step step = s.push(std::string(piece.c_str(), piece.size()));
                return std::make_tuple(step.emit, step.stopped, step.stop_sequence);
            },
            "piece"_a, "Append a token's bytes; returns (text to emit, stopped, matched stop sequence).")
        .def("flush", &TextStream::flush, "Release held-back text at the end of generation.");

    m.def(
        "install_log_bridge",
        [](nb::object callable, int min_level) {
            if (!g_log_callable) g_log_callable = new nb::object();
            *g_log_callable = std::move(callable);
            install_log_bridge(&forward_log, nullptr, min_level);
        },
        "callable"_a, "min_level"_a,
        "Send llama.cpp log lines (level, text) to `callable` instead of stderr.");
    m.def(
        "system_info", [] { return std::string(llama_print_system_info()); },
        "llama.cpp's build features per backend (`CPU : SSE3 = 1 | AVX = 1 | ...`).");
    m.def("set_log_min_level", &set_log_min_level, "min_level"_a);
    m.def("remove_log_handler", &remove_log_handler);

    bind_lowlevel(m);
}
