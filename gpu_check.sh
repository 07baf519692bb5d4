#!/usr/bin/env bash
# GPU evidence in ONE device call, most important first, with a deadline.
#
#   OUT=$OUT bash gpu_check.sh                 # on a GPU machine: every stage, stops cleanly before BUDGET s
#   bash gpu_check.sh --dry-run                # here, on the CPU: the same stages at tiny shapes (CI runs it)
#   bash gpu_check.sh [--dry-run] STAGE...     # only these stages, in this order
#
# Stages, in order of value:
#   env       GPU, driver, python/torch versions, which tools exist
#   build     setup.py build_ext --inplace for this GPU's arch only, all cores
#   smoke     python bench.py selfcheck --scale full: every kernel variant (simple f32/f64/bf16/f16, tiled and
#             tc at each D they serve, gradient term on and off, blocks that walk many bank tiles, the misaligned
#             fallback, a NaN bank row) against float64 adam.info_nce; torch.profiler records the kernel that ran
#   train     the paper preset (ResNet-50, 224 px, bf16 autocast, batch 256, K = 65536) at level 4 on phantoms:
#             bench.py train's rows - the step alone, + the monitor on every step, fed by device views, by the
#             CPU loader (12 workers), by kornia's views when kornia is installed - as train_table.md; then
#             bench.py loader (CPU ms per image of the device-views loader, into real pinned memory)
#   test      tests/test_fused_op.py on CUDA (every kernel; multi-tile shapes; the bad-input cases)
#   adam      adam.py itself, as a user runs it (--views auto, 3 epochs x 10 steps): images/s from log.jsonl
#   candidates  bench.py train's step alone with each candidate switched on: --fused-sgd, --memory-format
#             contiguous (against the default channels_last), --compile; compare with train's step row
#   sanitize  compute-sanitizer memcheck, racecheck, initcheck on selfcheck --scale small, only the op's kernels,
#             PyTorch's caching allocator off (so an overrun into a neighbouring buffer is seen)
#   bench     bench.py at its default shape, every path
#   sweep     bench.py --sweep with whatever time is left
# Each step runs under min(its cap, deadline - now); a step with less than MIN_STEP s left is skipped and says so.
# After every step $OUT holds summary.txt, logs.tar.gz, selfcheck.md/.json, train_table.md and BENCHMARKS_cuda.md
# (the tables for BENCHMARKS.md), so a call killed at its limit still returns what ran.
# Environment: OUT (default gpu_out), WORK (default /tmp/gpu_check), BUDGET (s, default 540), PYTHON
# (default python3), GIT_COMMIT (the commit under test, recorded in the summary; the device machine gets the
# working tree without .git). Wheels in .whl/ are installed into /tmp/site first (the GPU image has no network).
set -u
cd "$(dirname "$0")"
DRY=0
STAGES=()
for a in "$@"; do
  case $a in
  --dry-run) DRY=1 ;;
  -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) STAGES+=("$a") ;;
  esac
done
[ ${#STAGES[@]} -gt 0 ] || STAGES=(env build smoke train test adam candidates sanitize bench sweep)
OUT=${OUT:-gpu_out}
WORK=${WORK:-/tmp/gpu_check}
BUDGET=${BUDGET:-540}
MIN_STEP=${MIN_STEP:-15}
mkdir -p "$OUT" "$WORK"
: > "$WORK/summary.txt"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$SECONDS
DEV=cuda
[ $DRY = 1 ] && DEV=cpu

say() { echo "== $*" | tee -a "$WORK/summary.txt"; }
left() { echo $((BUDGET - (SECONDS - T0))); }
save() {  # after every step
  cp "$WORK/summary.txt" "$OUT/summary.txt" 2>/dev/null
  for f in BENCHMARKS_cuda.md selfcheck.md selfcheck.json train_table.md; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"; done
  tar -C "$WORK" -czf "$OUT/logs.tar.gz" --exclude='phantom*' --exclude='run_*' . 2>/dev/null
}
step() {  # step NAME CAP CMD...: CMD's output to $WORK/NAME.txt under min(CAP, time left); records rc and seconds
  local name=$1 cap=$2; shift 2
  local limit=$(( cap < $(left) - 5 ? cap : $(left) - 5 ))
  if [ "$limit" -lt "$MIN_STEP" ]; then
    say "$name: skipped (out of time: $(left) s left of $BUDGET)"
    return 0
  fi
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" > "$WORK/$name.txt" 2>&1
  local rc=$?
  say "$name: rc=$rc, $((SECONDS - t0)) s$([ $rc = 124 ] && echo " (timed out after $limit s)")"
  tail -n 3 "$WORK/$name.txt" | sed 's/^/   /' | tee -a "$WORK/summary.txt"
  save
  return $rc
}
skip() { say "$1: skipped ($2)"; }
trap 'save; echo; cat "$WORK/summary.txt"' EXIT

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
CS=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
say "gpu_check $(date -u '+%F %T UTC') commit ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}" \
    "$([ $DRY = 1 ] && echo 'DRY RUN on CPU ')budget ${BUDGET} s, stages: ${STAGES[*]}"

# Phantoms for the train and candidates stages, made in the background while the build runs (CPU-bound, all cores).
PHANTOM=$WORK/phantom
if [[ " ${STAGES[*]} " =~ " "(train|adam|candidates)" " ]] && [ ! -f "$PHANTOM/meta.json" ]; then
  if [ $DRY = 1 ]; then
    $PY data_prep.py phantom --num-images 48 --size 64 --out "$PHANTOM" --workers 1 > "$WORK/phantom.txt" 2>&1 &
  else
    $PY data_prep.py phantom --num-images 4000 --size 256 --out "$PHANTOM" > "$WORK/phantom.txt" 2>&1 &
  fi
  PHANTOM_PID=$!
fi

for stage in "${STAGES[@]}"; do
  case $stage in
  env)
    if [ $DRY = 1 ]; then skip nvidia-smi "dry run: no GPU"; else nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1; fi
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
        *((torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')
          if torch.cuda.is_available() else ('no GPU',)))" 2>&1 | tee -a "$WORK/summary.txt"
    for tool in nvcc compute-sanitizer g++; do echo "$tool: $(command -v $tool || echo missing)"; done | tee -a "$WORK/summary.txt"
    ;;
  build)
    if [ $DRY = 1 ]; then
      # The dry run uses the op as installed (CI built it with the CUDA kernels when nvcc is there).
      step build 60 $PY -c "import adam_ext; print('adam_ext', adam_ext.build_info())"
    else
      # In place (adam_ext/_C*.so; the repo root is on sys.path of every command here), this GPU's arch only.
      export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
      export MAX_JOBS=${MAX_JOBS:-$(nproc)}
      step build 300 $PY setup.py build_ext --inplace || { say "BUILD FAILED, see build.txt"; exit 1; }
      $PY -c "import adam_ext; print('adam_ext', adam_ext.build_info())" 2>&1 | tee -a "$WORK/summary.txt"
    fi
    ;;
  smoke)
    step smoke 120 $PY bench.py selfcheck --device $DEV --scale full --json "$WORK/selfcheck.json" --md "$WORK/selfcheck.md"
    ;;
  test)
    if [ $DRY = 1 ]; then skip test "dry run: the CUDA tests need a GPU (CI runs the CPU ones)"; else
      step test 150 $PY -m pytest tests/test_fused_op.py -q -rs
    fi
    ;;
  sanitize)
    if [ $DRY = 1 ]; then skip sanitize "dry run: compute-sanitizer needs a GPU"; else
      # Only the op's kernels are instrumented (the filter), so torch's own launches run at full speed.
      FILTER="--kernel-name kns=info_nce"
      "$CS" --help 2>/dev/null | grep -q -- "--kernel-name" || FILTER="--filter kns=info_nce"
      # memcheck: every variant (small shapes). racecheck tracks every shared-memory access and initcheck all
      # device memory: one multi-tile case per kernel. initcheck without the host-API check, which would flag
      # copies of tensors that uninstrumented (filtered-out) torch kernels wrote.
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
        case $tool in
        memcheck) scale=small; extra="" ;;
        initcheck) scale=sanitize; extra="--check-api-memory-access no" ;;
        *) scale=sanitize; extra="" ;;
        esac
        step "$tool" 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$CS" --tool $tool $FILTER $extra --error-exitcode 1 \
          $PY bench.py selfcheck --device cuda --scale $scale --no-profile
      done
    fi
    ;;
  bench)
    if [ $DRY = 1 ]; then
      step bench 120 $PY bench.py --device cpu --shape 16,64,2048 --repeats 1 --no-mem --md "$WORK/BENCHMARKS_cpu_dry.md"
    else
      step bench 150 $PY bench.py --device cuda --paths torch,loop,fused,fused_simple,fused_tc,torch_tf32 --md "$WORK/BENCHMARKS_cuda.md"
    fi
    ;;
  train | adam | candidates)
    [ -n "${PHANTOM_PID:-}" ] && { wait "$PHANTOM_PID"; say "phantom: $(tail -c 200 "$WORK/phantom.txt" | tr '\r' '\n' | tail -n 1)"; PHANTOM_PID=; }
    if [ $DRY = 1 ]; then
      FLAGS="--data $PHANTOM --arch resnet18 --img-size 32 --batch-size 8 --queue-size 64 --levels 2 --workers 0
             --device cpu --val-steps 1 --print-freq 1"
      STEPS="--steps 2 --warmup 1"
    else
      # 4000 phantoms (256 px): 2800 train images, 10 steps of 256 per pass; the loader loops over them.
      FLAGS="--data $PHANTOM --preset paper --device cuda --levels 4 --workers 12 --val-steps 1 --print-freq 5"
      STEPS="--steps 20 --warmup 5"
    fi
    case $stage in
    train)
      ROWS=step,monitor,device,cpu
      $PY -c "import kornia" 2> /dev/null && ROWS=$ROWS,kornia || say "kornia row: skipped (kornia is not importable; put its wheels in .whl/)"
      rm -f "$WORK/train_table.md"
      step train_bench 180 $PY bench.py train $STEPS --rows $ROWS --md "$WORK/train_table.md" $FLAGS
      [ -f "$WORK/train_table.md" ] && sed 's/^/   /' "$WORK/train_table.md" | tee -a "$WORK/summary.txt"
      step loader 60 $PY bench.py loader --batches $([ $DRY = 1 ] && echo 2 || echo 5) $FLAGS --levels 0,2,4 --val-steps 0
      ;;
    adam)  # the views where --views auto puts them, the monitor, print steps, validation, checkpoints
      rm -rf "$WORK/run_adam"
      step train_adam 120 $PY adam.py $FLAGS --epochs 3 --steps-per-epoch $([ $DRY = 1 ] && echo 2 || echo 10) \
        --out "$WORK/run_adam"
      [ -f "$WORK/run_adam/log.jsonl" ] && cp "$WORK/run_adam/log.jsonl" "$WORK/train_adam_log.jsonl" \
        && sed 's/^/   /' "$WORK/run_adam/log.jsonl" | tee -a "$WORK/summary.txt"
      ;;
    candidates)  # each alone, against the train stage's step row (same machine, same call)
      step candidate_fused_sgd 60 $PY bench.py train $STEPS --rows step $FLAGS --fused-sgd
      step candidate_contiguous 60 $PY bench.py train $STEPS --rows step $FLAGS --memory-format contiguous
      if [ $DRY = 1 ]; then skip candidate_compile "dry run: compiling a ResNet takes minutes on the CPU"; else
        step candidate_compile 200 $PY bench.py train --steps 20 --warmup 3 --rows step $FLAGS --compile
      fi
      ;;
    esac
    save
    ;;
  sweep)
    if [ $DRY = 1 ]; then skip sweep "dry run: the sweep's shapes are GPU-sized"; else
      step sweep 600 $PY bench.py --device cuda --sweep --paths torch,fused,fused_simple,fused_tc,torch_tf32 --md "$WORK/BENCHMARKS_cuda_sweep.md"
      [ -f "$WORK/BENCHMARKS_cuda_sweep.md" ] && cat "$WORK/BENCHMARKS_cuda_sweep.md" >> "$WORK/BENCHMARKS_cuda.md"
    fi
    ;;
  *)
    say "unknown stage '$stage' (env build smoke train test adam candidates sanitize bench sweep)"; exit 2
    ;;
  esac
done
say "done in $((SECONDS - T0)) s"
