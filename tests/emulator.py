"""Builds (once, cached under build/emu) and loads the CPU emulation of the CUDA kernels.

The host compiler builds csrc/cuda/*.cuh with tests/emu/emu.h standing in for CUDA; the resulting
module runs the kernels' own source on CPU tensors (see tests/emu/emu.h)."""
import contextlib
import functools
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "emu"


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    from torch.utils.cpp_extension import load as load_extension

    # (SMOOTHCE_EMU_BUILD_DIR: another build folder, e.g. for a mutated copy of the sources)
    build_dir = pathlib.Path(os.environ.get("SMOOTHCE_EMU_BUILD_DIR", ROOT / "build" / "emu"))
    build_dir.mkdir(parents=True, exist_ok=True)
    # the emulator and its bindings, plus the argument checks and the fused linear driver the CUDA path
    # shares with the CPU path
    sources = sorted(str(p) for p in EMU_DIR.glob("*.cpp")) + [str(ROOT / "csrc" / n) for n in ("problem.cpp", "linear.cpp")]
    os.environ.setdefault("MAX_JOBS", "2")
    module = load_extension(
        name="smoothce_emu",
        sources=sources,
        extra_include_paths=[str(ROOT / "csrc"), str(EMU_DIR)],
        extra_cflags=["-O2", "-fno-math-errno"] + _contraction_cflags(),
        build_directory=str(build_dir),
        verbose=verbose,
    )
    # SMOOTHCE_EMU_ARITH: the kernels' exp/log/division, 'exact' (host libm) or 'device' (the fast-math
    # GPU's documented errors and flush to zero; see tests/emu/arith.h); SMOOTHCE_EMU_ARITH_SEED: which
    # pattern of errors within those bounds (default 0)
    module.set_arithmetic(os.environ.get("SMOOTHCE_EMU_ARITH", "exact"),
                          int(os.environ.get("SMOOTHCE_EMU_ARITH_SEED", "0")))
    # SMOOTHCE_EMU_SCHEDULE: the order in which released emulated threads resume: 'fifo' (default),
    # 'lifo' or 'random:SEED' (see emu::Schedule)
    name, _, seed = os.environ.get("SMOOTHCE_EMU_SCHEDULE", "fifo").partition(":")
    module.set_schedule(name, int(seed or 0))
    return module


def _contraction_cflags():
    """nvcc contracts a*b+c into an FMA (--fmad=true, its default, with or without fast math), in fp32
    and fp64: so does the emulator's build, in both arithmetic modes. GCC contracts only with
    -ffp-contract=fast and an FMA instruction to contract into (-mfma, where the host CPU has it)."""
    try:
        with open("/proc/cpuinfo") as f:
            has_fma = "fma" in f.read().split()
    except OSError:
        has_fma = False
    return ["-ffp-contract=fast"] + (["-mfma"] if has_fma else [])


@contextlib.contextmanager
def scheduled(module, name="fifo", seed=0):
    """Runs the block with the emulator's schedule set to `name` (seed), then restores the previous one
    (e.g. SMOOTHCE_EMU_SCHEDULE's)."""
    previous = module.schedule()
    module.set_schedule(name, seed)
    try:
        yield module
    finally:
        module.set_schedule(*previous)
