#!/usr/bin/env bash
# `make cuda-check`: compile the CUDA extension without a GPU (FORCE_CUDA=1) for sm_80 and sm_90 into
# a scratch folder, fail on any ptxas spill, check that the library holds code for both
# architectures, and load it in a CPU-only process.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if ! compgen -G "csrc/cuda/*.cu" > /dev/null; then
  echo "cuda-check: no CUDA sources (csrc/cuda/*.cu) yet: nothing to compile"
  exit 0
fi

export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS="${MAX_JOBS:-2}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

scratch=build/cuda-check
rm -rf "$scratch"
mkdir -p "$scratch"
"$PY" setup.py build_ext --build-lib "$scratch/lib" --build-temp "$scratch/temp" 2>&1 | tee "$scratch/build.log"

if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$scratch/build.log"; then
  echo "cuda-check: ptxas reports register spills (above)" >&2
  exit 1
fi

so=$(ls "$scratch"/lib/smoothce/_C*.so)
cuobjdump=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))" 2>/dev/null || true)
if [ -z "$cuobjdump" ] || [ ! -x "$cuobjdump" ]; then cuobjdump=$(command -v cuobjdump || true); fi
if [ -z "$cuobjdump" ]; then
  echo "cuda-check: no cuobjdump (neither triton's nor one on PATH)" >&2
  exit 1
fi
elves=$("$cuobjdump" --list-elf "$so")
for arch in sm_80 sm_90; do
  if ! grep -q "$arch" <<< "$elves"; then
    echo "cuda-check: $so holds no $arch code:" >&2
    echo "$elves" >&2
    exit 1
  fi
done

CUDA_VISIBLE_DEVICES="" "$PY" -c "
import torch
torch.ops.load_library('$so')
assert hasattr(torch.ops.smoothce, 'forward'), 'the ops are not registered'
print('cuda-check: the CUDA build loads in a CPU-only process')
"
echo "cuda-check: ok (sm_80, sm_90, no spills)"
