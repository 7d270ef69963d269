// bfloat16 storage for the CPU kernels: the type, and its scalar conversions to and from the fp32 they compute in.
//
// The extension never sees torch tensors: sparsecore/ops.py hands a bf16 tensor over as its int16 view (numpy has
// no bf16; the view is zero copy), and the bindings reinterpret those 16-bit words as `bf16`.
// The kernels keep their tiles and accumulators in fp32 and round each output once. A bf16 product is exact in
// fp32 (8 + 8 significant bits), so the only errors are the fp32 sums' and that one rounding.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sc {

// The upper 16 bits of an IEEE fp32 (sign, 8 exponent bits, 7 mantissa bits). A type of its own, not uint16_t, so
// that a bf16 buffer cannot be taken for integers (or passed where fp32 is expected) without a cast that says so.
struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable<bf16>::value, "bf16 must be a bare 16-bit word");

// Exact: bf16 -> fp32 is a 16-bit shift.
inline float bf16_to_float(bf16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp32 -> bf16, rounded to nearest, ties to even, in integer arithmetic: adding 0x7FFF plus the lowest kept bit
// carries into the kept bits exactly when the dropped 16 bits are above half, or at half with an odd kept part.
// This is torch's rounding (c10::round_to_nearest_even), denormals and infinities included (a finite value that
// rounds past the largest bf16 becomes inf, as it must). NaN stays NaN: the quiet bit is set so that a NaN whose
// payload sat in the dropped bits does not become inf (torch writes 0x7FC0; vcvtneps2bf16 does as here).
inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  return bf16{uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

// The type a kernel computes in for a storage type E: fp32 for bf16, E itself for float and double.
template <class E>
struct compute_of {
  typedef E type;
};
template <>
struct compute_of<bf16> {
  typedef float type;
};

// Scalar conversions between a storage type E and its compute type S (the identity when they are the same).
template <class S, class E>
inline S to_compute(E e) {
  if constexpr (std::is_same<E, bf16>::value) return bf16_to_float(e);
  else return e;
}
template <class E, class S>
inline E from_compute(S s) {
  if constexpr (std::is_same<E, bf16>::value) return float_to_bf16(s);
  else return s;
}

template <class E>
constexpr bool is_bf16() { return std::is_same<E, bf16>::value; }

// The storage type of the elements of an array as Python hands it over: int16 arrays are bf16 tensors' views.
template <class A>
struct storage_of {
  typedef A type;
};
template <>
struct storage_of<int16_t> {
  typedef bf16 type;
};

// The bf16 kernels, and which copy (an Isa) each one ran last: -1 before its first call (csrc/kernels.cpp).
enum Bf16Kernel { BF16_SPMM, BF16_SPMM_T, BF16_SDDMM, BF16_BSR_SPMM, BF16_BSR_SPMM_T, BF16_BSR_SDDMM, BF16_KERNELS };
extern std::atomic<int> g_bf16_ran[BF16_KERNELS];

}  // namespace sc
