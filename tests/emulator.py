"""Builds (once, cached under build/emu) and loads the CPU emulation of the CUDA kernels.

The host compiler builds csrc/cuda/*.cuh with tests/emu/emu.h standing in for CUDA; the resulting
module runs the kernels' own source on CPU tensors (see tests/emu/emu.h)."""
import functools
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "emu"


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    from torch.utils.cpp_extension import load as load_extension

    build_dir = ROOT / "build" / "emu"
    build_dir.mkdir(parents=True, exist_ok=True)
    # the emulator and its bindings, plus the argument checks the CUDA driver shares with the CPU path
    sources = sorted(str(p) for p in EMU_DIR.glob("*.cpp")) + [str(ROOT / "csrc" / "problem.cpp")]
    os.environ.setdefault("MAX_JOBS", "2")
    return load_extension(
        name="smoothce_emu",
        sources=sources,
        extra_include_paths=[str(ROOT / "csrc"), str(EMU_DIR)],
        extra_cflags=["-O2", "-fno-math-errno"],
        build_directory=str(build_dir),
        verbose=verbose,
    )
