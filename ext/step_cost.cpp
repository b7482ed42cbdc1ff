#include "step_cost.h"

#include <algorithm>

namespace llama_crab {

void StepCostModel::add_measurement(int32_t rows, double seconds) {
    if (rows <= 0 || !(seconds > 0)) return;
    const double x = rows;
    w_ += 1;
    sx_ += x;
    sy_ += seconds;
    sxx_ += x * x;
    sxy_ += x * seconds;
}

bool StepCostModel::ready() const {
    if (w_ < 2) return false;
    const double mx = sx_ / w_;
    return sxx_ / w_ - mx * mx > 0.25;  // rows^2: at least two sizes
}

double StepCostModel::per_row_seconds() const {
    if (!ready()) return 0;
    const double mx = sx_ / w_, my = sy_ / w_;
    const double var = sxx_ / w_ - mx * mx;
    const double cov = sxy_ / w_ - mx * my;
    // Noise can tilt the line either way; a row never costs less than nothing, nor more
    // than the average step per row.
    return std::clamp(cov / var, 0.0, my / mx);
}

double StepCostModel::fixed_seconds() const {
    if (!ready()) return 0;
    return std::max(0.0, sy_ / w_ - per_row_seconds() * (sx_ / w_));
}

double StepCostModel::break_even_acceptance(int32_t rows) const {
    if (!ready() || rows <= 0) return 0;
    const double t = seconds(rows);
    return t > 0 ? std::min(1.0, rows * per_row_seconds() / t) : 0;
}

}  // namespace llama_crab
