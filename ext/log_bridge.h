// Routes llama.cpp / ggml log lines to a handler (the Python binding forwards them to
// `logging`) instead of raw stderr, and remembers the last error line per thread so a
// failed load or grammar parse can say why.
#pragma once

#include <string>

namespace llama_crab {

// handler(level, line): level is ggml_log_level (2 info, 3 warn, 4 error, 1 debug).
// Lines below min_level are dropped without calling the handler.
using LogHandler = void (*)(int level, const std::string & line, void * data);

void install_log_bridge(LogHandler handler, void * data, int min_level);
void set_log_min_level(int min_level);
void remove_log_handler();  // keep silencing llama.cpp, stop forwarding (interpreter exit)

// While set, ERROR lines are logged as DEBUG and not remembered: llama.cpp reports a
// decode we aborted on purpose (every sequence in it was cancelled) as a failure.
void set_abort_in_progress(bool on);

void clear_last_log_error();
std::string last_log_error();

}  // namespace llama_crab
