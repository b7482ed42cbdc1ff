#include "thread_governor.h"

#include <time.h>
#include <unistd.h>

#include <cstdio>

namespace llama_crab {

namespace {

// A window this long of decoding is judged at once; two alike in a row change the count.
constexpr double kWindowS = 0.5;
// The scheduler thread had a core for less than this share of decode time: starved.
constexpr double kStarvedShare = 0.75;
// With a thread dropped, this much of a core sat idle: the neighbour is gone.
constexpr double kIdleCores = 0.6;

double clock_s(clockid_t id) {
    timespec ts{};
    clock_gettime(id, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// Seconds every core of the host spent idle (all cores summed), from /proc/stat; < 0 if unknown.
double host_idle_s() {
    FILE * f = std::fopen("/proc/stat", "r");
    if (!f) return -1;
    unsigned long long user = 0, nice = 0, sys = 0, idle = 0, iowait = 0;
    const int n = std::fscanf(f, "cpu %llu %llu %llu %llu %llu", &user, &nice, &sys, &idle, &iowait);
    std::fclose(f);
    if (n != 5) return -1;
    static const double tick = 1.0 / static_cast<double>(sysconf(_SC_CLK_TCK));
    return static_cast<double>(idle + iowait) * tick;
}

}  // namespace

ThreadGovernor::ThreadGovernor(int32_t max_threads) : max_(max_threads), current_(max_threads) {
    start_window();
}

void ThreadGovernor::start_window() {
    window_wall_ = window_cpu_ = 0;
    window_started_ = clock_s(CLOCK_MONOTONIC);
    idle_at_start_ = host_idle_s();
}

void ThreadGovernor::before_decode() {
    if (max_ <= 1) return;
    step_wall_ = clock_s(CLOCK_MONOTONIC);
    step_cpu_ = clock_s(CLOCK_THREAD_CPUTIME_ID);
}

int32_t ThreadGovernor::after_decode() {
    if (max_ <= 1) return current_;
    const double now = clock_s(CLOCK_MONOTONIC);
    window_wall_ += now - step_wall_;
    window_cpu_ += clock_s(CLOCK_THREAD_CPUTIME_ID) - step_cpu_;
    const double elapsed = now - window_started_;
    if (window_wall_ < kWindowS) {
        // Mostly idle between decodes (few requests): judge only windows of real work.
        if (elapsed > 4 * kWindowS) start_window();
        return current_;
    }
    const double idle_end = host_idle_s();
    const double idle_cores = (idle_at_start_ >= 0 && idle_end >= 0) ? (idle_end - idle_at_start_) / elapsed : 0.0;
    const bool starved = window_cpu_ < kStarvedShare * window_wall_;
    starved_windows_ = starved ? starved_windows_ + 1 : 0;
    idle_windows_ = (!starved && current_ < max_ && idle_cores >= kIdleCores) ? idle_windows_ + 1 : 0;
    if (starved_windows_ >= 2 && current_ > 1) {
        current_--;
        starved_windows_ = 0;
    } else if (idle_windows_ >= 2) {
        current_++;
        idle_windows_ = 0;
    }
    start_window();
    return current_;
}

}  // namespace llama_crab
