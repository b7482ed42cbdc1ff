// Chat on top of completions, from llama.cpp's `common` chat code: the model's Jinja
// template turns messages (+ tools, tool choice, JSON schema) into a prompt, a grammar and
// a parser; the parser turns the output so far into an assistant message, and successive
// messages into deltas. Nothing here knows about Python, gRPC or OpenAI's JSON.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct llama_model;
struct common_chat_templates;
struct common_chat_parser_params;
struct common_chat_msg;

namespace llama_crab {

struct ChatToolCall {
    std::string id, name, arguments;  // arguments: JSON text
};

struct ChatMessage {
    std::string role, content, reasoning_content;
    std::string name;          // a tool result's tool name
    std::string tool_call_id;  // a tool result's call id
    std::vector<ChatToolCall> tool_calls;
};

struct ChatTool {
    std::string name, description;
    std::string parameters;  // a JSON schema, as JSON text
};

// What to render. `tool_choice`: "auto", "none" or "required" (a named function is
// "required" over that one tool; the Python layer narrows the list).
struct ChatInputs {
    std::vector<ChatMessage> messages;
    std::vector<ChatTool> tools;
    std::string tool_choice = "auto";
    bool parallel_tool_calls = false;
    std::string json_schema;  // constrain the reply to this schema (JSON text); empty: free
    bool add_generation_prompt = true;
    bool enable_thinking = true;
};

struct ChatTrigger {
    int32_t type = 0;  // common_grammar_trigger_type
    std::string value;
};

// A rendered request: the prompt text, and how to constrain and parse the reply.
struct ChatPrompt {
    std::string prompt;
    std::string format;  // llama.cpp's name for the chat format (for logs and tests)
    std::string grammar;
    int32_t grammar_type = 0;  // common_grammar_type
    bool grammar_lazy = false;
    std::vector<ChatTrigger> grammar_triggers;
    std::vector<std::string> preserved_tokens;
    std::vector<std::string> additional_stops;
    std::string generation_prompt;
    std::string parser;  // serialized PEG parser
    int32_t parser_format = 0;
    bool parse_reasoning = false;
};

// One streamed change of the assistant message: reasoning or content text appended, or a
// tool call announced (index, id, name, first arguments) or its arguments extended.
struct ChatDelta {
    std::string reasoning_content, content;
    int32_t tool_index = -1;  // -1: no tool call in this delta
    std::string tool_id, tool_name, tool_arguments;
};

// The model's chat templates (its own, or an override's source).
class ChatTemplates {
public:
    ChatTemplates(const llama_model * model, const std::string & override_source);
    ~ChatTemplates();
    ChatTemplates(const ChatTemplates &) = delete;
    ChatTemplates & operator=(const ChatTemplates &) = delete;

    // Thread-safe. Throws std::invalid_argument ("field: problem") for inputs the template
    // or the tool schemas cannot take.
    ChatPrompt apply(const ChatInputs & inputs) const;
    std::string source() const;
    // The template renders tools and tool calls (a tool-call format to parse and constrain).
    bool supports_tools() const;

private:
    common_chat_templates * tmpls_ = nullptr;
};

// "" if `schema` is a JSON schema llama.cpp can turn into a grammar, else why not.
std::string json_schema_problem(const std::string & schema);

// The assistant message of one streaming reply, parsed from its text as it grows. Only
// what has been handed out as deltas is in `message()`: a parse that would take back
// delivered text (a partial tag the parser now reads differently) waits for more text.
class ChatStream {
public:
    explicit ChatStream(const ChatPrompt & prompt);
    ~ChatStream();
    ChatStream(const ChatStream &) = delete;
    ChatStream & operator=(const ChatStream &) = delete;

    // Parse the whole output so far; the deltas since the last call. `is_partial` false
    // for the finished output (complete tool calls are announced then at the latest).
    std::vector<ChatDelta> update(const std::string & text, bool is_partial);
    const ChatMessage & message() const { return delivered_; }

private:
    std::unique_ptr<common_chat_parser_params> params_;
    ChatMessage delivered_;
    std::vector<std::string> ids_;  // tool call ids, stable across parses
};

}  // namespace llama_crab
