"""Build smoothce: the CPU extension always, the CUDA extension when a toolkit is usable.

CUDA is built when a CUDA toolkit is found and either a GPU is visible or FORCE_CUDA=1.
Environment knobs (all optional):
  FORCE_CUDA=1                 build the CUDA extension without a visible GPU (compile check).
  SMOOTHCE_CPU_CAPABILITY      'avx512', 'avx2' or 'default'; by default the widest the build machine
                               has (avx512: AVX-512 F, BW, VL and DQ; avx2: AVX2 and FMA).
  SMOOTHCE_CPU_BF16            '1' or '0': with 'avx512', convert fp32 to bf16 with AVX512-BF16's
                               instructions; by default when the build machine has them (avx512_bf16).
  MAX_JOBS, TORCH_CUDA_ARCH_LIST, CUDA_HOME  as for any torch extension.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_version() -> str:
    scope = {}
    with open(os.path.join(HERE, "smoothce", "_version.py")) as f:
        exec(f.read(), scope)  # a one-line file; importing smoothce would need the built extension
    return scope["__version__"]


__version__ = _read_version()


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_capability() -> str:
    wanted = os.environ.get("SMOOTHCE_CPU_CAPABILITY", "").lower()
    if wanted in ("avx512", "avx2", "default"):
        return wanted
    if wanted:
        raise SystemExit(f"SMOOTHCE_CPU_CAPABILITY={wanted!r}: expected 'avx512', 'avx2' or 'default'")
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "default"


def _cpu_bf16(capability: str) -> bool:
    wanted = os.environ.get("SMOOTHCE_CPU_BF16", "")
    if wanted not in ("", "0", "1"):
        raise SystemExit(f"SMOOTHCE_CPU_BF16={wanted!r}: expected '1' or '0'")
    if capability != "avx512" or wanted == "0":
        return False
    return wanted == "1" or "avx512_bf16" in _cpu_flags()


def _cuda_wanted() -> bool:
    """True when a CUDA toolkit is found and a GPU is visible or FORCE_CUDA=1."""
    if os.environ.get("FORCE_CUDA", "0") != "1":
        import torch

        if not torch.cuda.is_available():
            return False
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None


def _fix_cuda_home():
    # An nvcc on PATH that is a wrapper script in /usr/local/bin makes torch guess CUDA_HOME=/usr/local;
    # point it at the real toolkit when the user has not chosen one (torch reads it on import).
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if os.path.isfile("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def extensions():
    _fix_cuda_home()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    capability = _cpu_capability()
    # -fopenmp: at::parallel_for is inline code that is parallel only when compiled with OpenMP; the
    # libgomp.so.1 it links is the one torch has already loaded, so torch.set_num_threads applies.
    cxx = ["-O3", "-fno-math-errno", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    define_macros = [("SMOOTHCE_VERSION", f'"{__version__}"')]
    if capability == "avx512":
        # at::vec's AVX-512 implementation (16 floats a vector), with the flags torch builds its own
        # AVX512 kernels with; the module's init refuses to load on a CPU without them.
        cxx += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
        define_macros += [("CPU_CAPABILITY", "AVX512"), ("CPU_CAPABILITY_AVX512", None)]
        if _cpu_bf16(capability):
            # vcvtneps2bf16 for the bf16 stores (csrc/cpu/cross_entropy.cpp: bf16_from); the module's init
            # refuses to load on a CPU without AVX512-BF16.
            cxx += ["-mavx512bf16"]
            define_macros += [("SMOOTHCE_AVX512_BF16", None)]
    elif capability == "avx2":
        # at::vec picks its AVX2 implementation from CPU_CAPABILITY(_AVX2); the module's init
        # (csrc/ops.cpp) refuses to load on a CPU without AVX2.
        cxx += ["-mavx2", "-mfma", "-mf16c"]
        define_macros += [("CPU_CAPABILITY", "AVX2"), ("CPU_CAPABILITY_AVX2", None)]
    else:
        define_macros += [("CPU_CAPABILITY", "DEFAULT")]
    define_macros += [("SMOOTHCE_CPU_CAPABILITY", f'"{capability}"')]

    include_dirs = [os.path.join(HERE, "csrc")]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    if cuda_sources and _cuda_wanted():
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas=-v"]
        # torch's CUDA headers include cusparse.h & co; pip's CUDA runtime packages ship them.
        pip_cuda_include = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
        if os.path.isdir(pip_cuda_include):
            include_dirs.append(os.path.abspath(pip_cuda_include))
        define_macros.append(("SMOOTHCE_WITH_CUDA", None))
        ext = CUDAExtension(
            "smoothce._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "smoothce._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="smoothce",
    version=__version__,
    description="Fused label-smoothed softmax cross-entropy for PyTorch (CPU and CUDA kernels)",
    packages=find_packages(include=["smoothce", "smoothce.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest", "hypothesis", "numpy"], "bench": ["matplotlib", "numpy"],
                    # smoothce.integrations (tested with timm 1.0.31 and transformers 5.24)
                    "timm": ["timm>=1.0"], "transformers": ["transformers>=4.46", "accelerate"]},
    zip_safe=False,
)
