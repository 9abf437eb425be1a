#!/usr/bin/env bash
# `make cpu-variants`: the CPU code paths below the one this machine builds (setup.py picks the widest:
# AVX-512 with AVX512-BF16 conversions, AVX-512, AVX2, none), each built into a scratch folder with
# SMOOTHCE_CPU_CAPABILITY / SMOOTHCE_CPU_BF16 and run through the CPU kernel tests. `make test` tests
# only the native build: without this, an AVX-512 CI machine never runs the AVX2 kernels (which most
# x86 machines without AVX-512 take) nor the plain C++ ones (aarch64 and older x86).
# CPU_VARIANTS="avx2 default" picks variants (names: avx512-nobf16, avx2, default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # (absolute, the venv's link kept: tests run elsewhere)
root=$(pwd)
export MAX_JOBS="${MAX_JOBS:-2}"

flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { for f in "$@"; do grep -qw "$f" <<< "$flags" || return 1; done; }
variants=${CPU_VARIANTS:-}
if [ -z "$variants" ]; then
  if has avx512f avx512bw avx512vl avx512dq fma && has avx512_bf16; then variants="avx512-nobf16 avx2 default"
  elif has avx512f avx512bw avx512vl avx512dq fma; then variants="avx2 default"
  elif has avx2 fma; then variants="default"
  else variants=""; fi
fi
if [ -z "$variants" ]; then
  echo "cpu-variants: this machine builds the plain C++ kernels, which make test tested: nothing to add"
  exit 0
fi

tests=(tests/test_cross_entropy.py tests/test_edge_cases.py tests/test_precision.py tests/test_variants.py
       tests/test_variants_safety.py tests/test_hypothesis.py)
for variant in $variants; do
  case $variant in
    avx512-nobf16) capability=avx512 bf16=0 ;;
    avx2) capability=avx2 bf16=0 ;;
    default) capability=default bf16=0 ;;
    *) echo "cpu-variants: unknown variant '$variant' (avx512-nobf16, avx2, default)" >&2; exit 2 ;;
  esac
  scratch=build/cpu-variants/$variant
  rm -rf "$scratch/pkg"
  mkdir -p "$scratch/pkg"
  echo "cpu-variants: building $variant in $scratch"
  SMOOTHCE_CPU_CAPABILITY=$capability SMOOTHCE_CPU_BF16=$bf16 \
    "$PY" setup.py build_ext --build-lib "$scratch/lib" --build-temp "$scratch/temp" > "$scratch/build.log" 2>&1 ||
    { tail -40 "$scratch/build.log" >&2; echo "cpu-variants: the $variant build failed ($scratch/build.log)" >&2; exit 1; }
  # the package's own files with this build's library (the tests import it from the current folder)
  mkdir -p "$scratch/pkg/smoothce"
  tar -C smoothce --exclude=__pycache__ --exclude='_C*.so' -cf - . | tar -C "$scratch/pkg/smoothce" -xf -
  cp "$scratch"/lib/smoothce/_C*.so "$scratch/pkg/smoothce/"
  (
    cd "$scratch/pkg"
    "$PY" -c "
import smoothce
info = smoothce.build_info()
assert smoothce.__file__.startswith('$root/$scratch/pkg/'), smoothce.__file__
assert info['cpu_capability'] == '$capability' and info['cpu_bf16'] == ($bf16 == 1), info
print('cpu-variants: testing', info)
"
    OMP_WAIT_POLICY=passive "$PY" -m pytest "${tests[@]/#/$root/}" -q -p no:cacheprovider -m "not slow" \
      --rootdir "$root"
  )
done
echo "cpu-variants: ok ($variants)"
