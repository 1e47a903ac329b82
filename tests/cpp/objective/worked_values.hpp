// The worked values of docs/method.md §6 (T = 1000, beta = 5000, s = 1), and a helper
// that checks one of them and prints the measured relative error.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "dde/objective/schedule.hpp"

namespace dde::objective {

// Stable Diffusion's schedule (T = 1000, scaled_linear 0.00085 .. 0.012), built once.
inline const NoiseSchedule& schedule() {
  static const NoiseSchedule s = NoiseSchedule::scaled_linear(1000, 0.00085, 0.012);
  return s;
}

}  // namespace dde::objective

namespace dde::objective::worked {

// The pair of section 6: t = 100, C_100 = 2e-4.
constexpr int64_t kPairT = 100;
constexpr double kPairPolicyW = 0.0300;
constexpr double kPairRefW = 0.0302;
constexpr double kPairPolicyL = 0.0410;
constexpr double kPairRefL = 0.0405;
constexpr double kPairCorrection = 2e-4;
constexpr double kBeta = 5000.0;

inline double relative_error(double actual, double expected) {
  return std::abs(actual - expected) / std::abs(expected);
}

// EXPECT |actual - expected| <= tol |expected| and report the measured error on stdout.
inline void expect_worked_value(const std::string& name, double actual, double expected,
                                double tol) {
  const double err = relative_error(actual, expected);
  std::printf("[ worked   ] %-28s expected %.10g got %.10g rel err %.2e\n", name.c_str(), expected,
              actual, err);
  EXPECT_LE(err, tol) << name << ": expected " << expected << ", got " << actual;
}

}  // namespace dde::objective::worked
