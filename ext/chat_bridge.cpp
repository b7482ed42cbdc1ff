#include "chat_bridge.h"

#include <algorithm>
#include <random>
#include <regex>
#include <stdexcept>

#include "chat.h"  // llama.cpp common's
#include "common.h"
#include "json-schema-to-grammar.h"
#include "json.h"
#include "llama.h"

namespace llama_crab {

namespace {

// Deeper JSON than this is refused before llama.cpp's recursive schema and template code
// sees it (a stack overflow is a crash, not an error).
constexpr int kMaxJsonDepth = 64;

int json_depth(const std::string & text) {
    int depth = 0, deepest = 0;
    bool in_string = false, escaped = false;
    for (char c : text) {
        if (in_string) {
            if (escaped) escaped = false;
            else if (c == '\\') escaped = true;
            else if (c == '"') in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '{' || c == '[') {
            deepest = std::max(deepest, ++depth);
        } else if (c == '}' || c == ']') {
            --depth;
        }
    }
    return deepest;
}

std::string depth_problem(const std::string & text) {
    if (json_depth(text) > kMaxJsonDepth) {
        return "nested deeper than " + std::to_string(kMaxJsonDepth) + " levels";
    }
    return "";
}

std::string new_tool_call_id() {
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    thread_local std::mt19937_64 rng{std::random_device{}()};
    std::string id = "call_";
    for (int i = 0; i < 24; ++i) id += alphabet[rng() % (sizeof alphabet - 1)];
    return id;
}

// llama.cpp's grammar for a required call still lets free text come first (the root is
// `<generation prompt> space until-N? tool-calls`, "anything up to the call marker"). A
// small model then writes the call as plain text and never the marker, and the grammar,
// which refuses to end without a call, runs it to the length limit. A forced call starts
// at once: drop that optional preamble from the root rule.
std::string without_free_preamble(const std::string & grammar) {
    const size_t root = grammar.rfind("\nroot ::= ") != std::string::npos ? grammar.rfind("\nroot ::= ") + 1
                        : grammar.rfind("root ::= ", 0) == 0                  ? 0
                                                                               : std::string::npos;
    if (root == std::string::npos) return grammar;
    size_t end = grammar.find('\n', root);
    if (end == std::string::npos) end = grammar.size();
    const std::string line = grammar.substr(root, end - root);
    const std::string fixed = std::regex_replace(line, std::regex(R"( until-[0-9]+\?(?= ))"), "");
    return grammar.substr(0, root) + fixed + grammar.substr(end);
}

// `have` grows to `now` when `now` extends it; the appended part goes to `delta`.
bool extend(std::string & have, const std::string & now, std::string & delta) {
    if (now.size() <= have.size() || now.compare(0, have.size(), have) != 0) return false;
    delta = now.substr(have.size());
    have = now;
    return true;
}

}  // namespace

std::string json_schema_problem(const std::string & schema) {
    std::string problem = depth_problem(schema);
    if (!problem.empty()) return problem;
    try {
        const common_json parsed = common_json::parse(schema);
        if (!parsed.is_object()) return "must be a JSON object (a JSON schema)";
        json_schema_to_grammar(parsed, true);
    } catch (const std::exception & e) {
        return e.what();
    }
    return "";
}

ChatTemplates::ChatTemplates(const llama_model * model, const std::string & override_source) {
    tmpls_ = common_chat_templates_init(model, override_source).release();
}

ChatTemplates::~ChatTemplates() {
    common_chat_templates_free(tmpls_);
}

std::string ChatTemplates::source() const {
    return common_chat_templates_source(tmpls_);
}

bool ChatTemplates::supports_tools() const {
    auto caps = common_chat_templates_get_caps(tmpls_);
    return caps["supports_tools"] && caps["supports_tool_calls"];
}

ChatPrompt ChatTemplates::apply(const ChatInputs & in) const {
    common_chat_templates_inputs ci;
    for (size_t i = 0; i < in.messages.size(); ++i) {
        const ChatMessage & m = in.messages[i];
        common_chat_msg msg;
        msg.role = m.role;
        msg.content = m.content;
        msg.reasoning_content = m.reasoning_content;
        msg.tool_name = m.name;
        msg.tool_call_id = m.tool_call_id;
        for (size_t j = 0; j < m.tool_calls.size(); ++j) {
            const ChatToolCall & tc = m.tool_calls[j];
            const std::string field = "messages[" + std::to_string(i) + "].tool_calls[" + std::to_string(j) + "].arguments";
            std::string problem = depth_problem(tc.arguments);
            if (problem.empty() && common_json::parse_no_throw(tc.arguments).is_discarded()) problem = "must be JSON text";
            if (!problem.empty()) throw std::invalid_argument(field + ": " + problem);
            msg.tool_calls.push_back({tc.name, tc.arguments, tc.id});
        }
        ci.messages.push_back(std::move(msg));
    }
    for (size_t i = 0; i < in.tools.size(); ++i) {
        const ChatTool & t = in.tools[i];
        const std::string problem = json_schema_problem(t.parameters);
        if (!problem.empty()) {
            throw std::invalid_argument("tools[" + std::to_string(i) + "].parameters: " + problem);
        }
        ci.tools.push_back({t.name, t.description, t.parameters});
    }
    if (!in.json_schema.empty()) {
        const std::string problem = json_schema_problem(in.json_schema);
        if (!problem.empty()) throw std::invalid_argument("response_format: " + problem);
    }
    ci.tool_choice = common_chat_tool_choice_parse_oaicompat(in.tool_choice);
    ci.parallel_tool_calls = in.parallel_tool_calls;
    ci.json_schema = in.json_schema;
    ci.add_generation_prompt = in.add_generation_prompt;
    ci.enable_thinking = in.enable_thinking;
    ci.use_jinja = true;
    // Thinking goes to reasoning_content where the template marks it.
    ci.reasoning_format = COMMON_REASONING_FORMAT_AUTO;

    common_chat_params cp;
    try {
        cp = common_chat_templates_apply(tmpls_, ci);
    } catch (const std::exception & e) {
        // The template itself refused the conversation (e.g. roles out of order).
        throw std::invalid_argument(std::string("messages: the chat template cannot render them: ") + e.what());
    }
    ChatPrompt out;
    out.prompt = std::move(cp.prompt);
    out.format = common_chat_format_name(cp.format);
    out.grammar = ci.tool_choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED ? without_free_preamble(cp.grammar)
                                                                      : std::move(cp.grammar);
    out.grammar_type = out.grammar.empty() ? COMMON_GRAMMAR_TYPE_NONE : COMMON_GRAMMAR_TYPE_TOOL_CALLS;
    out.grammar_lazy = cp.grammar_lazy;
    for (const auto & t : cp.grammar_triggers) out.grammar_triggers.push_back({static_cast<int32_t>(t.type), t.value});
    out.preserved_tokens = std::move(cp.preserved_tokens);
    out.additional_stops = std::move(cp.additional_stops);
    out.generation_prompt = std::move(cp.generation_prompt);
    out.parser = std::move(cp.parser);
    out.parser_format = static_cast<int32_t>(cp.format);
    out.parse_reasoning = true;
    return out;
}

ChatStream::ChatStream(const ChatPrompt & prompt) : params_(std::make_unique<common_chat_parser_params>()) {
    params_->format = static_cast<common_chat_format>(prompt.parser_format);
    params_->reasoning_format = prompt.parse_reasoning ? COMMON_REASONING_FORMAT_AUTO : COMMON_REASONING_FORMAT_NONE;
    params_->generation_prompt = prompt.generation_prompt;
    params_->parse_tool_calls = true;
    if (!prompt.parser.empty()) params_->parser.load(prompt.parser);
    delivered_.role = "assistant";
}

ChatStream::~ChatStream() = default;

std::vector<ChatDelta> ChatStream::update(const std::string & text, bool is_partial) {
    common_chat_msg parsed;
    try {
        parsed = common_chat_parse(text, is_partial, *params_);
    } catch (const std::exception &) {
        if (is_partial) return {};  // wait for more text
        try {
            // The finished output does not parse whole (e.g. trailing junk after a call):
            // deliver what parses.
            parsed = common_chat_parse(text, true, *params_);
        } catch (const std::exception &) {
            return {};
        }
    }
    parsed.set_tool_call_ids(ids_, new_tool_call_id);

    std::vector<ChatDelta> out;
    ChatDelta d;
    if (extend(delivered_.reasoning_content, parsed.reasoning_content, d.reasoning_content)) {
        out.push_back(std::move(d));
        d = ChatDelta{};
    }
    if (extend(delivered_.content, parsed.content, d.content)) {
        out.push_back(std::move(d));
        d = ChatDelta{};
    }
    for (size_t i = 0; i < parsed.tool_calls.size(); ++i) {
        const common_chat_tool_call & tc = parsed.tool_calls[i];
        if (i < delivered_.tool_calls.size()) {
            std::string args;
            if (extend(delivered_.tool_calls[i].arguments, tc.arguments, args)) {
                ChatDelta a;
                a.tool_index = static_cast<int32_t>(i);
                a.tool_arguments = std::move(args);
                out.push_back(std::move(a));
            }
            continue;
        }
        // Announce a call once its name is whole: its arguments began, a later call
        // began, or the output is finished.
        const bool name_whole = !is_partial || !tc.arguments.empty() || i + 1 < parsed.tool_calls.size();
        if (tc.name.empty() || !name_whole) break;
        delivered_.tool_calls.push_back({tc.id, tc.name, tc.arguments});
        ChatDelta a;
        a.tool_index = static_cast<int32_t>(i);
        a.tool_id = tc.id;
        a.tool_name = tc.name;
        a.tool_arguments = tc.arguments;
        out.push_back(std::move(a));
    }
    return out;
}

}  // namespace llama_crab
