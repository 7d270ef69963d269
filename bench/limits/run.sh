#!/usr/bin/env bash
# Compile and run the standalone CSR loop probe (bench/limits/csr_limits.cpp): one thread, AVX-512, fp32.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${TMPDIR:-/tmp}/sparsecore_csr_limits"
g++ -O3 -std=c++17 -mavx512f -mavx512bw -mavx512vl -mfma -o "$out" "$here/csr_limits.cpp"
"$out"
