#!/usr/bin/env bash
# The GPU check: build, test and benchmark the Triton kernels on a CUDA machine (bench/gpu_check.py, docs/GPU.md).
# Writes into $OUT (else ./gpu_check_out). Arguments go to gpu_check.py (--budget-s, --only, --bench-args).
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
