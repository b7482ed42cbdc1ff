// What one decode step costs, by the rows in its batch: a line (time = fixed + per_row *
// rows) through steps of two sizes timed once, when the engine starts.
//
// Speculation uses it to decide whether a draft is worth its rows: on a CPU a row of a
// batch is far from free, and once a batch holds several streams every drafted row costs
// nearly what a sampled one does. It is measured once and then fixed, not followed step by
// step: what a request drafts then depends only on its tokens and its batch, never on the
// clock, so a seeded or greedy request gives the same tokens every time it is repeated.
#pragma once

#include <cstdint>

namespace llama_crab {

class StepCostModel {
public:
    // A decode of `rows` rows took `seconds` (call with at least two sizes).
    void add_measurement(int32_t rows, double seconds);
    // Whether the measurements differ enough in size to tell the two costs apart.
    bool ready() const;
    double fixed_seconds() const;
    double per_row_seconds() const;
    double seconds(double rows) const { return fixed_seconds() + per_row_seconds() * rows; }

    // The share of a step's cost one more row adds to a batch of `rows` rows: a drafted
    // row that will be accepted with probability p raises throughput only when p exceeds
    // this (tokens per second (E + p) / (T + c) > E / T  <=>  p > E c / T, with E = rows).
    // 0 while not ready(): speculate freely.
    double break_even_acceptance(int32_t rows) const;

private:
    double w_ = 0, sx_ = 0, sy_ = 0, sxx_ = 0, sxy_ = 0;  // sums over (rows, seconds)
};

}  // namespace llama_crab
