// Scratch memory that the kernels reuse from call to call.
//
// Why: a fresh large allocation is served by glibc from mmap (or from a heap that it trims after large frees),
// and every 4 KiB page then costs a page fault on first touch. With per-call buffers a training step of a
// 1%-dense 4096x4096 layer (batch 256) took ~1500 faults and ~2 ms more than its kernels: a third of the step.
// Each calling thread keeps a few buffers (slots), grown when a call needs more and freed with the thread or by
// release_scratch(). The OpenMP workers of a call only use what the calling thread hands them.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

namespace sc {

constexpr int SCRATCH_SLOTS = 3;

struct ScratchSlots {
  void* p[SCRATCH_SLOTS] = {};
  std::size_t bytes[SCRATCH_SLOTS] = {};
  void release() {
    for (int i = 0; i < SCRATCH_SLOTS; ++i) {
      std::free(p[i]);
      p[i] = nullptr;
      bytes[i] = 0;
    }
  }
  ~ScratchSlots() { release(); }
};

inline ScratchSlots& thread_scratch() {
  static thread_local ScratchSlots s;
  return s;
}

// n elements of T, 64-byte aligned, contents undefined; valid until this thread asks for the same slot again.
template <class T>
T* scratch(int slot, int64_t n) {
  ScratchSlots& s = thread_scratch();
  const std::size_t want = ((static_cast<std::size_t>(n > 0 ? n : 1) * sizeof(T) + 63) / 64) * 64;
  if (s.bytes[slot] < want) {
    std::free(s.p[slot]);
    s.p[slot] = std::aligned_alloc(64, want);
    s.bytes[slot] = s.p[slot] ? want : 0;
    if (!s.p[slot]) throw std::bad_alloc();
  }
  return static_cast<T*>(s.p[slot]);
}

// Frees the calling thread's scratch buffers (the next kernel call allocates them again).
inline void release_scratch() { thread_scratch().release(); }

}  // namespace sc
