#!/usr/bin/env bash
# Every GPU check of the project in one go, for a machine with a CUDA GPU, CuPy and (optionally)
# PyTorch, when time on it is short:
#   1. install minivq (editable, no dependencies fetched: CuPy and NumPy must be there already);
#   2. the gpu-marked tests (pytest -m gpu);
#   3. with a dataset folder given, a 2,000-step training run of the default model on the GPU,
#      in the background while the tests run (nothing in it is timed against a peer), then its
#      test-split metrics and a reconstructions PNG;
#   4. once the run is done, the benchmarks alone on the GPU: nearest-code search, the VQ-VAE
#      training step and the prior's training step, each against PyTorch in the same process
#      (and minivq with its own CUDA kernels turned off, interleaved), then a profile of the
#      host's time in a training step.
# Every step has its own time limit, so one that hangs costs its limit and no more; the last
# lines printed are a summary.
#
#     bash benchmarks/gpu_check.sh OUTDIR [DATASET_DIR]
#
# OUTDIR receives gpu-check.log (everything printed), pytest-gpu.log, the three benchmark JSONs,
# the run's metrics.jsonl, eval JSON and reconstructions.png: eight files.
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [DATASET_DIR]}
data=${2:-}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
step() { echo; echo "=== $(date +%T) $*"; }
run_dir=$(mktemp -d)/gpu-run

step install
$py -m pip install -q -e . --no-deps --no-build-isolation || echo "install FAILED"
step versions
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
$py -c "import sys, numpy, cupy; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'cupy',
cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())" 2>&1 | tail -1
$py -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1 | tail -1

train_pid=
if [ -n "$data" ]; then
  export MINIVQ_DATA=$data                  # the benchmarks time real images too
  step "training run, 2000 steps, in the background -> $run_dir"
  ( timeout 240 $py -m minivq train --device cuda --steps 2000 --out "$run_dir" --overwrite \
      > "$run_dir.log" 2>&1; echo "train exit $?" >> "$run_dir.log" ) &
  train_pid=$!
fi

step "pytest -m gpu"
timeout 240 $py -m pytest -m gpu -q -p no:cacheprovider --timeout 120 --tb=short -rfEs tests \
  > "$out/pytest-gpu.log" 2>&1
pytest_rc=$?
tail -n 60 "$out/pytest-gpu.log"

if [ -n "$train_pid" ]; then
  step "waiting for the training run"
  wait "$train_pid"
  tail -n 25 "$run_dir.log"
  cp "$run_dir/metrics.jsonl" "$out/" 2>/dev/null
  if [ -f "$run_dir/checkpoint.npz" ]; then
    step "eval and reconstruct on the GPU"
    timeout 60 $py -m minivq eval --device cuda "$run_dir/checkpoint.npz" > "$out/eval-cuda.json"
    tail -c 600 "$out/eval-cuda.json"; echo
    timeout 60 $py -m minivq reconstruct --device cuda --out "$out/reconstructions.png" "$run_dir/checkpoint.npz"
  fi
fi

step "bench_quantizer --device cuda"
timeout 100 $py benchmarks/bench_quantizer.py --device cuda --out "$out/quantizer-cuda.json" 2>&1 | tail -n 40
step "bench_train_step --device cuda"
timeout 100 $py benchmarks/bench_train_step.py --device cuda --batches 32 128 512 --array-ops-too \
  --out "$out/train-step-cuda.json" 2>&1 | tail -n 9
step "bench_train_step --model prior --device cuda"
timeout 80 $py benchmarks/bench_train_step.py --model prior --device cuda --batches 64 512 --array-ops-too \
  --out "$out/prior-step-cuda.json" 2>&1 | tail -n 6
step "where the host's time goes in a batch-128 step on the GPU (cProfile, 20 steps)"
timeout 60 $py - <<'PROFILE' 2>&1 | tail -n 30
import cProfile, io, pstats, sys
sys.path.insert(0, "benchmarks")
import bench_train_step as bench
x, variance, _ = bench.load_images(128)
step = bench.minivq_step("cuda", x, variance)
for _ in range(5):
    step()
profile = cProfile.Profile()
profile.runcall(lambda: [step() for _ in range(20)])
text = io.StringIO()
pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(20)
print(text.getvalue()[-5000:])
PROFILE

step summary
echo "pytest -m gpu exit $pytest_rc"
ls -la "$out"
