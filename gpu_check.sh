#!/usr/bin/env bash
# GPU check of the fused op (issue 3 "Done when") and of training on a GPU, for a machine with its
# own python3 (PyTorch cu13x), no network, no venv. Stages, run in the order given (default: all):
#   env       nvidia-smi, versions, which tools exist
#   build     setup.py build_ext --inplace for this GPU's arch only (incremental on a warm machine)
#   test      tests/test_fused_op.py on CUDA (both kernels) + tests/test_cuda_emulated.py
#   sanitize  compute-sanitizer memcheck and racecheck over the CUDA tests that launch the kernels
#   bench     bench.py --device cuda --sweep, all paths (torch, loop, fused, fused_simple, fused_tc, torch_tf32)
#   suite     the whole test suite
#   train     ResNet-50, 224 px, paper preset (batch 256, K = 65536, bf16 autocast), level 4,
#             20 steps through --loss fused / torch, fused --tf32 and --gpu-views; input pipeline timings
# One device call runs at most 10 minutes and the machine is given back 30 s after a call, so use
# three calls, each starting with `build` (seconds when the build survived, else about a minute):
#   OUT=$OUT bash gpu_check.sh env build test sanitize
#   OUT=$OUT bash gpu_check.sh build bench suite        (carry [".whl"] after `make gpu-wheels`)
#   OUT=$OUT bash gpu_check.sh build train
# Logs are written under $WORK (default /tmp/gpu_check) and packed into $OUT as summary.txt,
# logs.tar.gz and BENCHMARKS_cuda.md (the device tool returns at most 8 files from $OUT).
# The suite needs segmentation-models-pytorch and pydicom(-data), which the GPU image lacks: run
# `make gpu-wheels` here first and carry .whl with the call; wheels in .whl/ are installed into
# /tmp/site when present.
set -u
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}
WORK=${WORK:-/tmp/gpu_check}
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
say() { echo "== $*" | tee -a "$WORK/summary.txt"; }
step() {  # step NAME TIMEOUT_S CMD... : CMD's output to $WORK/NAME.txt; records rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$WORK/$name.txt" 2>&1
  local rc=$?
  say "$name: rc=$rc, $((SECONDS - t0)) s$([ $rc = 124 ] && echo " (timed out after $limit s)")"
  tail -n 3 "$WORK/$name.txt" | sed 's/^/   /' | tee -a "$WORK/summary.txt"
  save
  return $rc
}
save() {  # after every step, so that a call killed at its time limit still returns what ran
  cp "$WORK/summary.txt" "$OUT/summary.txt" 2>/dev/null
  [ -f "$WORK/BENCHMARKS_cuda.md" ] && cp "$WORK/BENCHMARKS_cuda.md" "$OUT/"
  tar -C "$WORK" -czf "$OUT/logs.tar.gz" --exclude='phantom*' --exclude='run_*' . 2>/dev/null
}
trap 'save; echo; cat "$WORK/summary.txt"' EXIT

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Only the GPU at hand (sm_90 on H100/H200) unless the caller says otherwise: halves the build.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
CS=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
STAGES=${*:-env build test sanitize bench suite train}
say "gpu_check $(date -u '+%F %T') commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') stages: $STAGES"

for stage in $STAGES; do
  case $stage in
  env)
    nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')" 2>&1 | tee -a "$WORK/summary.txt"
    for tool in nvcc compute-sanitizer ncu g++; do echo "$tool: $(command -v $tool || echo missing)"; done | tee -a "$WORK/summary.txt"
    ;;
  build)
    # Always, in place (adam_ext/_C*.so; the repo root is on sys.path of every command here): on a
    # machine kept warm between calls, ninja recompiles only what changed (pip install -e builds
    # in a fresh temporary folder every time, so it is only the fallback).
    step build 300 $PY setup.py build_ext --inplace \
      || step build_pip 300 $PY -m pip install --no-build-isolation --no-deps -e . \
      || { say "BUILD FAILED, see build*.txt"; exit 1; }
    $PY -c "import adam_ext; print('adam_ext', adam_ext.build_info())" 2>&1 | tee -a "$WORK/summary.txt"
    ;;
  test)
    step test 150 $PY -m pytest tests/test_fused_op.py tests/test_cuda_emulated.py -q -rs
    ;;
  sanitize)
    # Only the CUDA tests that launch the kernels (compile/opcheck: slow and CPU-side).
    SEL="cuda and (matches_reference or bulk or low_precision or large_d or kernel_choice or no_grad or tf32)"
    step memcheck 180 "$CS" --tool memcheck --error-exitcode 1 $PY -m pytest tests/test_fused_op.py -q -x -k "$SEL"
    step racecheck 180 "$CS" --tool racecheck --error-exitcode 1 $PY -m pytest tests/test_fused_op.py -q -x -k "$SEL"
    ;;
  bench)
    step bench 400 $PY bench.py --device cuda --sweep --paths torch,loop,fused,fused_simple,fused_tc,torch_tf32 --md "$WORK/BENCHMARKS_cuda.md"
    ;;
  suite)
    step suite 400 $PY -m pytest tests -q -rs
    ;;
  train)
    # Same seed and data for every run; images/s is in each log's progress lines.
    [ -f "$WORK/phantom/meta.json" ] || step data_prep 200 $PY data_prep.py phantom --num-images 8000 --size 256 --out "$WORK/phantom"
    TRAIN="$PY adam.py --data phantom --data-root $WORK/phantom --preset paper --device cuda --levels 4 --workers 12"
    for loss in fused torch; do
      step "train_$loss" 150 $TRAIN --epochs 1 --steps-per-epoch 20 --print-freq 5 --loss "$loss" --out "$WORK/run_$loss"
    done
    step train_fused_tf32 150 $TRAIN --epochs 1 --steps-per-epoch 20 --print-freq 5 --loss fused --tf32 --out "$WORK/run_tf32"
    step train_fused_gpu_views 150 $TRAIN --epochs 1 --steps-per-epoch 20 --print-freq 5 --gpu-views --out "$WORK/run_gpu_views"
    step time_data_workers 100 $TRAIN --time-data 20
    step time_data_gpu_views 100 $TRAIN --time-data 20 --gpu-views
    grep -h "img/s\|images/s" "$WORK"/train_*.txt "$WORK"/time_data_*.txt | tee -a "$WORK/summary.txt"
    ;;
  *)
    say "unknown stage '$stage' (env build test sanitize bench suite train)"; exit 2
    ;;
  esac
done
say "done"
