#include "log_bridge.h"

#include <atomic>
#include <mutex>

#include "ggml.h"
#include "llama.h"
#include "log.h"

namespace llama_crab {

namespace {

std::atomic<LogHandler> g_handler{nullptr};
std::atomic<void *> g_data{nullptr};
std::atomic<int> g_min_level{GGML_LOG_LEVEL_WARN};
std::atomic<bool> g_abort_in_progress{false};

thread_local std::string t_line;      // fragments of the line being assembled
thread_local int t_line_level = GGML_LOG_LEVEL_INFO;
thread_local std::string t_last_error;

void on_log(ggml_log_level level, const char * text, void *) {
    if (level != GGML_LOG_LEVEL_CONT) {
        t_line_level = level;
    }
    t_line += text;
    size_t nl;
    while ((nl = t_line.find('\n')) != std::string::npos) {
        std::string line = t_line.substr(0, nl);
        t_line.erase(0, nl + 1);
        if (line.empty()) continue;
        int level = t_line_level;
        if (level == GGML_LOG_LEVEL_ERROR && g_abort_in_progress.load()) {
            level = GGML_LOG_LEVEL_DEBUG;
        }
        if (level == GGML_LOG_LEVEL_ERROR) {
            t_last_error = t_last_error.empty() ? line : t_last_error + "; " + line;
            if (t_last_error.size() > 1024) t_last_error.erase(0, t_last_error.size() - 1024);
        }
        LogHandler handler = g_handler.load();
        if (handler && level >= g_min_level.load()) {
            handler(level, line, g_data.load());
        }
    }
}

}  // namespace

void install_log_bridge(LogHandler handler, void * data, int min_level) {
    g_data = data;
    g_min_level = min_level;
    g_handler = handler;
    llama_log_set(on_log, nullptr);
    // llama.cpp's `common` has its own stderr logger; errors worth reporting reach us
    // through llama's log or through exceptions, so keep it quiet.
    common_log_set_verbosity_thold(LOG_LEVEL_OUTPUT);
}

void set_log_min_level(int min_level) {
    g_min_level = min_level;
}

void remove_log_handler() {
    g_handler = nullptr;
}

void set_abort_in_progress(bool on) {
    g_abort_in_progress = on;
}

void clear_last_log_error() {
    t_last_error.clear();
}

std::string last_log_error() {
    return t_last_error;
}

}  // namespace llama_crab
