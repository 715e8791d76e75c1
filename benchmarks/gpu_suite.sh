#!/usr/bin/env bash
# The one prepared GPU run: ≤ 5 minutes on one H100/H200 (twice, with the machine's start, fits 15 minutes).
#
#   here:   bash benchmarks/gpu_wheels.sh && git rev-parse --short HEAD > .whl/GIT_SHA
#   device: run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=420)
#
# Installs the carried wheels, runs the kernel tests on the GPU (compiled kernels against the float64 reference and
# the closed forms), then a focused bench_loss slice (bf16, B ∈ {8, 512, 4096}, every kernel and
# mode), bench_step at SD1.5 shapes (random weights, 512×512) and bench_memory at SD1.5 shapes, each under its own
# time limit, and writes everything (CSV, PNG, logs, device.txt) to one folder: benchmarks/results/gpu_<date>, or,
# when the device tool sets $OUT (which takes back at most 8 files), /tmp/gpu_suite packed into $OUT/gpu_suite.tgz.
# DRY_RUN=1 checks the CPU-side steps without a GPU (no benchmark runs).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="benchmarks/results/gpu_$(date +%Y%m%d)"
[ -n "${OUT:-}" ] && DEST=/tmp/gpu_suite
mkdir -p "$DEST"
if [ "${DRY_RUN:-0}" != "1" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # cp312 wheels: the GPU image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_suite: installing the carried wheels failed"; exit 2; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the sha written here by the preparing step: the device's copy of the tree can carry an older .git (benchmarks'
# git_sha() reads this)
[ -f .whl/GIT_SHA ] && export FASTNABLA_GIT_SHA="$(cat .whl/GIT_SHA)"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "git_sha: ${FASTNABLA_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "gpu: none"
  python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.version.cuda)"
} > "$DEST/device.txt" 2>&1
cat "$DEST/device.txt"
if [ "${DRY_RUN:-0}" = "1" ]; then
  python3 benchmarks/bench_loss.py --help > /dev/null && python3 benchmarks/bench_step.py --help > /dev/null \
    && python3 benchmarks/bench_memory.py --help > /dev/null && echo "gpu_suite: dry run ok ($DEST)"
  exit $?
fi
status=0
STAGES=",${GPU_SUITE_STAGES:-tests,loss,step,memory},"  # also: "digits" (configs/digits.yaml), "sweep" (below)
on() { [[ "$STAGES" == *",$1,"* ]]; }
# the kernel tests, compiled (no interpreter), every tensor on the GPU; the CPU-dispatch tests are left out
kernel_tests() {
  FASTNABLA_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q -n "$1" -p no:cacheprovider tests/kernels \
    -k "not dispatch and not without_interpreter and not falls_back and not compile_for_sm90 and not empty_sample" \
    > "$DEST/kernel_tests.log" 2>&1
}
if on tests && on sweep; then  # the sweep's processes need a core each: the tests take 6 and run beside them
  kernel_tests 6 &
  tests_pid=$!
elif on tests; then
  kernel_tests 8 || status=1
  tail -15 "$DEST/kernel_tests.log"
fi
if on loss; then
  timeout 100 python3 benchmarks/bench_loss.py --device cuda --dtypes bf16 --batch-sizes 8,512,4096 \
    --modes forward,backward,full --out-dir "$DEST" 2>&1 | tee "$DEST/bench_loss.log" | tail -40 || status=1
fi
if on step; then
  timeout 210 python3 benchmarks/bench_step.py --sd15 --quick --out "$DEST" --rows reference_structure \
    fastnabla_paper fastnabla_paper+all fastnabla_returns fastnabla_returns+unet_ckpt 2>&1 \
    | tee "$DEST/bench_step.log" | tail -20 || status=1
fi
if on memory; then
  timeout 90 python3 benchmarks/bench_memory.py --configs none,all_ckpt --dtype bf16 --out "$DEST" 2>&1 \
    | tee "$DEST/bench_memory.log" | tail -10 || status=1
fi
# a digits finetune with the shipped config; the UNet and classifier come from $FASTNABLA_CACHE_DIR when carried
if on digits; then
  start=$(date +%s)
  timeout "${DIGITS_TIMEOUT:-600}" python3 -m fastnabla.train --config configs/digits.yaml \
    --output-dir "$DEST/digits_run" > "$DEST/digits.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  echo "digits: $(( $(date +%s) - start )) s, exit $rc" | tee -a "$DEST/digits.log"
  tail -5 "$DEST/digits.log"
fi
# digits_sweep runs side by side, one process each (one thread, the GPU shared): DIGITS_SWEEP is a space-separated
# list of task:variant:seed (e.g. "c3b05:value15_traj32k_steps6k_lr2.5e-5:0 c358:shipped:1"), each 100 epochs with an
# evaluation every 25 and the pooled re-evaluation; the UNet, classifier, target draw and values come from
# $FASTNABLA_CACHE_DIR when carried. Results (CSV, PNG, run directories without checkpoints) go under $DEST.
if on sweep; then
  start=$(date +%s)
  pids=()
  for run in ${DIGITS_SWEEP:-}; do
    IFS=: read -r task variant seed <<< "$run"
    OMP_NUM_THREADS=1 timeout "${DIGITS_TIMEOUT:-360}" python3 benchmarks/digits_sweep.py "$task" --only "$variant" \
      --seeds "$seed" --epochs "${DIGITS_EPOCHS:-100}" --eval-every "${DIGITS_EVAL_EVERY:-25}" \
      --tag "_${variant}_seed${seed}_gpu" --out "$DEST/digits_sweep" > "$DEST/sweep_${task}_${variant}_${seed}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  mkdir -p "$DEST/results"
  find benchmarks/results -maxdepth 1 -name 'digits_*' -newer "$DEST/device.txt" -exec cp {} "$DEST/results/" \;
  echo "sweep: ${#pids[@]} runs, $(( $(date +%s) - start )) s"
  grep -h "PASS\|FAIL\|UNFINISHED\|Error" "$DEST"/sweep_*.log | cut -c1-240
fi
if [ -n "${tests_pid:-}" ]; then
  wait "$tests_pid" || status=1
  tail -15 "$DEST/kernel_tests.log"
fi
ls -la "$DEST"
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu_suite.tgz" --exclude='*.pt' --exclude='*.bin' --exclude='*.safetensors' \
  --exclude='*.npy' -C "$(dirname "$DEST")" "$(basename "$DEST")" && cp "$DEST/device.txt" "$OUT/"
exit $status
