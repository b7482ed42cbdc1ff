// Fewer compute threads while the host is busy, all of them when it is quiet.
//
// ggml's threads meet at a barrier after every operation, so one thread that loses its
// core to a neighbour process stalls all of them: with threads == cores and one
// CPU-bound neighbour, decode falls to a third of quiet (measured, docs/busy-host.md),
// while one thread fewer keeps ~two thirds. The governor watches the scheduler thread
// (itself a compute thread) during decodes: when it gets much less CPU than wall time,
// a neighbour is taking its core, so it drops a thread; when a core then sits idle, it
// takes one back.
#pragma once

#include <cstdint>

namespace llama_crab {

class ThreadGovernor {
public:
    // `max_threads` <= 1 disables it.
    explicit ThreadGovernor(int32_t max_threads);

    // Around each llama_decode on the scheduler thread. `after` returns the thread count
    // to use from the next decode on (unchanged most of the time).
    void before_decode();
    int32_t after_decode();

    int32_t threads() const { return current_; }

private:
    void start_window();

    int32_t max_;
    int32_t current_;
    // The current window: decode wall and thread CPU time, host idle time.
    double window_wall_ = 0, window_cpu_ = 0;
    double window_started_ = 0;
    double idle_at_start_ = 0;
    double step_wall_ = 0, step_cpu_ = 0;
    int32_t starved_windows_ = 0, idle_windows_ = 0;
};

}  // namespace llama_crab
