#!/usr/bin/env bash
# Everything this package runs on the lent H200 (device time is scarce; each call is one of these).
#   bash kernels/gpu/h200.sh A|B|probe     (writes under $OUT, or ./gpu_out when OUT is unset)
# A: environment, CUDA tests, benchmark of smollm2-135m + llama-7b + llama-13b shapes.
# B: benchmark of llama-30b + llama-65b shapes, then the exactness self-check.
# C: decode buckets (1, 16) of the LLaMA shapes without cuSPARSELt (what the remaining budget allowed).
# D: the CUDA decode kernel (cuda_sp24): build the extension, its self-check and CUDA tests, then the
#    decode buckets 1-16 of the LLaMA shapes, dense cuBLAS vs the CUDA kernel (Triton left out: its
#    numbers are run C's). Run three times (D1-D3, one per kernel version, docs/PERFORMANCE.md);
#    reports/gpu/kernels_h200.csv = D3's kernels_h200_d1.csv + kernels_h200_d2.csv rows (run=D3)
#    + run C's Triton rows (backends ours, ours_noperm; run=C).
# The two halves exist only because one device command may run 10 minutes at most; the CSVs are
# concatenated into reports/gpu/kernels_h200.csv (same command, options, seed and device).
set -u -o pipefail
MODE=${1:-probe}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=kernels:.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=python3
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
BENCH="$PY -m esparse_kernels.bench --tune-reps 5 --final-reps 20"

stamp "environment"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cusparselt', torch.backends.cusparselt.version())"

case "$MODE" in
  A)
    stamp "cuda tests"
    timeout 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda.py 2>&1 | tail -15 | tee "$OUT/pytest_cuda.log"
    stamp "bench A"
    timeout 420 $BENCH --out "$OUT/kernels_h200_a.csv" --shapes smollm2-135m,llama-7b,llama-13b 2>&1 \
        | tee "$OUT/bench_a.log" | grep -v "^  [0-9]"
    ;;
  B)
    stamp "bench B"
    timeout 450 $BENCH --out "$OUT/kernels_h200_b.csv" --shapes llama-30b,llama-65b 2>&1 \
        | tee "$OUT/bench_b.log" | grep -v "^  [0-9]"
    stamp "selfcheck"
    timeout 100 $PY -m esparse_kernels.selfcheck --out "$OUT/selfcheck.json" 2>&1 | tail -8
    ;;
  C)
    # last call of the session's budget: decode buckets of the LLaMA shapes, no cuSPARSELt
    stamp "bench C"
    timeout 210 $BENCH --out "$OUT/kernels_h200_c.csv" --shapes llama-7b,llama-13b,llama-30b,llama-65b \
        --tokens 1,16 --no-isolate --no-cusparselt 2>&1 | tee "$OUT/bench_c.log" | grep -v "^  [0-9]"
    ;;
  D)
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    stamp "build the CUDA extension"
    if ! timeout 240 $PY -c "
import time; t0 = time.time()
from esparse_kernels import cuda_sp24 as c
c.load_extension(verbose=False); t1 = time.time()
print('built in %.1f s; metadata layout %d (checked in %.1f s)' % (t1 - t0, c.meta_variant(), time.time() - t1))
" 2>&1 | tail -25; then echo "build failed"; exit 1; fi
    stamp "selfcheck cuda"
    timeout 90 $PY -m esparse_kernels.selfcheck --backends cuda --out "$OUT/selfcheck_cuda.json" 2>&1 | tail -12
    stamp "cuda tests"
    timeout 90 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda_mma.py 2>&1 | tail -6
    stamp "bench D1 (1 and 16 tokens)"
    timeout 220 $BENCH --out "$OUT/kernels_h200_d1.csv" --shapes llama-7b,llama-13b,llama-30b,llama-65b \
        --tokens 1,16 --no-isolate --no-cusparselt --no-triton 2>&1 | grep -v "^  [0-9]"
    stamp "bench D2 (2, 4, 8 tokens)"
    timeout 120 $BENCH --out "$OUT/kernels_h200_d2.csv" --shapes llama-7b,llama-13b,llama-30b,llama-65b \
        --tokens 2,4,8 --no-isolate --no-cusparselt --no-triton 2>&1 | grep -v "^  [0-9]"
    ;;
  probe)
    timeout 400 $BENCH --out "$OUT/probe.csv" --shapes llama-7b.q_k_v_o --tokens 1,8 2>&1 | tee "$OUT/probe.log"
    ;;
esac
stamp "done"
