// What one decode step costs, by the rows in its batch: a line fitted to recent steps
// (time = fixed + per_row * rows), forgetting old steps so that it follows the host's load.
//
// Speculation uses it to decide whether a draft is worth its rows: on a CPU a row of a
// batch is far from free, and once a batch holds several streams every drafted row costs
// nearly what a sampled one does.
#pragma once

#include <cstdint>

namespace llama_crab {

class StepCostModel {
public:
    // Steps measured once at start (two sizes at least), weighing as a few steps forever:
    // they keep the slope known while every step has the same size, which is exactly
    // when drafting stopped because it did not pay.
    void add_prior(int32_t rows, double seconds);
    // One decode of `rows` rows took `seconds`.
    void observe(int32_t rows, double seconds);
    // Whether the steps seen so far differ enough in size to tell the two costs apart.
    bool ready() const;
    double fixed_seconds() const;
    double per_row_seconds() const;
    double seconds(double rows) const { return fixed_seconds() + per_row_seconds() * rows; }

    // The share of a step's cost one more row adds to a batch of `rows` rows: a drafted
    // row that will be accepted with probability p raises throughput only when p exceeds
    // this (tokens per second (E + p) / (T + c) > E / T  <=>  p > E c / T, with E = rows).
    // 0 while not ready(): speculate, and learn the costs from it.
    double break_even_acceptance(int32_t rows) const;

private:
    struct Sums {
        double w = 0, x = 0, y = 0, xx = 0, xy = 0;
        void add(double weight, double rows, double seconds);
        void decay(double factor);
    };
    Sums all() const;

    Sums prior_;   // fixed
    Sums recent_;  // exponentially weighted (x = rows, y = seconds)
};

}  // namespace llama_crab
