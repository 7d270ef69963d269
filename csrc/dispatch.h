// Run-time choice of the instruction set for the hot kernels (the build is portable: no -march=native).
#pragma once

#include <stdexcept>
#include <string>

namespace sc {

// Instruction sets the kernels are compiled for, in increasing order. The CSR and BSR kernels have the first three
// copies. ISA_AVX512BF16 is AVX-512 plus AVX512-BF16: the fp32/fp64 kernels run their
// AVX-512 copy there, and the bf16 kernels use the BF16 instructions where they pay (csrc/kernels.cpp). Capping
// at avx512 on such a CPU runs the bf16 kernels' other copies instead.
enum Isa : int { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512BF16 = 3 };

// The widest instruction set the kernels may use, set through sparsecore._C._set_max_isa: by the tests, to run
// every narrower copy of the kernels too, and at import from $SPARSECORE_MAX_ISA (sparsecore/backend.py).
inline int& max_isa() {
  static int cap = ISA_AVX512BF16;
  return cap;
}

// The widest instruction set this CPU (and its OS) supports among those compiled.
inline int cpu_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const int isa = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return int(ISA_GENERIC);
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")))
      return int(ISA_AVX2);
    if (__builtin_cpu_supports("avx512bf16")) return int(ISA_AVX512BF16);
    return int(ISA_AVX512);
  }();
  return isa;
#else
  return ISA_GENERIC;
#endif
}

// The instruction set the kernels run with: the CPU's widest, capped by the hook.
inline int kernel_isa() { return cpu_isa() < max_isa() ? cpu_isa() : max_isa(); }

// True when the AVX2+FMA (or wider) kernels are in use.
inline bool cpu_has_avx2() { return kernel_isa() >= ISA_AVX2; }

// Vector width in bytes of the kernels of an instruction set.
inline int isa_vector_bytes(int isa) { return isa >= ISA_AVX512 ? 64 : isa == ISA_AVX2 ? 32 : 16; }

inline const char* isa_name(int isa) {
  return isa == ISA_AVX512BF16 ? "avx512bf16" : isa == ISA_AVX512 ? "avx512" : isa == ISA_AVX2 ? "avx2" : "generic";
}

inline int isa_from_name(const std::string& name) {
  for (int isa : {ISA_GENERIC, ISA_AVX2, ISA_AVX512, ISA_AVX512BF16})
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("unknown instruction set '" + name +
                              "': expected 'generic', 'avx2', 'avx512' or 'avx512bf16'");
}

}  // namespace sc
