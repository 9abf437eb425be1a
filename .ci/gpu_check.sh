#!/usr/bin/env bash
# `make gpu-check`: everything that needs a real GPU, as one command (about 8 minutes on one H100).
#
# Stops at once, before building, when no GPU is visible (no nvidia-smi, or torch sees no CUDA device).
# Otherwise: builds the extension for the visible GPU's architecture only, then runs, each step within
# its own time limit and all within GPU_CHECK_BUDGET_S (470 s by default):
#   build       pip install --no-build-isolation -e . (TORCH_CUDA_ARCH_LIST from the GPU, MAX_JOBS = nproc)
#   build_info  the installed library has its CUDA kernels
#   test_cuda   pytest tests/test_cuda.py (the tests that need a GPU, slow ones included)
#   plans       .ci/gpu_plans.py: one shape per launch plan, forward + backward, checked against
#               PyTorch, with the kernels each case launched (so which plan ran)
#   memcheck, racecheck, synccheck, initcheck
#               compute-sanitizer over .ci/gpu_plans.py (skipped when compute-sanitizer is not installed)
#   bench       python -m bench --device cuda with a short budget (eager, torch.compile, Liger when installed)
#   linear      python -m bench --device cuda --linear-only: the fused linear + cross-entropy table, few
#               runs, no torch.compile (Liger's and Cut Cross-Entropy's fused losses when installed)
#   suite       last, in the time left: the suite on the CUDA kernels (SMOOTHCE_TEST_BACKEND=cuda,
#               -m "not slow and not cpu_only": the cpu_only tests check the CPU kernels and the
#               emulator, which `make test` covers); cut short at the budget's end it is PARTIAL
# A failed step is recorded and the next one still runs; the exit status is 1 when any step failed.
# Everything lands in build/gpu-check/<timestamp>/ (build/gpu-check/latest): a log per step, pytest's
# junit xml, the bench results, env.txt and summary.txt.
#
# Knobs (environment): GPU_CHECK_BUDGET_S (470), GPU_CHECK_MAX_JOBS (nproc), GPU_CHECK_MARKS (pytest -m
# of the suite step, "not slow and not cpu_only"; empty: every test), GPU_CHECK_BENCH_SHAPES (4096x32000,8x21x256x256),
# GPU_CHECK_BENCH_DTYPES (bf16), CUDA_HOME (default: what torch finds; /usr/local/cuda when neither
# CUDA_HOME nor CUDA_PATH is set and /usr/local/cuda/bin/nvcc exists, as setup.py does).
set -uo pipefail  # no -e: a failed step is recorded and the next one runs
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
BUILD_STAMP=${BUILD_STAMP:-.venv/.smoothce-built}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
MIN_STEP_S=20  # a step that would get less than this is not started
deadline=$((SECONDS + BUDGET_S))

no_gpu() {
  echo "gpu-check: no GPU: $*" >&2
  echo "gpu-check: nothing was built or run. Run this on a machine with an NVIDIA GPU; without one," \
    "\`make test\` checks the CUDA kernels on the emulator and \`make cuda-check\` compiles them." >&2
  exit 1
}

# ---------------------------------------------------------------- a GPU, before anything is built
command -v nvidia-smi > /dev/null 2>&1 || no_gpu "nvidia-smi is not installed"
gpu_list=$(timeout 60 nvidia-smi -L 2>&1) || no_gpu "nvidia-smi -L failed: ${gpu_list}"
[ -x "$PY" ] || { echo "gpu-check: no $PY (\`make gpu-check\` creates the venv first)" >&2; exit 1; }
arch_list=$(timeout 120 "$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    runtime = torch.version.cuda or "none: a CPU-only build of torch"
    print(f"torch {torch.__version__} (CUDA runtime {runtime}) sees no CUDA device", file=sys.stderr)
    sys.exit(3)
caps = {"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
print(";".join(sorted(caps)))
')
rc=$?
if ((rc == 3)); then
  no_gpu "torch.cuda.is_available() is false in $PY (above)"
elif ((rc != 0)) || [ -z "$arch_list" ]; then
  echo "gpu-check: could not ask torch for the GPU's architecture ($PY, exit status $rc; above)" >&2
  exit 1
fi

# ---------------------------------------------------------------- the build's environment
if [ -z "${CUDA_HOME:-}" ] && [ -z "${CUDA_PATH:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
cuda_home=$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2> /dev/null)
[ -n "$cuda_home" ] && export CUDA_HOME="$cuda_home"
export TORCH_CUDA_ARCH_LIST="$arch_list"
MAX_JOBS=${GPU_CHECK_MAX_JOBS:-$(nproc)}
export MAX_JOBS

sanitizer=$(command -v compute-sanitizer 2> /dev/null || true)
for candidate in "${cuda_home:+$cuda_home/bin/compute-sanitizer}" \
                 "${cuda_home:+$cuda_home/compute-sanitizer/compute-sanitizer}"; do
  if [ -z "$sanitizer" ] && [ -n "$candidate" ] && [ -x "$candidate" ]; then sanitizer=$candidate; fi
done

stamp=$(date +%Y%m%d-%H%M%S)
OUT=build/gpu-check/$stamp
mkdir -p "$OUT"
ln -sfn "$stamp" build/gpu-check/latest

{
  echo "date: $(date -Is)"
  echo "host: $(hostname) ($(nproc) CPUs)"
  echo "git: $(git rev-parse HEAD 2> /dev/null || echo '?') ($(git status --porcelain 2> /dev/null | wc -l) paths changed)"
  echo "gpus:"; echo "$gpu_list"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${cuda_home:-'(none found)'}"
  echo "compute-sanitizer: ${sanitizer:-(not found)}"
  "$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}, " + torch.cuda.get_device_name())'
  if [ -n "$cuda_home" ] && [ -x "$cuda_home/bin/nvcc" ]; then "$cuda_home/bin/nvcc" --version | tail -n 2; fi
  echo; nvidia-smi
} > "$OUT/env.txt" 2>&1

echo "gpu-check: $(echo "$gpu_list" | head -n 1)"
echo "gpu-check: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${cuda_home:-(none found)}"
echo "gpu-check: results in $OUT (at most ${BUDGET_S} s)"

# ---------------------------------------------------------------- the steps
summary_rows=()
failed_steps=()
current=""
step_signal=TERM  # what `timeout` sends at a step's time limit (then KILL 15 s later)
step_preserve=""  # non-empty: the step's own exit status even after that signal (it may finish cleanly)
on_signal() {
  if [ -n "$current" ]; then kill -TERM "$current" 2> /dev/null; wait "$current" 2> /dev/null; fi
  echo "gpu-check: interrupted; partial results in $OUT" >&2
  exit 130
}
trap on_signal INT TERM

record() {  # record NAME STATUS SECONDS DETAIL: a row of summary.txt; FAIL, TIMEOUT and NOT-RUN fail the check
  summary_rows+=("$(printf '%-11s %-8s %5s  %s' "$1" "$2" "$3" "$4")")
  case $2 in PASS | SKIP | PARTIAL) ;; *) failed_steps+=("$1") ;; esac
  printf '   %s: %s%s\n' "$1" "$2" "${4:+ ($4)}"
}

junit_counts() {  # junit_counts XML: "T tests, F failed, E errors, S skipped"
  "$PY" - "$1" << 'EOF' 2> /dev/null || echo "no junit xml"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
print("{tests} tests, {failures} failed, {errors} errors, {skipped} skipped".format(**total))
EOF
}

# run_step NAME CAP_S CMD...: runs CMD (output in $OUT/NAME.log) within CAP_S seconds and the budget;
# sets step_rc (CMD's exit status; 124/137 on a timeout), step_status (PASS, FAIL, TIMEOUT or NOT-RUN:
# too little time left), step_seconds and step_detail for finish_step.
run_step() {
  local name=$1 cap=$2
  shift 2
  local log="$OUT/$name.log" left=$((deadline - SECONDS)) limit t0=$SECONDS
  limit=$((cap < left ? cap : left))
  step_rc=1 step_seconds=0
  if ((limit < MIN_STEP_S)); then
    step_status=NOT-RUN step_detail="only ${left} s left of the ${BUDGET_S} s budget"
    echo "== $name: not run ($step_detail)"
    return
  fi
  echo "== $name (at most ${limit} s; tail -f $log)"
  printf '$ %s\n' "$*" > "$log"
  timeout ${step_preserve:+--preserve-status} -s "$step_signal" -k 15 "$limit" "$@" >> "$log" 2>&1 &
  current=$!
  step_rc=0
  wait "$current" || step_rc=$?
  current=""
  step_seconds=$((SECONDS - t0))
  if ((step_rc == 124 || step_rc == 137)) || { [ -n "$step_preserve" ] && ((step_rc != 0 && step_seconds >= limit)); }; then
    step_status=TIMEOUT step_detail="stopped at its ${limit} s limit"
  elif ((step_rc != 0)); then
    step_status=FAIL step_detail="exit status $step_rc"
  else
    step_status=PASS step_detail=""
  fi
  if [ "$step_status" != PASS ]; then
    echo "   --- last lines of $log:"
    tail -n 25 "$log" | sed 's/^/   | /'
  fi
}

finish_step() {  # finish_step NAME [DETAIL]: records the last run_step's outcome
  local detail=${2:-}
  if [ "$step_status" = NOT-RUN ]; then
    detail=$step_detail
  elif [ -n "$step_detail" ]; then
    detail="${step_detail}${detail:+; $detail}"
  fi
  record "$1" "$step_status" "$step_seconds" "$detail"
}

not_run() { record "$1" NOT-RUN 0 "$2"; }

# build
built=0
if [ -z "$cuda_home" ]; then
  not_run build "no CUDA toolkit found by torch: set CUDA_HOME to one matching torch's CUDA $("$PY" -c 'import torch; print(torch.version.cuda)')"
else
  run_step build 300 "$PY" -m pip install -v --no-build-isolation -e .
  finish_step build
  if ((step_rc == 0)); then
    run_step build_info 60 "$PY" -c '
import smoothce, torch
info = smoothce.build_info()
print("smoothce", smoothce.__version__, info, "torch", torch.__version__)
assert info["cuda"] == "yes", "the installed smoothce has no CUDA kernels (was CUDA_HOME found at build time?)"
x = torch.randn(8, 10, device="cuda", requires_grad=True)
smoothce.cross_entropy(x, torch.randint(0, 10, (8,), device="cuda"), label_smoothing=0.1).backward()
torch.cuda.synchronize()
print("a CUDA call ran")'
    finish_step build_info
    if ((step_rc == 0)); then
      built=1
      touch "$BUILD_STAMP"  # the tree is built (with CUDA): make test-gpu & co do not rebuild it
    fi
  fi
fi

export OMP_WAIT_POLICY=passive  # as the Makefile's test targets (the emulator's threads on few cores)

if ((built)); then
  run_step test_cuda 120 "$PY" -m pytest tests/test_cuda.py -q -ra --junitxml="$OUT/test_cuda.xml"
  counts=$(junit_counts "$OUT/test_cuda.xml")
  if [ "$step_status" = PASS ] && [[ $counts =~ ^([0-9]+)\ tests,.*\ ([0-9]+)\ skipped$ ]] \
      && [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[2]}" ]; then
    step_status=FAIL  # every test skipped: they did not run on the GPU
    counts="$counts: all skipped"
  fi
  finish_step test_cuda "$counts"

  run_step plans 90 "$PY" .ci/gpu_plans.py
  finish_step plans "$(grep -sE 'cases passed' "$OUT/plans.log" | tail -n 1)"

  for tool in memcheck racecheck synccheck initcheck; do
    if [ -z "$sanitizer" ]; then
      record "$tool" SKIP 0 "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"
      continue
    fi
    # Only smoothce's kernels are instrumented (kns: a substring of the mangled name); without torch's
    # caching allocator every tensor is its own allocation (memcheck sees overruns, initcheck stale data).
    run_step "$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
      --kernel-name kns=smoothce --print-limit 50 "$PY" .ci/gpu_plans.py --no-profile
    finish_step "$tool" "$(grep -sE 'ERROR SUMMARY|RACECHECK SUMMARY|cases passed' "$OUT/$tool.log" \
      | sed -E 's/^=+ *//' | paste -sd ';' - | sed 's/;/; /g')"
  done

  # The bench's own time budget (its torch.compile time comes on top: ~90 s in all).
  run_step bench 150 "$PY" -m bench --device cuda --shapes "${GPU_CHECK_BENCH_SHAPES:-4096x32000,8x21x256x256}" \
    --dtypes "${GPU_CHECK_BENCH_DTYPES:-bf16}" --budget 30 --variant-budget 15 --no-linear --out "$OUT/bench"
  finish_step bench "results in $OUT/bench"

  run_step linear 90 "$PY" -m bench --device cuda --linear-only --runs 5 --no-compile --out "$OUT/bench-linear"
  finish_step linear "results in $OUT/bench-linear"

  # Last, in the time left: the suite on the CUDA kernels. cpu_only tests (the CPU kernels, the emulator:
  # `make test` runs them) and slow ones are left out unless GPU_CHECK_MARKS says otherwise. At the time
  # limit pytest gets SIGINT, so it stops cleanly and its junit xml counts the tests that ran: a suite cut
  # short without a failure is PARTIAL, not a failure (`make test-gpu` runs all of it).
  marks=${GPU_CHECK_MARKS-not slow and not cpu_only}
  step_signal=INT step_preserve=1
  run_step suite $((deadline - SECONDS - 20)) env SMOOTHCE_TEST_BACKEND=cuda "$PY" -m pytest tests -q -ra \
    ${marks:+-m "$marks"} --ignore=tests/test_cuda.py --junitxml="$OUT/suite.xml"
  step_signal=TERM step_preserve=""
  counts=$(junit_counts "$OUT/suite.xml")
  if [ "$step_status" = TIMEOUT ] && [[ $counts =~ ^[0-9]+\ tests,\ 0\ failed,\ 0\ errors ]]; then
    step_status=PARTIAL step_detail="stopped at the time limit, no failure so far"
  fi
  finish_step suite "$counts${marks:+; -m \"$marks\"}"
else
  for name in test_cuda plans memcheck racecheck synccheck initcheck bench linear suite; do
    not_run "$name" "no working build"
  done
fi

# ---------------------------------------------------------------- summary
{
  echo "make gpu-check, $(date -Is): $(echo "$gpu_list" | head -n 1)"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${cuda_home:-(none found)}; $SECONDS s"
  echo
  printf '%-11s %-8s %5s  %s\n' step status s detail
  printf '%s\n' "${summary_rows[@]}"
  echo
  if grep -sqE '^(ok  |FAIL) ' "$OUT/plans.log"; then
    echo "launch plans (plans.log: case, errors against PyTorch, the plan that ran, the kernels):"
    grep -E '^(ok  |FAIL) ' "$OUT/plans.log" | sed 's/^/  /'
    echo
  fi
  if ((${#failed_steps[@]})); then
    echo "FAILED: ${failed_steps[*]} (logs: $OUT/<step>.log)"
  else
    echo "PASSED (SKIP: not available on this machine; PARTIAL: cut short by the time budget, no failure)"
  fi
} > "$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
((${#failed_steps[@]} == 0))
