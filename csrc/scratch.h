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

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sc {

constexpr int SCRATCH_SLOTS = 3;

inline void free_scratch(void* p, std::size_t bytes);

struct ScratchSlots {
  void* p[SCRATCH_SLOTS] = {};
  std::size_t bytes[SCRATCH_SLOTS] = {};
  void release() {
    for (int i = 0; i < SCRATCH_SLOTS; ++i) {
      free_scratch(p[i], bytes[i]);
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

// Buffers of HUGE_FROM bytes and more are rounded up to whole 2 MiB pages and advised to use transparent huge
// pages: the kernels read rows of their tile buffers at random, and a 512 KiB tile in 4 KiB pages spans more pages
// than the first-level TLB holds (72 entries on Zen 4). Measured on a 2-core Zen 4, 4096x4096, batch 256, 10%
// density, 2 threads, two runs each: forward 9.73 / 10.00 -> 9.29 / 9.46 ms, dX 11.51 / 11.78 -> 11.02 / 11.10,
// dW 11.51 / 11.27 -> 11.12 / 10.57. Where the kernel does not grant huge pages, the advice changes nothing.
constexpr std::size_t HUGE_PAGE = std::size_t(2) << 20;
constexpr std::size_t HUGE_FROM = std::size_t(1) << 20;

// Large buffers are mapped (and unmapped by free_scratch) directly, not taken from malloc: glibc raises its mmap
// threshold after the first large free, so later buffers came from its heap and stayed resident after
// release_scratch(). `bytes` is the size asked for; free_scratch needs the same value.
inline std::size_t mapped_bytes(std::size_t bytes) { return (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE; }

inline void* alloc_scratch(std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= HUGE_FROM) {
    // Map one huge page more than needed, then trim the ends so that the buffer starts on a 2 MiB boundary.
    const std::size_t whole = mapped_bytes(bytes);
    void* raw = mmap(nullptr, whole + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const std::uintptr_t start = reinterpret_cast<std::uintptr_t>(raw);
    const std::uintptr_t aligned = (start + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    if (aligned > start) munmap(raw, aligned - start);
    const std::size_t tail = (start + whole + HUGE_PAGE) - (aligned + whole);
    if (tail) munmap(reinterpret_cast<void*>(aligned + whole), tail);
    void* p = reinterpret_cast<void*>(aligned);
    madvise(p, whole, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
    return p;
  }
#endif
  return std::aligned_alloc(64, bytes);
}

inline void free_scratch(void* p, std::size_t bytes) {
  if (!p) return;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= HUGE_FROM) {
    munmap(p, mapped_bytes(bytes));
    return;
  }
#endif
  std::free(p);
}

// n elements of T, 64-byte aligned, contents undefined; valid until this thread asks for the same slot again.
template <class T>
T* scratch(int slot, int64_t n) {
  ScratchSlots& s = thread_scratch();
  const std::size_t want = ((static_cast<std::size_t>(n > 0 ? n : 1) * sizeof(T) + 63) / 64) * 64;
  if (s.bytes[slot] < want) {
    free_scratch(s.p[slot], s.bytes[slot]);
    s.p[slot] = alloc_scratch(want);
    s.bytes[slot] = s.p[slot] ? want : 0;
    if (!s.p[slot]) throw std::bad_alloc();
  }
  return static_cast<T*>(s.p[slot]);
}

// Frees the calling thread's scratch buffers (the next kernel call allocates them again).
inline void release_scratch() { thread_scratch().release(); }

}  // namespace sc
