#!/usr/bin/env bash
# Every CPU figure the README and docs/BENCHMARKS.md quote, in one go, on a quiet machine.
#
#   bash bench/measure_cpu.sh [OUT_DIR] [DATA_DIR]
#
# Runs, in this order: the kernel benchmark (4096x4096 batch 256 at 10% and 1%, every implementation, 2 threads),
# 8192x8192 at 10%, the width x batch sweep with its plot, bfloat16 against float32, the Fashion-MNIST end-to-end
# comparison at 1 and 2 threads and at equal time, the per-step breakdown of SET and CTRE, and the sparse GPT. Each ratio is
# taken within one run (dense and sparse interleaved). It needs sparseprop and sparselab for the peer rows
# (`pip install --no-build-isolation sparseprop==0.1.14; pip install --no-deps sparselab==0.2.2`); without them
# those rows are skipped. About 75 minutes on the 2-core Zen 4. Check `uptime` first: nothing else should run.
set -euo pipefail
out=${1:-bench/results/zen4}
data=${2:-../shared/data}
mkdir -p "$out"
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$out/log.txt"; }
uptime | tee -a "$out/log.txt"

log "kernels 4096x4096 batch 256, 2 threads"
sparsecore bench --threads 2 --densities 0.1,0.01 --repeat 20 \
  --impls dense,dense*mask,torch.sparse,sparseprop,sparselab,sparsecore,sparsecore-bsr \
  --json "$out/kernels-4096.json" | tee "$out/kernels-4096.txt"

log "kernels 8192x8192 batch 256, 2 threads"
sparsecore bench --threads 2 --out-features 8192 --in-features 8192 --densities 0.1 --repeat 10 \
  --impls dense,sparseprop,sparselab,sparsecore,sparsecore-bsr \
  --json "$out/kernels-8192.json" | tee "$out/kernels-8192.txt"

log "sweep: widths x batches at 10%"
sparsecore bench --threads 2 --sizes 1024,2048,4096,8192 --batches 16,64,256,1024 --densities 0.1 \
  --impls dense,sparsecore --repeat 4 --block 2 --plot "$out/sweep.png" --json "$out/sweep.json" | tee "$out/sweep.txt"

log "bf16 against fp32"
python bench/bench_bf16.py --threads 2 --json "$out/bf16.json" | tee "$out/bf16.txt"

for t in 1 2; do
  log "e2e Fashion-MNIST, 10 epochs, $t thread(s)"
  sparsecore bench e2e --dataset fashion-mnist --data-dir "$data" --epochs 10 --threads "$t" --quiet \
    --run ctre-eps20:ctre:epsilon=20 --out "$out/e2e-fmnist-${t}thread" | tee "$out/e2e-fmnist-${t}thread.txt"
done

python bench/e2e_threads_table.py "$out/e2e-fmnist-1thread" "$out/e2e-fmnist-2thread" | tee "$out/e2e-fmnist-table.md"

for t in 1 2; do
  log "e2e Fashion-MNIST, equal time (the dense run's 10 epochs), $t thread(s)"
  sparsecore bench e2e --dataset fashion-mnist --data-dir "$data" --epochs 10 --threads "$t" --quiet --equal-time \
    --methods set,ctre,rigl --out "$out/e2e-fmnist-equal-time-${t}thread" | tee "$out/e2e-fmnist-equal-time-${t}thread.txt"
done

for t in 1 2; do
  for m in dense set ctre; do
    log "step breakdown $m, $t thread(s)"
    python bench/step_breakdown.py --method "$m" --threads "$t" --json "$out/breakdown-$m-${t}thread.json" \
      | tee "$out/breakdown-$m-${t}thread.txt"
  done
done
log "sparse GPT against dense on Tiny Shakespeare, 2 threads"
python bench/lm_compare.py --data "$data/tinyshakespeare/input.txt" --steps 300 --densities 0.1,0.05 --threads 2 \
  --eval-every 50 --out "$out/lm" | tee "$out/lm.txt"
log "done"
