// The ctest programs' checks: each prints one line, failures are counted for the exit status.
#pragma once

#include <iostream>
#include <string>

#include "../src/lib/manifest.hpp"

namespace megafusion::testing {

inline int g_failures = 0;

inline void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << "\n";
  g_failures += !ok;
}

// `f` must throw a Failure with status `code` whose message holds `needle` (and, with `one_line`, no newline).
template <typename F>
void expect_failure(const std::string& what, const std::string& needle, F&& f, mf_status code,
                    bool one_line = false) {
  try {
    f();
    check(false, what + ": no error");
  } catch (const megafusion::lib::Failure& e) {
    const std::string msg = e.what();
    check(e.code == code && msg.find(needle) != std::string::npos &&
              (!one_line || msg.find('\n') == std::string::npos),
          what + ": " + msg);
  }
}

}  // namespace megafusion::testing
