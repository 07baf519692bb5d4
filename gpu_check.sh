#!/usr/bin/env bash
# GPU check of the fused op (issue 3 "Done when"): build with nvcc, the op's tests on CUDA,
# compute-sanitizer memcheck + racecheck, bench.py on CUDA, and a short ResNet-50 pretraining at
# 224 px through each loss path. For a GPU machine with its own python3 (PyTorch cu13x), no
# network, no venv. Everything lands under $OUT (default gpu_out/); summary.txt has the verdicts.
#   OUT=/tmp/gpu_out bash gpu_check.sh
set -u
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME CMD... : runs CMD with output to $OUT/NAME.txt, records rc and seconds
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  say "$name: rc=$rc, $((SECONDS - t0)) s"
  return $rc
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/summary.txt"
# Only the GPU at hand (sm_90 on H100/H200) unless the caller says otherwise: halves the build.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
step build $PY -m pip install --no-build-isolation --no-deps -e . \
  || step build_inplace $PY setup.py build_ext --inplace \
  || { say "BUILD FAILED, see build*.txt"; exit 1; }
$PY -c "import adam_ext; print('adam_ext', adam_ext.build_info())" | tee -a "$OUT/summary.txt"

step pytest $PY -m pytest tests/test_fused_op.py -q -rs
# The sanitizers watch the CUDA tests that launch the kernels (not compile/opcheck: slow, CPU).
CS=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
SEL="cuda and (matches_reference or bulk or low_precision or large_d)"
step memcheck "$CS" --tool memcheck --error-exitcode 1 $PY -m pytest tests/test_fused_op.py -q -x -k "$SEL"
step racecheck "$CS" --tool racecheck --error-exitcode 1 $PY -m pytest tests/test_fused_op.py -q -x -k "$SEL and not planted"

step bench $PY bench.py --device cuda --sweep --md "$OUT/BENCHMARKS_cuda.md"

# The whole suite on the GPU machine (CUDA variants run there, CPU tests too).
step pytest_all $PY -m pytest tests -q -rs

# Short ResNet-50 pretraining at 224 px with the paper preset (batch 256, K = 65536, bf16 autocast), level 4
# (pruning on), same seed, per loss path and per view path: images/s is in each log's progress lines.
[ -f "$OUT/phantom8k/meta.json" ] || step data_prep $PY data_prep.py phantom --num-images 8000 --size 256 --out "$OUT/phantom8k"
for loss in fused torch; do
  step "adam_resnet50_$loss" $PY adam.py --data phantom --data-root "$OUT/phantom8k" --preset paper --device cuda \
    --levels 4 --epochs 1 --steps-per-epoch 20 --print-freq 5 --workers 12 --loss "$loss" --out "$OUT/run_$loss"
done
step adam_resnet50_fused_gpu_views $PY adam.py --data phantom --data-root "$OUT/phantom8k" --preset paper \
  --device cuda --levels 4 --epochs 1 --steps-per-epoch 20 --print-freq 5 --workers 12 --gpu-views --out "$OUT/run_gpu_views"
step time_data_workers $PY adam.py --data phantom --data-root "$OUT/phantom8k" --preset paper --device cuda --levels 4 --workers 12 --time-data 20
step time_data_gpu_views $PY adam.py --data phantom --data-root "$OUT/phantom8k" --preset paper --device cuda --levels 4 --workers 12 --time-data 20 --gpu-views
grep -h "img/s\|images/s" "$OUT"/adam_resnet50_*.txt "$OUT"/time_data_*.txt | tee -a "$OUT/summary.txt"
say "done; see $OUT/summary.txt"
