#include "step_cost.h"

#include <algorithm>

namespace llama_crab {

namespace {

// Each step weighs this much less per later step: about 70 steps (a few seconds of
// decoding) make the fit, so it follows a host whose load changes.
constexpr double kDecay = 0.99;
// Enough steps, and enough spread in their sizes, before the slope means anything.
constexpr double kMinWeight = 8.0;
constexpr double kMinVariance = 0.25;  // rows^2
// A start-up measurement weighs as this many steps.
constexpr double kPriorWeight = 2.0;

}  // namespace

void StepCostModel::Sums::add(double weight, double rows, double seconds) {
    w += weight;
    x += weight * rows;
    y += weight * seconds;
    xx += weight * rows * rows;
    xy += weight * rows * seconds;
}

void StepCostModel::Sums::decay(double factor) {
    w *= factor;
    x *= factor;
    y *= factor;
    xx *= factor;
    xy *= factor;
}

StepCostModel::Sums StepCostModel::all() const {
    Sums s = recent_;
    s.w += prior_.w;
    s.x += prior_.x;
    s.y += prior_.y;
    s.xx += prior_.xx;
    s.xy += prior_.xy;
    return s;
}

void StepCostModel::add_prior(int32_t rows, double seconds) {
    if (rows > 0 && seconds > 0) prior_.add(kPriorWeight, rows, seconds);
}

void StepCostModel::observe(int32_t rows, double seconds) {
    if (rows <= 0 || !(seconds > 0)) return;
    recent_.decay(kDecay);
    recent_.add(1.0, rows, seconds);
}

bool StepCostModel::ready() const {
    const Sums s = all();
    if (s.w < kMinWeight && prior_.w == 0) return false;
    if (s.w <= 0) return false;
    const double mx = s.x / s.w;
    return s.xx / s.w - mx * mx >= kMinVariance;
}

double StepCostModel::per_row_seconds() const {
    if (!ready()) return 0;
    const Sums s = all();
    const double mx = s.x / s.w, my = s.y / s.w;
    const double var = s.xx / s.w - mx * mx;
    const double cov = s.xy / s.w - mx * my;
    // Noise can tilt the line either way; a row never costs less than nothing, nor more
    // than the average step per row.
    return std::clamp(cov / var, 0.0, my / mx);
}

double StepCostModel::fixed_seconds() const {
    if (!ready()) return 0;
    const Sums s = all();
    return std::max(0.0, s.y / s.w - per_row_seconds() * (s.x / s.w));
}

double StepCostModel::break_even_acceptance(int32_t rows) const {
    if (!ready() || rows <= 0) return 0;
    const double t = seconds(rows);
    return t > 0 ? std::min(1.0, rows * per_row_seconds() / t) : 0;
}

}  // namespace llama_crab
