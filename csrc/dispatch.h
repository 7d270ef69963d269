// Run-time choice of the instruction set for the hot kernels (the build is portable: no -march=native).
#pragma once

namespace sc {

// Testing hook: true runs the portable kernels even on an AVX2 machine, so that CI checks the copy that
// non-AVX2 and non-x86 CPUs run (set through sparsecore._C._force_portable_kernels).
inline bool& portable_kernels_forced() {
  static bool forced = false;
  return forced;
}

// True when the AVX2+FMA kernels are in use: the CPU has AVX2 and FMA, the AVX2 copy of the kernels was
// compiled, and the portable kernels are not forced.
inline bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok && !portable_kernels_forced();
#else
  return false;
#endif
}

}  // namespace sc
